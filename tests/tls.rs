//! The TLS ports of a real server (incubator with `tls = on`, viewer, public API, web) speak
//! TLS 1.3 and TLS 1.2 and nothing older:
//!
//! - a client restricted to TLS 1.3, and one restricted to TLS 1.2, each complete a handshake
//!   in that version (the server's certificate pinned) and exchange application data;
//! - a TLS 1.0 and a TLS 1.1 ClientHello (hand-made records, no supported_versions), and a
//!   ClientHello whose supported_versions offers only 1.0 and 1.1, are answered with one fatal
//!   alert and a close, never a ServerHello: `protocol_version`, or `handshake_failure` for a
//!   hello without signature_algorithms (rustls requires that extension before it looks at
//!   the version);
//! - plaintext (an HTTP request, an incubator frame, a viewer frame, noise) sent to a TLS
//!   port is refused with an alert or a close, well within the handshake timeout;
//! - after all of this the server is still running and serves legitimate clients.

mod common;

use es_loadtest::http_client::HttpClient;
use es_loadtest::spawn::ServerProcess;
use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ProtocolVersion, SupportedProtocolVersion};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every listener of a spawned server with `tls = on` on the incubator port.
const TLS_SERVICES: [&str; 4] = ["incubator", "viewer", "public-api", "web"];

/// A refusal must come well before the server's handshake timeout (10 s by default), so
/// that the close is the refusal and not the timer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(5);

const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_ALERT: u8 = 21;
const ALERT_FATAL: u8 = 2;
const ALERT_HANDSHAKE_FAILURE: u8 = 40;
const ALERT_PROTOCOL_VERSION: u8 = 70;

fn tls_server() -> (ServerProcess, tempfile::TempDir) {
    let (server, dir) = common::spawn(true);
    for service in TLS_SERVICES {
        let listener = server
            .info
            .listeners
            .iter()
            .find(|l| l.service == service)
            .unwrap_or_else(|| panic!("{service} is listed"));
        assert!(listener.tls, "{service} listens with TLS");
    }
    (server, dir)
}

fn connect(address: SocketAddr) -> TcpStream {
    let socket = TcpStream::connect_timeout(&address, common::TIMEOUT).expect("connects");
    socket.set_read_timeout(Some(common::TIMEOUT)).unwrap();
    socket.set_write_timeout(Some(common::TIMEOUT)).unwrap();
    socket.set_nodelay(true).unwrap();
    socket
}

/// A TLS connection to `service`, restricted to `version`, the server's certificate pinned;
/// returns the stream once the handshake completed.
fn handshake(
    server: &ServerProcess,
    service: &str,
    version: &'static SupportedProtocolVersion,
) -> rustls::StreamOwned<ClientConnection, TcpStream> {
    let cert = es_net::tls::read_certificate(&server.info.certificate).expect("certificate");
    let config = es_net::tls::pinned_client_config_with_versions(cert, &[version]);
    let name = ServerName::try_from("localhost").unwrap();
    let mut connection = ClientConnection::new(Arc::clone(&config), name).unwrap();
    let mut socket = connect(server.info.address(service));
    while connection.is_handshaking() {
        connection
            .complete_io(&mut socket)
            .unwrap_or_else(|error| panic!("{service} {:?}: handshake: {error}", version.version));
    }
    assert_eq!(
        connection.protocol_version(),
        Some(version.version),
        "{service}: negotiated version"
    );
    rustls::StreamOwned::new(connection, socket)
}

