//! Licence enforcement against a real server with a trusted signing key configured: without
//! a valid licence the viewer port and the public API refuse clients with the reason while
//! incubators keep uploading; a tampered licence is refused; installing a valid one applies
//! at once, without a restart; viewer computers are limited to those the licence names and to
//! its configuration's count.

mod common;

use es_loadtest::http_client::HttpClient;
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient, ViewerError};
use es_proto::viewer::ErrorCode;
use std::path::Path;
use std::process::{Command, Output};

const PASSWORD: &str = "Embryo-2026!";

fn esserver(args: &[&str], data_dir: Option<&Path>) -> Output {
    let mut command = Command::new(common::esserver_path());
    command.args(args);
    if let Some(dir) = data_dir {
        command.arg("--data").arg(dir);
    }
    command.output().expect("esserver runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn login(server: &ServerProcess, computer: &str) -> Result<ViewerClient, ViewerError> {
    ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "anna".into(),
            password: PASSWORD.into(),
            computer: computer.into(),
        },
        common::TIMEOUT,
    )
}

fn refused_with(result: Result<ViewerClient, ViewerError>, code: ErrorCode) -> String {
    match result {
        Err(error @ ViewerError::Server { .. }) => {
            assert_eq!(error.error_code(), Some(code), "{error}");
            error.to_string()
        }
        Err(other) => panic!("expected {code:?}, got {other}"),
        Ok(_) => panic!("expected {code:?}, the login was accepted"),
    }
}

#[test]
fn no_valid_licence_refuses_clients_until_one_is_installed() {
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let info = esserver(&["info"], Some(server.data_dir()));
    let server_id = server.info.server_id.clone();
    assert!(
        stdout(&info).contains(&server_id),
        "esserver info prints the server id"
    );

    // No licence: viewers and the public API are refused with the reason ...
    let message = refused_with(login(&server, "LAB-1"), ErrorCode::LicenseInvalid);
    assert!(message.contains("no licence is installed"), "{message}");
    let output = esserver(
        &["apikey", "create", "--name", "EMR", "--scope", "read"],
        Some(server.data_dir()),
    );
    let key = stdout(&output)
        .lines()
        .find(|l| l.starts_with("esk_"))
        .unwrap()
        .to_string();
    let mut http = HttpClient::new(
        server.info.address("public-api"),
        server.info.client_tls("public-api"),
        common::TIMEOUT,
    );
    let auth = format!("Bearer {key}");
    let refused = http
        .get("/api/v1/patients", &[("authorization", &auth)])
        .unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["code"], "license_invalid");
    let legacy = http.get("/LOGIN?username=anna&password=x", &[]).unwrap();
    assert_eq!(legacy.status, 503);
    // ... while incubators keep uploading: culture data is never turned away.
    common::upload_dish(&server, "LIC-1", 2);

    // A licence changed after signing is refused, with its reason, and changes nothing.
    let file = issuer.issue(&server, "basic", &["LAB-1", "LAB-2"], "clinic.lic");
    let text = std::fs::read_to_string(&file).unwrap();
    let tampered = file.with_file_name("tampered.lic");
    std::fs::write(&tampered, text.replacen("Clinic A", "Clinic B", 1)).unwrap();
    let install = issuer.install(&server, &tampered);
    assert!(!install.status.success());
    let stderr = String::from_utf8_lossy(&install.stderr);
    assert!(stderr.contains("signature does not match"), "{stderr}");
    refused_with(login(&server, "LAB-1"), ErrorCode::LicenseInvalid);

    // The valid licence applies at once, without a restart.
    let install = issuer.install(&server, &file);
    assert!(install.status.success(), "{install:?}");
    let ok = http
        .get("/api/v1/patients", &[("authorization", &auth)])
        .unwrap();
    assert_eq!(ok.status, 200);
    let lab1 = login(&server, "LAB-1").expect("a licensed computer logs in");

    // Only the computers it names, and only as many as basic allows (1).
    let message = refused_with(login(&server, "LAB-9"), ErrorCode::ComputerNotLicensed);
    assert!(message.contains("not named in the licence"), "{message}");
    let message = refused_with(login(&server, "LAB-2"), ErrorCode::ComputerNotLicensed);
    assert!(
        message.contains("basic configuration allows 1"),
        "{message}"
    );
    drop(lab1);
    // Once LAB-1 is gone, LAB-2 may connect.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    loop {
        match login(&server, "LAB-2") {
            Ok(_) => break,
            Err(error) if std::time::Instant::now() < deadline => {
                assert_eq!(error.error_code(), Some(ErrorCode::ComputerNotLicensed));
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(error) => panic!("LAB-2 still refused: {error}"),
        }
    }
}

