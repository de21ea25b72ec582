//! Bad input and hostile or confused devices: a malformed frame from one incubator while
//! fifteen others keep uploading; wrong secrets; a second HELLO of a serial; a database
//! from a newer esserver.

mod common;

use es_loadtest::client::{ClientError, Identity, IncubatorClient};
use es_loadtest::sim::{self, Pacing, Workload};
use es_loadtest::spawn::ServerProcess;
use es_perf::catalog::DeviceModel;
use es_proto::incubator::{pb, ErrorCode, Message};
use std::time::{Duration, Instant};

#[test]
fn a_malformed_frame_closes_one_incubator_while_fifteen_keep_uploading() {
    let (server, dir) = common::spawn(true);
    let frames = std::sync::Arc::new(es_loadtest::frames::generate(4, 3));
    let start = std::sync::Arc::new(std::sync::Barrier::new(16));
    let good: Vec<_> = (0..15)
        .map(|n| {
            let address = server.info.address("incubator");
            let tls = server.info.client_tls("incubator");
            let frames = frames.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                let serial = format!("GOOD-{n:02}");
                let mut identity = common::identity(&serial, "es-d");
                let mut client =
                    IncubatorClient::connect(address, &tls, &mut identity, common::TIMEOUT)
                        .unwrap();
                let workload =
                    Workload::full(&serial, DeviceModel::EmbryoScopeD, 1, 1_760_000_000_000);
                sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
                start.wait();
                let deadline = Instant::now() + Duration::from_secs(240);
                sim::upload(
                    &mut client,
                    &workload,
                    0..300,
                    &frames,
                    Pacing::Window,
                    deadline,
                )
            })
        })
        .collect();

    let mut identity = common::identity("BAD-01", "es-d");
    let mut bad = common::connect(&server, &mut identity);
    start.wait();
    // A frame announcing 5 bytes of type IMAGE whose payload is not protobuf.
    bad.send_raw(&[0, 0, 0, 6, 4, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
    let error = loop {
        match bad.next_response(Instant::now() + common::TIMEOUT) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no answer to a malformed frame"),
            Err(error) => break error,
        }
    };
    match &error {
        ClientError::Server { seq: 0, name, .. } => assert_eq!(name, "malformed_frame"),
        other => panic!("expected ERROR malformed_frame, got {other:?}"),
    }
    for (n, thread) in good.into_iter().enumerate() {
        let (stats, error) = thread.join().unwrap();
        assert!(error.is_none(), "incubator {n}: {error:?}");
        assert!(stats.errors.is_empty(), "incubator {n}: {:?}", stats.errors);
        assert_eq!(stats.acked, 300, "incubator {n} lost acks");
    }
    let log = common::server_log(&dir);
    let line = log
        .lines()
        .find(|line| line.contains("BAD-01") && line.contains("malformed_frame"));
    assert!(
        line.is_some(),
        "the server log names the incubator and the error:\n{log}"
    );
}

#[test]
fn wrong_secret_is_refused_and_an_admin_reset_issues_a_new_one() {
    let (server, dir) = common::spawn(false);
    let mut identity = common::identity("SEC-01", "es-8");
    let client = common::connect(&server, &mut identity);
    let secret = identity.secret.clone();
    assert_eq!(secret.len(), 48);
    drop(client);

    // Presenting the issued secret confirms it; no new one is issued.
    let mut owner = identity.clone();
    let client = common::connect(&server, &mut owner);
    assert_eq!(
        owner.secret, secret,
        "no new secret for a confirmed instrument"
    );
    drop(client);

    let mut impostor = common::identity("SEC-01", "es-8");
    impostor.secret = "not-the-secret".into();
    let refused = IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut impostor,
        common::TIMEOUT,
    );
    match refused {
        Err(error) => assert_eq!(error.error_code(), Some(ErrorCode::AuthFailed), "{error}"),
        Ok(_) => panic!("a wrong secret must be refused"),
    }
    let mut no_secret = common::identity("SEC-01", "es-8");
    let refused = IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut no_secret,
        common::TIMEOUT,
    );
    assert!(
        matches!(refused, Err(ref e) if e.error_code() == Some(ErrorCode::AuthFailed)),
        "once confirmed, a serial must present its secret"
    );

    let output = common::admin(server.data_dir(), &["instrument", "reset-secret", "SEC-01"]);
    assert!(
        output.status.success(),
        "reset-secret failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut fresh = common::identity("SEC-01", "es-8");
    let _client = common::connect(&server, &mut fresh);
    assert!(
        !fresh.secret.is_empty() && fresh.secret != secret,
        "a reset instrument is issued a new secret"
    );
    let log = common::server_log(&dir);
    assert!(
        log.contains("SEC-01") && log.contains("auth_failed"),
        "refusals are logged:\n{log}"
    );
}