/// Application data both ways over an established connection: each service answers a
/// request in its own protocol.
fn exchange(service: &str, stream: &mut rustls::StreamOwned<ClientConnection, TcpStream>) {
    match service {
        "incubator" => {
            use es_proto::incubator::{pb, ErrorCode, FrameDecoder, Message};
            // PING before HELLO: the session answers hello_required and closes.
            stream
                .write_all(&Message::Ping(pb::Ping { seq: 1 }).to_bytes())
                .unwrap();
            let reply = read_to_end(stream);
            let mut src = bytes::BytesMut::from(&reply[..]);
            let decoded = FrameDecoder::new(1 << 20).decode(&mut src);
            let Ok(Some(Message::Error(error))) = decoded else {
                panic!("incubator: not an ERROR: {decoded:?}");
            };
            assert_eq!(error.code, ErrorCode::HelloRequired.code(), "{error:?}");
        }
        "viewer" => {
            use es_proto::viewer::{encode_frame, pb, ErrorCode, FrameDecoder};
            // Ping before Login: the session answers login_required and closes.
            let mut out = bytes::BytesMut::new();
            let ping = pb::ClientMessage {
                seq: 1,
                request: Some(pb::client_message::Request::Ping(pb::Ping {})),
            };
            encode_frame(&ping, &mut out);
            stream.write_all(&out).unwrap();
            let reply = read_to_end(stream);
            let mut src = bytes::BytesMut::from(&reply[..]);
            let decoded = FrameDecoder::new(1 << 20).decode::<pb::ServerMessage>(&mut src);
            let Ok(Some(pb::ServerMessage {
                body: Some(pb::server_message::Body::Error(error)),
                ..
            })) = decoded
            else {
                panic!("viewer: not an Error: {decoded:?}");
            };
            assert_eq!(error.code, ErrorCode::LoginRequired.code(), "{error:?}");
        }
        "public-api" | "web" => {
            let path = if service == "web" {
                "/healthz"
            } else {
                "/api/v1/openapi.json"
            };
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let reply = read_to_end(stream);
            let text = String::from_utf8_lossy(&reply);
            assert!(text.starts_with("HTTP/1.1 "), "{service}: {text}");
            if service == "web" {
                assert!(text.starts_with("HTTP/1.1 200"), "{service}: {text}");
            }
        }
        other => panic!("no exchange for {other}"),
    }
}

/// Plaintext until the server closes (a TLS close_notify ends the stream cleanly).
fn read_to_end(stream: &mut rustls::StreamOwned<ClientConnection, TcpStream>) -> Vec<u8> {
    let mut reply = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return reply,
            Ok(count) => reply.extend_from_slice(&buf[..count]),
            // Some answers are followed by a close without close_notify being read first.
            Err(error) if error.kind() == ErrorKind::UnexpectedEof => return reply,
            Err(error) if error.kind() == ErrorKind::ConnectionReset && !reply.is_empty() => {
                return reply
            }
            Err(error) => panic!("reading the answer: {error} after {} bytes", reply.len()),
        }
    }
}

/// A minimal ClientHello record: `legacy_version`, the given cipher suites, null compression,
/// and the extensions given (each `(type, body)`).
fn client_hello(legacy_version: u16, suites: &[u16], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&legacy_version.to_be_bytes());
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11))); // random
    body.push(0); // session_id: empty
    body.extend_from_slice(&u16::try_from(suites.len() * 2).unwrap().to_be_bytes());
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression methods: null only
    if !extensions.is_empty() {
        let mut all = Vec::new();
        for (kind, data) in extensions {
            all.extend_from_slice(&kind.to_be_bytes());
            all.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
            all.extend_from_slice(data);
        }
        body.extend_from_slice(&u16::try_from(all.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&all);
    }
    let mut handshake = vec![1u8]; // client_hello
    handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    // Record layer: version 3.1 as TLS 1.0 and 1.1 clients (and most others) send it.
    let mut record = vec![CONTENT_HANDSHAKE, 3, 1];
    record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

/// Cipher suites a TLS 1.0/1.1 client offers: ECDHE-RSA/ECDSA with AES-CBC-SHA, RSA AES-CBC.
const LEGACY_SUITES: [u16; 5] = [0xc013, 0xc014, 0xc009, 0x002f, 0x0035];

/// Extensions such a client commonly sends: server_name (localhost), supported_groups
/// (x25519, secp256r1) and ec_point_formats (uncompressed). No supported_versions.
fn legacy_extensions() -> Vec<(u16, Vec<u8>)> {
    let host = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&u16::try_from(host.len() + 3).unwrap().to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&u16::try_from(host.len()).unwrap().to_be_bytes());
    sni.extend_from_slice(host);
    vec![
        (0x0000, sni),
        (0x000a, vec![0, 4, 0, 0x1d, 0, 0x17]),
        (0x000b, vec![1, 0]),
    ]
}

/// What the server sent after `bytes`, read until it closed; panics if it did not close
/// within [`REFUSAL_TIMEOUT`].
fn send_and_read_until_close(address: SocketAddr, bytes: &[u8], what: &str) -> Vec<u8> {
    let mut socket = connect(address);
    socket.set_read_timeout(Some(REFUSAL_TIMEOUT)).unwrap();
    let started = Instant::now();
    socket.write_all(bytes).unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(count) => reply.extend_from_slice(&buf[..count]),
            Err(error) if error.kind() == ErrorKind::ConnectionReset => break,
            Err(error) => panic!(
                "{what} to {address}: not closed after {:?} ({error}); received {reply:02x?}",
                started.elapsed()
            ),
        }
        assert!(
            reply.len() < 64 * 1024,
            "{what} to {address}: the server keeps sending"
        );
    }
    assert!(
        started.elapsed() < REFUSAL_TIMEOUT,
        "{what} to {address}: closed only after {:?}",
        started.elapsed()
    );
    reply
}