/// A viewer computer replaced (a new name) is handled by a licence update; its users' data
/// is theirs, not the computer's, so nothing is lost.
#[test]
fn a_renamed_viewer_computer_is_a_licence_update_and_loses_nothing() {
    use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "LIC-2", 1);
    let issue = |computer: &str, file: &str| {
        let path = issuer.issue(&server, "basic", &[computer], file);
        let install = issuer.install(&server, &path);
        assert!(install.status.success(), "{install:?}");
    };
    issue("LAB-OLD", "old.lic");
    let embryo_id = format!("{}_S1_P-1", workload.serial);
    let mut old = login(&server, "LAB-OLD").unwrap();
    let Body::Embryo(embryo) = old
        .call(Request::GetEmbryo(pb::GetEmbryo {
            embryo_id: embryo_id.clone(),
        }))
        .unwrap()
    else {
        panic!("an embryo")
    };
    let saved = old
        .call(Request::AddAnnotation(pb::AddAnnotation {
            embryo_id: embryo_id.clone(),
            expected_version: embryo.version,
            annotation: Some(pb::AnnotationInput {
                name: "FRAG".into(),
                value: "2".into(),
                source: "manual".into(),
                ..Default::default()
            }),
        }))
        .unwrap();
    assert!(matches!(saved, Body::Saved(_)), "{saved:?}");
    drop(old);

    // The computer is replaced: the licence names the new one.
    issue("LAB-NEW", "new.lic");
    refused_with(login(&server, "LAB-OLD"), ErrorCode::ComputerNotLicensed);
    let mut new = login(&server, "LAB-NEW").expect("the new computer logs in");
    let Body::Embryo(embryo) = new
        .call(Request::GetEmbryo(pb::GetEmbryo { embryo_id }))
        .unwrap()
    else {
        panic!("an embryo")
    };
    assert!(
        embryo
            .annotations
            .iter()
            .any(|a| a.name == "FRAG" && a.set_by == "anna"),
        "the annotation made on the old computer is there"
    );
}

/// The manual's configuration table at HELLO: basic has 2 capacity units; high capacity 16
/// units and at most 8 EmbryoScope+/Flex (an EmbryoScope+/Flex takes 2 units, other models
/// 1). A refused instrument is told the configuration and the current use.
#[test]
fn instruments_over_the_configuration_are_refused_at_hello() {
    use es_loadtest::client::IncubatorClient;
    use es_proto::incubator::ErrorCode as IncubatorCode;
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    let install = |configuration: &str, file: &str| {
        let path = issuer.issue(&server, configuration, &[], file);
        let done = issuer.install(&server, &path);
        assert!(done.status.success(), "{done:?}");
    };
    let connect = |serial: &str, model: &str| {
        let mut identity = common::identity(serial, model);
        IncubatorClient::connect(
            server.info.address("incubator"),
            &server.info.client_tls("incubator"),
            &mut identity,
            common::TIMEOUT,
        )
    };
    let refused = |result: Result<IncubatorClient, _>| match result {
        Err(error @ es_loadtest::client::ClientError::Server { .. }) => {
            assert_eq!(error.error_code(), Some(IncubatorCode::CapacityExceeded));
            error.to_string()
        }
        Err(other) => panic!("expected capacity_exceeded, got {other}"),
        Ok(_) => panic!("expected capacity_exceeded, the instrument was admitted"),
    };

    // Without a licence nothing is refused: culture data is never turned away.
    let free: Vec<_> = (0..3)
        .map(|n| connect(&format!("FREE-{n}"), "es-plus").expect("admitted"))
        .collect();
    drop(free);

    install("basic", "basic.lic");
    let mut plus_identity = common::identity("B-PLUS", "es-plus");
    let plus = IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut plus_identity,
        common::TIMEOUT,
    )
    .expect("an EmbryoScope+ fits basic (2 units)");
    let message = refused(connect("B-D", "es-d"));
    assert!(message.contains("basic configuration"), "{message}");
    assert!(message.contains("3 of 2 capacity units"), "{message}");
    // A known instrument refused for capacity changes nothing stored (checked at the end).
    refused(connect("FREE-0", "es-d"));
    // The same instrument connecting again (with the secret it was issued) takes no more room.
    let again = IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut plus_identity,
        common::TIMEOUT,
    )
    .expect("a reconnect replaces its connection");
    drop((plus, again));
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let d1 = loop {
        match connect("B-D1", "es-d") {
            Ok(client) => break client,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            Err(error) => panic!("room was not freed: {error}"),
        }
    };
    let d2 = connect("B-D2", "culturepro").expect("two 1-unit instruments fit basic");
    refused(connect("B-D3", "es-8"));
    drop((d1, d2));

    install("high-capacity", "high.lic");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let pluses: Vec<_> = (0..8)
        .map(|n| {
            connect(&format!("H-PLUS-{n}"), "es-flex")
                .or_else(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    connect(&format!("H-PLUS-{n}"), "es-flex")
                })
                .expect("8 EmbryoScope+/Flex fit high capacity")
        })
        .collect();
    let message = refused(connect("H-PLUS-8", "es-plus"));
    assert!(message.contains("high-capacity configuration"), "{message}");
    assert_eq!(pluses.len(), 8);
    drop(pluses);
    let mut server = server;
    server.terminate(common::TIMEOUT);
    let store =
        es_storage::Store::open_read_only(server.data_dir(), &es_storage::StoreOptions::default())
            .unwrap();
    let instruments = store.read().unwrap().instruments().unwrap();
    let free = instruments.iter().find(|i| i.serial == "FREE-0").unwrap();
    assert_eq!(
        free.model, "es-plus",
        "the refused HELLO rewrote the stored model"
    );
}

