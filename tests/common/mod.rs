//! Shared by the integration tests: a real `esserver` process on loopback, free ports and a
//! temporary data directory, stopped by PID when the test ends.

#![allow(dead_code)]

use es_loadtest::client::{Identity, IncubatorClient};
use es_loadtest::spawn::{ServerProcess, SpawnOptions};
use std::path::PathBuf;
use std::time::Duration;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn esserver_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_esserver"))
}

/// A server on a fresh temporary data directory (kept alive by the returned guard).
pub fn spawn(incubator_tls: bool) -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = spawn_in(&dir, incubator_tls, "");
    (server, dir)
}

pub fn spawn_in(dir: &tempfile::TempDir, incubator_tls: bool, extra_config: &str) -> ServerProcess {
    let mut options = SpawnOptions::new(esserver_path(), dir.path().join("data"));
    options.incubator_tls = incubator_tls;
    options.extra_config = extra_config.to_string();
    options.log_file = Some(dir.path().join("server.log"));
    if let Ok(level) = std::env::var("ESSERVER_TEST_LOG") {
        options.log_level = level;
    }
    ServerProcess::spawn(options).expect("esserver starts")
}

pub fn server_log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
}

pub fn identity(serial: &str, model: &str) -> Identity {
    Identity {
        serial: serial.into(),
        model: model.into(),
        firmware: "test-1.0".into(),
        secret: String::new(),
    }
}

pub fn connect(server: &ServerProcess, identity: &mut Identity) -> IncubatorClient {
    IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        identity,
        TIMEOUT,
    )
    .expect("incubator connects")
}