/// Connects as an instrument retries: again after a short backoff while the server answers
/// `enrolment_in_progress` (an earlier connection of the serial is still open on its side).
fn connect_retrying(server: &ServerProcess, identity: &mut Identity) -> IncubatorClient {
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let attempt = IncubatorClient::connect(
            server.info.address("incubator"),
            &server.info.client_tls("incubator"),
            identity,
            common::TIMEOUT,
        );
        match attempt {
            Ok(client) => return client,
            Err(error)
                if error.error_code() == Some(ErrorCode::EnrolmentInProgress)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("incubator connects: {error}"),
        }
    }
}

#[test]
fn a_lost_hello_ok_does_not_lock_the_instrument_out() {
    let (server, _dir) = common::spawn(false);
    let mut first = common::identity("LOST-01", "es-d");
    drop(common::connect(&server, &mut first));
    assert!(!first.secret.is_empty());
    // The instrument never stored that secret (its HELLO_OK was lost) and says HELLO again,
    // once the server has seen the first connection close.
    let mut again = common::identity("LOST-01", "es-d");
    drop(connect_retrying(&server, &mut again));
    assert!(
        !again.secret.is_empty() && again.secret != first.secret,
        "a fresh secret is issued"
    );
    // The fresh one confirms; the first, never confirmed, is refused from now on.
    let mut confirmed = again.clone();
    drop(common::connect(&server, &mut confirmed));
    assert_eq!(confirmed.secret, again.secret);
    let refused = IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut first,
        common::TIMEOUT,
    );
    assert!(matches!(refused, Err(ref e) if e.error_code() == Some(ErrorCode::AuthFailed)));
}

#[test]
fn an_instrument_that_was_issued_a_secret_cannot_be_taken_over_while_it_is_connected() {
    let (server, dir) = common::spawn(false);
    let mut real = common::identity("TAKE-01", "es-plus");
    // Issued a secret; it has sent no request yet, so the secret is not confirmed.
    let mut real_connection = common::connect(&server, &mut real);
    assert!(!real.secret.is_empty());
    let connect = |identity: &mut Identity| {
        IncubatorClient::connect(
            server.info.address("incubator"),
            &server.info.client_tls("incubator"),
            identity,
            common::TIMEOUT,
        )
    };
    // Another device with the same serial number and no secret (or the empty one the real
    // instrument first presented) is refused, and nothing changes.
    for attempt in 0..3 {
        let mut impostor = common::identity("TAKE-01", "es-plus");
        match connect(&mut impostor) {
            Err(error) => assert_eq!(
                error.error_code(),
                Some(ErrorCode::EnrolmentInProgress),
                "attempt {attempt}: {error}"
            ),
            Ok(_) => panic!("attempt {attempt}: the impostor was accepted"),
        }
        assert!(impostor.secret.is_empty(), "no secret was issued to it");
    }
    // The real instrument was not superseded: its first request is answered.
    let reply = real_connection
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .expect("the real instrument still works");
    assert!(matches!(reply, Message::Ack(_)), "{reply:?}");
    // That request confirmed its secret: from now on only the secret opens the serial.
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let mut impostor = common::identity("TAKE-01", "es-plus");
        let error = match connect(&mut impostor) {
            Err(error) => error,
            Ok(_) => panic!("the impostor was accepted after the confirmation"),
        };
        match error.error_code() {
            Some(ErrorCode::AuthFailed) => break,
            // The confirmation's commit may still be on its way.
            Some(ErrorCode::EnrolmentInProgress) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("unexpected {other:?}: {error}"),
        }
    }
    let reply = real_connection
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .expect("the real instrument still works");
    assert!(matches!(reply, Message::Ack(_)), "{reply:?}");
    // The real instrument reconnects with its secret and keeps it.
    let secret = real.secret.clone();
    drop(real_connection);
    let mut again = real.clone();
    drop(common::connect(&server, &mut again));
    assert_eq!(
        again.secret, secret,
        "no new secret for the confirmed instrument"
    );
    let log = common::server_log(&dir);
    assert!(
        log.contains("enrolment_in_progress"),
        "refusals are logged:\n{log}"
    );
}