/// `license issue` refuses an expiry day that is past, and says a licence's expiry as its
/// last valid day (`--expires 2031-12-31` is valid through that day, not "2032-01-01 00:00").
#[test]
fn license_issue_refuses_a_past_expiry_and_names_the_last_valid_day() {
    let issuer = common::Issuer::new();
    let out = tempfile::tempdir().unwrap();
    let base = |expires: &str, file: &str| {
        let mut command = issuer.issue_command();
        command
            .args(["--server-id", "0123456789abcdef0123456789abcdef"])
            .args(["--clinic", "Clinic A", "--configuration", "basic"])
            .args(["--computer", "LAB-1", "--expires", expires, "--out"])
            .arg(out.path().join(file));
        command.output().unwrap()
    };
    let past = base("2020-01-01", "past.lic");
    assert!(!past.status.success());
    let message = String::from_utf8_lossy(&past.stderr);
    assert!(message.contains("past"), "{message}");
    assert!(!out.path().join("past.lic").exists());
    let good = base("2031-12-31", "good.lic");
    assert!(good.status.success(), "{good:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&good.stdout),
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(text.contains("valid through 2031-12-31 (UTC)"), "{text}");
    assert!(!text.contains("2032-01-01"), "{text}");
}

/// Installing a licence smaller than what is connected works (culture data is never turned
/// away) but says so: the instruments keep their connections, and the answer and the log
/// warn that those reconnecting beyond the licence will be refused.
#[test]
fn a_licence_smaller_than_what_is_connected_is_installed_with_a_warning() {
    use es_loadtest::client::IncubatorClient;
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    let connected: Vec<IncubatorClient> = (0..3)
        .map(|n| {
            let mut identity = common::identity(&format!("OVER-{n}"), "es-plus");
            common::connect(&server, &mut identity)
        })
        .collect();
    let path = issuer.issue(&server, "basic", &[], "basic.lic");
    let done = issuer.install(&server, &path);
    assert!(done.status.success(), "{done:?}");
    let answer = String::from_utf8_lossy(&done.stdout);
    assert!(answer.contains("installed; it applies now"), "{answer}");
    assert!(answer.contains("WARNING"), "{answer}");
    assert!(answer.contains("6 of 2 capacity units"), "{answer}");
    assert!(answer.contains("capacity_exceeded"), "{answer}");
    assert!(
        common::server_log(&dir).contains("exceed the licence's basic configuration"),
        "the log warns too"
    );
    assert_eq!(connected.len(), 3);
}