/// The records of `reply` as (content type, payload); panics on a truncated record.
fn records(reply: &[u8], what: &str) -> Vec<(u8, Vec<u8>)> {
    let mut records = Vec::new();
    let mut rest = reply;
    while !rest.is_empty() {
        assert!(
            rest.len() >= 5,
            "{what}: truncated record header {rest:02x?}"
        );
        let length = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        assert!(
            rest.len() >= 5 + length,
            "{what}: truncated record {rest:02x?}"
        );
        records.push((rest[0], rest[5..5 + length].to_vec()));
        rest = &rest[5 + length..];
    }
    records
}

/// The server refused: nothing but alerts came back (at most one, fatal), no handshake
/// record. Returns the alert's description, if one was sent.
fn assert_refused(reply: &[u8], what: &str) -> Option<u8> {
    let records = records(reply, what);
    assert!(
        records.iter().all(|(kind, _)| *kind != CONTENT_HANDSHAKE),
        "{what}: the server answered with a handshake: {reply:02x?}"
    );
    assert!(records.len() <= 1, "{what}: {reply:02x?}");
    let (kind, payload) = records.first()?;
    assert_eq!(*kind, CONTENT_ALERT, "{what}: {reply:02x?}");
    assert_eq!(
        payload.len(),
        2,
        "{what}: an alert is 2 bytes: {reply:02x?}"
    );
    assert_eq!(
        payload[0], ALERT_FATAL,
        "{what}: a fatal alert: {reply:02x?}"
    );
    Some(payload[1])
}

#[test]
fn tls13_and_tls12_handshakes_succeed_on_every_tls_port() {
    let (server, dir) = tls_server();
    for service in TLS_SERVICES {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut stream = handshake(&server, service, version);
            exchange(service, &mut stream);
        }
    }
    let log = common::server_log(&dir);
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn legacy_hellos_and_plaintext_are_refused_and_the_server_keeps_serving() {
    let (mut server, dir) = tls_server();
    // What a TLS 1.0 or 1.1 client sends: no supported_versions, no signature_algorithms
    // (that extension came with TLS 1.2).
    let tls10 = client_hello(0x0301, &LEGACY_SUITES, &legacy_extensions());
    let tls11 = client_hello(0x0302, &LEGACY_SUITES, &legacy_extensions());
    // The same versions from a client that also sends signature_algorithms (as libraries
    // capped at 1.1 by configuration do), and a hello whose supported_versions offers only
    // 1.1 and 1.0.
    let with_sigalgs = |mut extensions: Vec<(u16, Vec<u8>)>| {
        extensions.push((0x000d, vec![0, 8, 4, 3, 8, 4, 4, 1, 2, 1]));
        extensions
    };
    let tls10_sigalgs = client_hello(0x0301, &LEGACY_SUITES, &with_sigalgs(legacy_extensions()));
    let tls11_sigalgs = client_hello(0x0302, &LEGACY_SUITES, &with_sigalgs(legacy_extensions()));
    let mut old_only = with_sigalgs(legacy_extensions());
    old_only.push((0x002b, vec![4, 3, 2, 3, 1]));
    let offers_old_only = client_hello(0x0303, &[0xc02f, 0xc013, 0x002f], &old_only);
    let mut incubator_frame = bytes::BytesMut::new();
    es_proto::incubator::samples::example(es_proto::incubator::MessageType::Hello)
        .encode(&mut incubator_frame);
    let mut viewer_frame = bytes::BytesMut::new();
    es_proto::viewer::encode_frame(
        &es_proto::viewer::pb::ClientMessage {
            seq: 1,
            request: Some(es_proto::viewer::pb::client_message::Request::Ping(
                es_proto::viewer::pb::Ping {},
            )),
        },
        &mut viewer_frame,
    );
    let noise: Vec<u8> = (0..512u32).map(|i| (i * 7919 % 251) as u8).collect();
    let plaintexts: [(&str, &[u8]); 5] = [
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        ),
        (
            "an HTTP POST",
            b"POST /api/v1/login HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        ),
        ("an incubator HELLO frame", &incubator_frame),
        ("a viewer frame", &viewer_frame),
        ("noise", &noise),
    ];

    for service in TLS_SERVICES {
        let address = server.info.address(service);
        // rustls asks for signature_algorithms before it looks at the version, so a hello
        // without it is refused with handshake_failure; with it, with protocol_version.
        for (what, hello, alerts) in [
            (
                "a TLS 1.0 ClientHello",
                &tls10,
                &[ALERT_HANDSHAKE_FAILURE, ALERT_PROTOCOL_VERSION][..],
            ),
            (
                "a TLS 1.1 ClientHello",
                &tls11,
                &[ALERT_HANDSHAKE_FAILURE, ALERT_PROTOCOL_VERSION],
            ),
            (
                "a TLS 1.0 ClientHello with signature_algorithms",
                &tls10_sigalgs,
                &[ALERT_PROTOCOL_VERSION],
            ),
            (
                "a TLS 1.1 ClientHello with signature_algorithms",
                &tls11_sigalgs,
                &[ALERT_PROTOCOL_VERSION],
            ),
            (
                "a ClientHello offering only TLS 1.0 and 1.1",
                &offers_old_only,
                &[ALERT_PROTOCOL_VERSION],
            ),
        ] {
            let what = format!("{service}: {what}");
            let reply = send_and_read_until_close(address, hello, &what);
            let alert = assert_refused(&reply, &what);
            assert!(
                alert.is_some_and(|alert| alerts.contains(&alert)),
                "{what}: a fatal alert {alerts:?}: {reply:02x?}"
            );
        }
        for (what, bytes) in plaintexts {
            let what = format!("{service}: {what}");
            let reply = send_and_read_until_close(address, bytes, &what);
            assert_refused(&reply, &what);
        }
    }

    // Still up, and serving legitimate clients on every port.
    assert!(server.is_running(), "{}", common::server_log(&dir));
    for service in TLS_SERVICES {
        let mut stream = handshake(&server, service, &rustls::version::TLS13);
        exchange(service, &mut stream);
    }
    let mut identity = common::identity("ESP-TLS-1", "es-plus");
    let mut incubator = common::connect(&server, &mut identity);
    let ping = es_proto::incubator::Message::Ping(es_proto::incubator::pb::Ping { seq: 0 });
    let answer = incubator
        .request(ping, common::TIMEOUT)
        .expect("PING answered");
    assert_eq!(
        answer.message_type(),
        es_proto::incubator::MessageType::Ack,
        "{answer:?}"
    );
    let mut web = HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    );
    assert_eq!(web.get("/healthz", &[]).unwrap().status, 200);
    let log = common::server_log(&dir);
    assert!(!log.contains("panicked"), "{log}");
    assert!(server.is_running(), "{log}");
}

