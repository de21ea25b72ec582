//! The OpenAPI contract: schemathesis runs against a real server, reading the description the
//! server itself serves at `/api/v1/openapi.json`, and every response must be what the
//! description promises.

mod common;

use es_loadtest::spawn::ServerProcess;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const PASSWORD: &str = "Embryo-2026!";

/// The serial of the fixture's incubator. The examples of `docs/api/openapi.json` name the
/// fixture's data (patient `MRN-ES0042-1`, treatment `2026-1000`, embryos `ES0042_S1_P-1`
/// and `-2`, an acquisition at 1760000001000 ms), so the examples phase of the run reads and
/// writes real resources and checks every success response against the schema.
const SERIAL: &str = "ES0042";

/// Test cases per operation and phase: enough to cover every operation's parameters and
/// bodies, few enough that the run takes well under two minutes on two cores.
const MAX_EXAMPLES: u32 = 50;

/// The schemathesis major version whose command line and configuration this test uses.
const SCHEMATHESIS_MAJOR: &str = "4";

/// A server with users `emr` (edit) and `reader` (view), a write key, and one uploaded dish
/// of 3 embryos with 3 acquisitions each.
struct Fixture {
    server: ServerProcess,
    dir: tempfile::TempDir,
    write_key: String,
}

fn fixture() -> Fixture {
    let (server, dir) = common::spawn(true);
    common::add_user(&server, "emr", "edit", PASSWORD);
    common::add_user(&server, "reader", "view", PASSWORD);
    common::upload_dish(&server, SERIAL, 3);
    let write_key = common::create_api_key(&server, "EMR bridge", "write");
    Fixture {
        server,
        dir,
        write_key,
    }
}

/// The installed schemathesis's version, or None when python3 cannot import it.
fn schemathesis_version() -> Option<String> {
    let output = Command::new("python3")
        .args(["-c", "import schemathesis; print(schemathesis.__version__)"])
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Schemathesis reads the description from the server and generates valid and invalid
/// requests for every operation (the examples, boundary values, random data, and chains of
/// calls following the described links), sends them with a write key, and checks every
/// response: no server error; a documented status, content type and headers; a body that
/// conforms to its schema; invalid requests refused and valid ones accepted; 401 without a
/// credential; 405 with `Allow` for methods a resource does not answer.
#[test]
fn the_served_openapi_description_is_what_the_server_does() {
    let version = schemathesis_version().unwrap_or_else(|| {
        panic!(
            "schemathesis is not installed for python3: run ./scripts/test.sh, which installs \
             tests/python/requirements.txt"
        )
    });
    assert!(
        version.split('.').next() == Some(SCHEMATHESIS_MAJOR),
        "schemathesis {version} is installed, this test needs {SCHEMATHESIS_MAJOR}.x: run \
         ./scripts/test.sh, which installs tests/python/requirements.txt"
    );
    let fx = fixture();
    let address = fx.server.info.address("public-api");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let started = Instant::now();
    // In the fixture's directory: schemathesis and hypothesis keep state in the working one.
    let output = Command::new("python3")
        .current_dir(fx.dir.path())
        .env("SCHEMATHESIS_HOOKS", tests.join("schemathesis_hooks.py"))
        .args(["-m", "schemathesis.cli", "--config-file"])
        .arg(tests.join("schemathesis.toml"))
        .arg("run")
        .arg(format!("https://{address}/api/v1/openapi.json"))
        .args(["--checks", "all"])
        .args(["--max-examples", &MAX_EXAMPLES.to_string()])
        // The server's certificate is self-signed for "localhost", and the run uses 127.0.0.1.
        .args(["--tls-verify", "false"])
        .args([
            "--header",
            &format!("Authorization: Bearer {}", fx.write_key),
        ])
        .args(["--generation-database", "none", "--no-color"])
        .output()
        .expect("python3 -m schemathesis.cli runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    println!(
        "schemathesis {version} took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let log = common::server_log(&fx.dir);
    let problems: Vec<&str> = log
        .lines()
        .filter(|line| line.contains(" ERROR ") || line.contains("panicked"))
        .collect();
    assert!(
        output.status.success(),
        "schemathesis found the server and its description disagree ({}):\n{stdout}\n{stderr}\n\
         errors in the server's log:\n{}",
        output.status,
        problems.join("\n")
    );
    assert!(
        problems.is_empty(),
        "errors in the server's log:\n{}",
        problems.join("\n")
    );
}
