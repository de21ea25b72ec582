//! The protocol documents are enough to write a client: a Python client written only from
//! `docs/protocol/incubator.md` and `incubator.proto` runs its scenario (register, pipelined
//! uploads, duplicates, conflicts, SYNC_STATE, secrets, bad frames) against a real server,
//! over TLS with the certificate pinned and over plain TCP. `scripts/test.sh` installs the
//! Python packages it needs (tests/python/requirements.txt).

mod common;

use std::path::Path;
use std::process::Command;

fn run_python_client(incubator_tls: bool) {
    let (server, _dir) = common::spawn(incubator_tls);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let address = server.info.address("incubator");
    let mut command = Command::new("python3");
    command
        .arg(root.join("tests/python/incubator_client_test.py"))
        .arg("--host")
        .arg(address.ip().to_string())
        .arg("--port")
        .arg(address.port().to_string())
        .arg("--proto-dir")
        .arg(root.join("docs/protocol"));
    if incubator_tls {
        command
            .arg("--tls")
            .arg("--cert")
            .arg(&server.info.certificate);
    }
    let output = command
        .output()
        .expect("python3 runs (scripts/test.sh installs its packages)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("PASS: all checks passed"),
        "the scenario ran to its end:\n{stdout}"
    );
}

#[test]
fn python_client_from_the_documents_alone_over_tls() {
    run_python_client(true);
}

#[test]
fn python_client_from_the_documents_alone_over_plain_tcp() {
    run_python_client(false);
}
