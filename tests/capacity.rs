//! `esserver capacity`, the capacity planner, as an administrator runs it.

mod common;

use std::process::Command;

fn capacity(args: &[&str]) -> (bool, String) {
    let output = Command::new(common::esserver_path())
        .arg("capacity")
        .args(args)
        .output()
        .expect("esserver capacity runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn the_planner_picks_a_configuration_sizes_storage_and_reads_a_report() {
    let (ok, text) = capacity(&[
        "--devices",
        "es-plus:3,es-d:10",
        "--computers",
        "4",
        "--disk-free",
        "4TB",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("configuration: high-capacity (16 of 16 capacity units"),
        "{text}"
    );
    assert!(text.contains("full in 71 days"), "{text}");

    let (ok, text) = capacity(&["--devices", "es-plus:9", "--computers", "5"]);
    assert!(!ok, "an impossible mix exits 1");
    assert!(text.contains("no configuration fits"), "{text}");
    assert!(text.contains("allows 4 computers; 5 requested"), "{text}");

    let (ok, text) = capacity(&["--devices", "es-plus"]);
    assert!(!ok);
    assert!(text.contains("model:count"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    std::fs::write(
        &report,
        r#"[{"incubator_tls": true, "throughput": {"images_per_s": 4400.0}},
            {"incubator_tls": false, "throughput": {"images_per_s": 5500.0}}]"#,
    )
    .unwrap();
    let (ok, text) = capacity(&[
        "--devices",
        "es-plus:8",
        "--computers",
        "4",
        "--measured",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["configuration"], "high-capacity");
    assert_eq!(value["measured_images_per_s"], 5500.0);
    // 8 ES+ at 4.4 images/s, 5 x for peaks = 176 images/s; 5500 / 176 = 31.25.
    let headroom = value["headroom"].as_f64().unwrap();
    assert!((headroom - 31.25).abs() < 0.01, "{headroom}");
}