#[test]
fn with_approval_a_new_serial_waits_until_an_administrator_approves_it() {
    let dir = tempfile::tempdir().unwrap();
    // One instrument is enrolled while enrolment is open; then the server requires approval.
    let server = common::spawn_in(&dir, false, "");
    let mut known = common::identity("APPR-KNOWN", "es-d");
    let mut known_connection = common::connect(&server, &mut known);
    known_connection
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .unwrap();
    drop(known_connection);
    drop(server);
    let server = common::spawn_in(&dir, false, "[IncubatorTransport]\nenrolment = approve\n");
    let instruments_before =
        common::admin_json(server.data_dir(), &["status"])["storage"]["instruments"].clone();
    assert_eq!(instruments_before, 1);
    let connect = |identity: &mut Identity| {
        IncubatorClient::connect(
            server.info.address("incubator"),
            &server.info.client_tls("incubator"),
            identity,
            common::TIMEOUT,
        )
    };
    // The enrolled instrument keeps connecting with its secret.
    drop(common::connect(&server, &mut known));
    // A new serial is refused with a typed code, whatever secret it presents; nothing is
    // stored and no secret issued.
    for secret in ["", "made-up"] {
        let mut new = common::identity("APPR-NEW", "es-plus");
        new.secret = secret.into();
        match connect(&mut new) {
            Err(error) => assert_eq!(
                error.error_code(),
                Some(ErrorCode::EnrolmentPending),
                "{error}"
            ),
            Ok(_) => panic!("an unapproved serial was accepted"),
        }
        assert_eq!(new.secret, secret, "no secret issued");
    }
    let status = common::admin_json(server.data_dir(), &["status"]);
    assert_eq!(status["storage"]["instruments"], instruments_before);
    // The administrator approves it from the command line; its next HELLO is enrolled.
    let output = common::admin(server.data_dir(), &["instrument", "approve", "APPR-NEW"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("APPR-NEW is approved"), "{said}");
    let again = common::admin(server.data_dir(), &["instrument", "approve", "APPR-NEW"]);
    assert!(!again.status.success(), "approving twice is refused");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already enrolled"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let mut new = common::identity("APPR-NEW", "es-plus");
    let mut connection = common::connect(&server, &mut new);
    assert!(
        !new.secret.is_empty(),
        "the approved instrument is issued a secret"
    );
    connection
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .unwrap();
    let log = common::server_log(&dir);
    assert!(
        log.contains("enrolment_pending"),
        "refusals are logged:\n{log}"
    );
}

#[test]
fn a_second_hello_of_a_serial_closes_the_older_connection() {
    let (server, _dir) = common::spawn(false);
    let mut identity = common::identity("DUP-01", "es-plus");
    let mut first = common::connect(&server, &mut identity);
    let mut second = common::connect(&server, &mut identity);
    let error = loop {
        match first.next_response(Instant::now() + common::TIMEOUT) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the older connection was not closed"),
            Err(error) => break error,
        }
    };
    assert_eq!(error.error_code(), Some(ErrorCode::Superseded), "{error}");
    let reply = second
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .unwrap();
    assert!(
        matches!(reply, Message::Ack(_)),
        "the newer connection works: {reply:?}"
    );
}

