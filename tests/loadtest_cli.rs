//! The load generator's `run`, `saturate` and `catch-up` as a user runs them, briefly: each
//! spawns its own server, writes its JSON and plot, and says what it measured. Pass or fail
//! against the targets is not asserted here (a shared test machine is noisy); the shape and
//! the arithmetic of the reports are.

mod common;

use std::path::PathBuf;
use std::process::Command;

/// `loadtest`, built beside `esserver` by `cargo build --workspace`.
fn loadtest() -> PathBuf {
    let path = common::esserver_path().with_file_name("loadtest");
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace --release)",
        path.display()
    );
    path
}

fn run(args: &[&str], dir: &tempfile::TempDir) -> (i32, String, serde_json::Value) {
    let json = dir.path().join("report.json");
    let output = Command::new(loadtest())
        .args(args)
        .arg("--esserver")
        .arg(common::esserver_path())
        .arg("--scratch")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let code = output.status.code().unwrap_or(-1);
    assert!(code == 0 || code == 2, "exit {code}: {stdout}\n{stderr}");
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (code, stdout + &stderr, report)
}

#[test]
fn run_reports_every_operation_with_progress_json_and_a_plot() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("run.svg");
    let (code, output, report) = run(
        &[
            "run",
            "--devices",
            "es-plus:2,es-d:1,viewer:1,browser:1",
            "--speedup",
            "5",
            "--duration",
            "4s",
            "--spawn-server",
            "--plot",
            plot.to_str().unwrap(),
        ],
        &dir,
    );
    assert!(
        output.contains("[   2 s/4 s] offered"),
        "progress lines: {output}"
    );
    assert!(
        output.contains("image_ack.p99_ms_max: measured"),
        "{output}"
    );
    // es-plus 4.4 images/s x 2 + es-d 504 images per 10 min (the catalog), x 5.
    let offered = report["offered_per_s"].as_f64().unwrap();
    assert!(
        (offered - 5.0 * (2.0 * 4.4 + 0.84)).abs() < 0.01,
        "{offered}"
    );
    let names: Vec<&str> = report["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"image_ack")
            && names.contains(&"viewer_frame_fetch")
            && names.contains(&"browser_first_frame")
            && names.contains(&"browser_playback"),
        "{names:?}"
    );
    // The browser opened an embryo (its first frame on screen) and played it.
    assert!(
        report["browsers"]["playbacks"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(output.contains("browsers: 1 playing 60 frames"), "{output}");
    assert!(
        output.contains("browser_first_frame.p99_ms_max: measured"),
        "{output}"
    );
    assert!(
        report["live"]["images_acked"].as_u64().unwrap() > 50,
        "{report}"
    );
    assert!(report["timeline"].as_array().unwrap().len() >= 3);
    // Every device sends telemetry from the start (message 0 raises an alarm), acknowledged.
    assert!(
        report["live"]["telemetry_acked"].as_u64().unwrap() >= 3,
        "{report}"
    );
    assert!(report["live"]["alarms_sent"].as_u64().unwrap() >= 3);
    assert!(output.contains("telemetry: "), "{output}");
    assert_eq!(report["pass"].as_bool().unwrap(), code == 0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("image_ack"));
    // Nothing is left behind but what the test itself wrote.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn run_compares_the_same_load_with_a_setting_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (code, output, report) = run(
        &[
            "run",
            "--devices",
            "es-plus:1",
            "--speedup",
            "20",
            "--duration",
            "3s",
            "--spawn-server",
            "--compare-setting",
            "Server.activity=off",
        ],
        &dir,
    );
    assert!(
        output.contains("comparison (A: as configured, B: with Server.activity=off)"),
        "{output}"
    );
    assert!(output.contains("images analysed"), "{output}");
    // The first server computes activity curves (the default), the second does not.
    assert!(
        report["run"]["server_activity"]["images_analysed"].is_u64(),
        "{report}"
    );
    assert!(
        report["compared"]["report"]["server_activity"].is_null(),
        "{report}"
    );
    assert_eq!(report["compared"]["settings"][0], "Server.activity=off");
    let both = report["run"]["pass"].as_bool().unwrap()
        && report["compared"]["report"]["pass"].as_bool().unwrap();
    assert_eq!(both, code == 0);
}

#[test]
fn saturate_steps_up_and_catch_up_uploads_a_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (_, output, report) = run(
        &[
            "saturate",
            "--devices",
            "es-plus:2",
            "--start",
            "2",
            "--factor",
            "2",
            "--step",
            "2s",
            "--max-duration",
            "7s",
        ],
        &dir,
    );
    let steps = report["steps"].as_array().unwrap();
    assert!(!steps.is_empty() && steps.len() <= 3, "{output}");
    assert_eq!(steps[0]["speedup"], 2.0);
    // Each step doubles the load, or repeats it once to confirm a failure.
    for pair in steps.windows(2) {
        let (a, b) = (
            pair[0]["speedup"].as_f64().unwrap(),
            pair[1]["speedup"].as_f64().unwrap(),
        );
        assert!(b == a || b == 2.0 * a, "{a} then {b}");
    }
    assert_eq!(
        report["steps_relative_ok"].as_array().unwrap().len(),
        steps.len()
    );
    assert!(output.contains("stopped:"), "{output}");

    // 0.05 h of one EmbryoScope+ is 792 images, while the other uploads live.
    let (_, output, report) = run(
        &[
            "catch-up",
            "--devices",
            "es-plus:2",
            "--backlog-hours",
            "0.05",
            "--max-duration",
            "60s",
        ],
        &dir,
    );
    assert_eq!(report["backlog_images"], 792, "{output}");
    assert_eq!(report["uploaded_all"], true, "{output}");
    assert_eq!(report["catch_up_projected"], false);
    assert!(report["catch_up_s"].as_f64().unwrap() > 0.0);
    assert!(output.contains("(measured)"), "{output}");
}