#[test]
fn the_versions_are_named_not_left_to_defaults() {
    let versions: Vec<ProtocolVersion> = es_net::tls::PROTOCOL_VERSIONS
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(
        versions,
        [ProtocolVersion::TLSv1_3, ProtocolVersion::TLSv1_2]
    );
}

/// The generated certificate names the addresses the server listens on, and `esserver tls
/// renew` makes it anew (`[TLS] names` when set), with a new fingerprint, taken at the next
/// start.
#[test]
fn the_generated_certificate_names_its_addresses_and_is_renewed_on_request() {
    let (mut server, dir) = tls_server();
    let cert = server.data_dir().join("tls").join("server.crt");
    let before = es_net::tls::read_certificate(&cert).unwrap();
    let address = server.info.address("viewer").ip().to_string();
    assert!(
        es_net::tls::names_missing(&before, &[address.clone(), "localhost".into()]).is_empty(),
        "the certificate names {address}"
    );
    server.terminate(common::TIMEOUT);
    let config = dir.path().join("renew.ini");
    std::fs::write(
        &config,
        "[TLS]\nnames = esserver.clinic.example, 192.0.2.7\n",
    )
    .unwrap();
    let output = std::process::Command::new(common::esserver_path())
        .args(["tls", "renew", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let after = es_net::tls::read_certificate(&cert).unwrap();
    let fingerprint = es_net::tls::fingerprint(&after);
    assert_ne!(fingerprint, es_net::tls::fingerprint(&before));
    assert!(stdout.contains(&fingerprint), "{stdout}");
    let wanted = [
        "esserver.clinic.example".to_string(),
        "192.0.2.7".to_string(),
    ];
    assert!(
        es_net::tls::names_missing(&after, &wanted).is_empty(),
        "{stdout}"
    );
    assert_eq!(
        es_net::tls::names_missing(&after, std::slice::from_ref(&address)),
        [address],
        "only the names asked for"
    );
}