#[test]
fn a_database_from_a_newer_esserver_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "");
    assert_eq!(
        server.terminate(Duration::from_secs(30)),
        Some(0),
        "clean shutdown exits 0"
    );
    let data = server.data_dir().to_path_buf();
    drop(server);
    es_storage::set_schema_version_for_tests(&data, es_storage::Store::SCHEMA_VERSION + 1).unwrap();
    let options = es_loadtest::spawn::SpawnOptions {
        log_file: Some(dir.path().join("newer.log")),
        ..es_loadtest::spawn::SpawnOptions::new(common::esserver_path(), data)
    };
    let result = es_loadtest::spawn::ServerProcess::spawn(options);
    assert!(
        result.is_err(),
        "the server must not start on a newer schema"
    );
    let log = std::fs::read_to_string(dir.path().join("newer.log")).unwrap();
    assert!(
        log.contains("newer than this esserver supports"),
        "clear message expected:\n{log}"
    );
}

#[test]
fn silent_connections_get_handshake_and_idle_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(
        &dir,
        false,
        "[Limits]\nhandshake_timeout_ms = 300\nidle_timeout_ms = 1000\n",
    );
    // No HELLO at all: ERROR handshake_timeout (seq 0), then the connection closes.
    let address = server.info.address("incubator");
    let mut silent = es_net::client::ClientConn::connect(
        address,
        &es_net::client::ClientTls::Plain,
        common::TIMEOUT,
    )
    .unwrap();
    let deadline = Instant::now() + common::TIMEOUT;
    while !silent.is_eof() && Instant::now() < deadline {
        silent.pump(deadline).unwrap();
    }
    assert!(
        silent.is_eof(),
        "the server closes a connection without HELLO"
    );
    let mut decoder =
        es_proto::incubator::FrameDecoder::new(es_proto::incubator::FRAME_BYTES_MAX_DEFAULT);
    let frame = decoder.decode(silent.input()).unwrap();
    let Some(Message::Error(error)) = frame else {
        panic!("expected ERROR, got {frame:?}")
    };
    assert_eq!((error.seq, error.name.as_str()), (0, "handshake_timeout"));

    // HELLO, then silence: ERROR idle_timeout once nothing arrived for the idle limit.
    let mut identity = common::identity("IDLE-01", "es-d");
    let mut client = common::connect(&server, &mut identity);
    let started = Instant::now();
    let error = loop {
        match client.next_response(Instant::now() + common::TIMEOUT) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no idle timeout"),
            Err(error) => break error,
        }
    };
    assert_eq!(error.error_code(), Some(ErrorCode::IdleTimeout), "{error}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the idle limit"
    );
    let log = common::server_log(&dir);
    assert!(
        log.contains("IDLE-01") && log.contains("idle_timeout"),
        "{log}"
    );
}

#[test]
fn below_the_disk_reserve_writes_get_disk_full_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    // A reserve no test machine has free: the server starts in the refusing state.
    let server = common::spawn_in(&dir, false, "[Storage]\nreserve_bytes = 16000 GiB\n");
    let mut identity = common::identity("FULL-01", "es-d");
    let mut client = common::connect(&server, &mut identity);
    let workload = Workload::full("FULL-01", DeviceModel::EmbryoScopeD, 1, 1_760_000_000_000);
    let dish = workload.dish_registrations().remove(0);
    let reply = client
        .request(Message::RegisterDish(dish.clone()), common::TIMEOUT)
        .unwrap();
    let Message::Error(error) = reply else {
        panic!("expected disk_full, got {reply:?}")
    };
    assert_eq!(error.name, "disk_full");
    // The connection stays usable and reads are answered.
    let reply = client
        .request(
            Message::SyncState(pb::SyncState {
                seq: 0,
                dish_id: dish.dish_id,
            }),
            common::TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Message::SyncStateResult(ref r) if !r.known),
        "{reply:?}"
    );
    let reply = client
        .request(Message::Ping(pb::Ping { seq: 0 }), common::TIMEOUT)
        .unwrap();
    assert!(matches!(reply, Message::Ack(_)));
    let log = common::server_log(&dir);
    assert!(
        log.contains("reserve_bytes"),
        "the log says why writes are refused:\n{log}"
    );
}
