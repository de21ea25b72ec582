//! Backups of a running server, as an administrator takes them with `esserver backup`:
//! taken while 16 incubators upload, restored with `esserver restore` into a new directory
//! that verifies clean and holds every image acknowledged before the backup, byte for byte;
//! the second backup copies only what is new; a flipped byte is reported; a server killed
//! during a backup damages neither the store nor earlier backups, and the next one completes;
//! a restore killed midway leaves nothing a server could start on, and run again completes.

mod common;

use es_loadtest::sim::Workload;
use es_perf::catalog::DeviceModel;
use es_storage::{Store, StoreOptions};
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Uploaders running during the backup.
const UPLOADERS: u32 = 16;

fn esserver(args: &[&str], paths: &[&Path]) -> Output {
    let mut command = Command::new(common::esserver_path());
    command.args(args);
    for path in paths {
        command.arg(path);
    }
    command.output().expect("esserver runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `esserver backup --to <target> --json --data <data>`: the report.
fn backup(target: &Path, data: &Path) -> serde_json::Value {
    let output = Command::new(common::esserver_path())
        .args(["backup", "--json", "--to"])
        .arg(target)
        .arg("--data")
        .arg(data)
        .output()
        .expect("esserver runs");
    assert!(output.status.success(), "backup: {}", stderr(&output));
    assert!(
        stderr(&output).contains("backup: ") && stderr(&output).contains(" files, "),
        "no progress on stderr: {}",
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

/// Starts `esserver <args> <paths...>` and returns it once it printed its first progress
/// line starting with `prefix` (the work is under way), with the rest of its stderr.
fn started(
    args: &[&str],
    paths: &[&Path],
    prefix: &str,
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStderr>>,
) {
    let mut command = Command::new(common::esserver_path());
    command.args(args);
    for path in paths {
        command.arg(path);
    }
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let going = lines.any(|line| line.map(|l| l.starts_with(prefix)).unwrap_or(false));
    assert!(going, "esserver {args:?} reported no progress");
    (child, lines)
}

fn options() -> StoreOptions {
    StoreOptions {
        volume_bytes_max: 1 << 20,
        ..StoreOptions::default()
    }
}

/// The JPEG `workload`'s image `index` was uploaded with (`common::upload_dish`'s frames).
fn jpeg(frames: &[bytes::Bytes], index: u64) -> bytes::Bytes {
    frames[(index % frames.len() as u64) as usize].clone()
}

fn image(store: &Store, workload: &Workload, index: u64) -> Option<bytes::Bytes> {
    let reader = store.read().unwrap();
    let instrument = reader.instrument_by_serial(&workload.serial).unwrap()?;
    let spec = workload.image(index);
    reader
        .image(
            instrument.instrument_id,
            &spec.dish_id,
            spec.well,
            spec.focal_plane,
            spec.acquired_at_ms,
        )
        .unwrap()
}

#[test]
fn a_backup_during_uploads_restores_every_image_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "[Storage]\nvolume_bytes_max = 1 MiB\n");
    let data = server.data_dir().to_path_buf();
    let target = dir.path().join("backups");
    let frames = es_loadtest::frames::generate(4, 7);

    // Acknowledged before the backup starts.
    let before = common::upload_dish(&server, "BK-0", 60);
    // The DEMO licence has room for 16 one-unit instruments: wait until BK-0 is gone.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while common::admin_json(&data, &["status"])["incubators"]
        .as_array()
        .is_some_and(|connected| !connected.is_empty())
    {
        assert!(std::time::Instant::now() < deadline, "BK-0 stays connected");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // The backup runs while 16 incubators upload.
    let uploads: Vec<_> = (1..=UPLOADERS)
        .map(|n| {
            let server_info = server.info.clone();
            std::thread::spawn(move || upload_for(&server_info, &format!("BK-{n}"), 30))
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = backup(&target, &data);
    let during: Vec<Workload> = uploads.into_iter().map(|u| u.join().unwrap()).collect();
    assert!(first["images"].as_u64().unwrap() >= before.len(), "{first}");

    // More images, then an incremental backup: the sealed volumes are not copied again.
    common::upload_dish(&server, "BK-99", 60);
    let second = backup(&target, &data);
    // Exactly the sealed volumes the first backup holds are not copied again.
    let manifest = |name: &str| -> serde_json::Value {
        let path = target.join("backups").join(name).join("manifest.json");
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    let (one, two) = (
        manifest(first["name"].as_str().unwrap()),
        manifest(second["name"].as_str().unwrap()),
    );
    let sealed_in_first: Vec<&serde_json::Value> = one["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "volume" && f["sealed"] == true)
        .collect();
    assert!(!sealed_in_first.is_empty(), "{one}");
    let reused: u64 = two["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| sealed_in_first.iter().any(|g| g["path"] == f["path"]))
        .map(|f| f["bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        second["bytes_copied"].as_u64().unwrap(),
        second["bytes"].as_u64().unwrap() - reused,
        "{second}"
    );
    assert!(reused > 0);
    let verify = esserver(&["backup", "verify", "--from"], &[&target]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    assert!(server.terminate(common::TIMEOUT).is_some());

    // The first backup, restored and checked.
    let name = first["name"].as_str().unwrap();
    let restored = dir.path().join("restored");
    let restore = esserver(&["restore", "--name", name, "--from"], &[&target]);
    assert!(!restore.status.success(), "restore without --data ran");
    let restore = Command::new(common::esserver_path())
        .args(["restore", "--name", name, "--from"])
        .arg(&target)
        .arg("--data")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(restore.status.success(), "{}", stderr(&restore));
    let verified = esserver(&["verify", "--data"], &[&restored]);
    assert!(verified.status.success(), "{}", stderr(&verified));

    let copy = Store::open_read_only(&restored, &options()).unwrap();
    let original = Store::open_read_only(&data, &options()).unwrap();
    assert_eq!(copy.server_id(), original.server_id());
    for index in 0..before.len() {
        assert_eq!(
            image(&copy, &before, index),
            Some(jpeg(&frames, index)),
            "image {index}, acknowledged before the backup"
        );
    }
    // What the backup holds of the uploads during it is what the server stored.
    let mut held = before.len();
    for workload in &during {
        for index in 0..workload.len() {
            if let Some(bytes) = image(&copy, workload, index) {
                assert_eq!(Some(bytes), image(&original, workload, index));
                held += 1;
            }
        }
    }
    assert_eq!(held, first["images"].as_u64().unwrap());
    let restored_stats = copy.read().unwrap().stats().unwrap();
    assert_eq!(restored_stats.images, held);
    // The licence and the TLS identity came along.
    for file in ["license.json", "tls/server.crt", "tls/server.key"] {
        assert_eq!(
            std::fs::read(restored.join(file)).unwrap(),
            std::fs::read(data.join(file)).unwrap(),
            "{file}"
        );
    }
    drop(copy);

    // A server starts on the restored directory and serves its images.
    let restored_dir = tempfile::tempdir_in(dir.path()).unwrap();
    std::fs::remove_dir(restored_dir.path()).unwrap();
    std::fs::rename(&restored, restored_dir.path()).unwrap();
    let mut options = es_loadtest::spawn::SpawnOptions::new(
        common::esserver_path(),
        restored_dir.path().to_path_buf(),
    );
    options.incubator_tls = false;
    let mut again = es_loadtest::spawn::ServerProcess::spawn(options).expect("starts");
    let status = common::admin_json(restored_dir.path(), &["status"]);
    assert_eq!(status["storage"]["images"].as_u64(), Some(held), "{status}");
    again.terminate(common::TIMEOUT);

    // A flipped byte: `backup verify` names the file, `restore` refuses.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(target.join("backups").join(name).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let victim = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "volume" && f["sealed"] == true)
        .expect("a sealed volume in the backup");
    let path = target.join(victim["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    let verify = esserver(&["backup", "verify", "--name", name, "--from"], &[&target]);
    assert!(!verify.status.success());
    let printed = String::from_utf8_lossy(&verify.stdout);
    assert!(
        printed.contains("DAMAGED") && printed.contains(victim["path"].as_str().unwrap()),
        "{printed}"
    );
    let elsewhere = dir.path().join("restored-again");
    let refused = Command::new(common::esserver_path())
        .args(["restore", "--name", name, "--from"])
        .arg(&target)
        .arg("--data")
        .arg(&elsewhere)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("damaged"), "{}", stderr(&refused));
    assert!(!elsewhere.exists());
}

/// Incubators `<prefix>-<n>` for each `n` upload one dish of `cycles` acquisitions each, at
/// once; returns their workloads once all are acknowledged.
fn upload_concurrently(
    server: &es_loadtest::spawn::ServerProcess,
    prefix: &str,
    numbers: std::ops::RangeInclusive<u32>,
    cycles: u32,
) -> Vec<Workload> {
    let uploads: Vec<_> = numbers
        .map(|n| {
            let info = server.info.clone();
            let serial = format!("{prefix}-{n}");
            std::thread::spawn(move || upload_for(&info, &serial, cycles))
        })
        .collect();
    uploads.into_iter().map(|u| u.join().unwrap()).collect()
}

/// Uploads one dish of `cycles` acquisitions from `serial` (as `common::upload_dish`), on a
/// server known by its info.
fn upload_for(info: &es_loadtest::spawn::ServerInfo, serial: &str, cycles: u32) -> Workload {
    // A model the catalog does not know counts as one capacity unit.
    let mut identity = common::identity(serial, "test-incubator");
    let mut client = es_loadtest::client::IncubatorClient::connect(
        info.address("incubator"),
        &info.client_tls("incubator"),
        &mut identity,
        common::TIMEOUT,
    )
    .expect("incubator connects");
    let workload = Workload {
        serial: serial.into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: 3,
        planes: vec![0],
        cycles,
        start_ms: common::START_MS,
        interval_ms: 600_000,
    };
    es_loadtest::sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(4, 7);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let (stats, error) = es_loadtest::sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        &frames,
        es_loadtest::sim::Pacing::Window,
        deadline,
    );
    assert!(error.is_none() && stats.errors.is_empty(), "{error:?}");
    workload
}

#[test]
fn a_server_killed_during_a_backup_damages_nothing_and_the_next_backup_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "[Storage]\nvolume_bytes_max = 4 MiB\n");
    let data = server.data_dir().to_path_buf();
    let target = dir.path().join("backups");
    common::upload_dish(&server, "KB-1", 40);
    let first = backup(&target, &data);
    // Enough for a backup that lasts a while: about 100 MiB of images.
    upload_concurrently(&server, "KB", 2..=5, 300);
    // Kill the server once the backup has started (its first progress line).
    let (mut child, lines) = started(
        &["backup", "--to"],
        &[&target, Path::new("--data"), &data],
        "backup: ",
    );
    server.kill9();
    let _ = child.wait();
    drop(lines);
    // Killed midway: only the first backup is complete, the second left its partial copy.
    let complete = |target: &Path| {
        std::fs::read_dir(target.join("backups"))
            .unwrap()
            .flatten()
            .filter(|entry| entry.path().join("manifest.json").is_file())
            .count()
    };
    assert_eq!(complete(&target), 1, "the backup completed before the kill");

    // Earlier backups are intact; the server restarts on its directory, which verifies clean.
    let name = first["name"].as_str().unwrap();
    let verify = esserver(&["backup", "verify", "--name", name, "--from"], &[&target]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    server.restart().unwrap();
    let status = common::admin_json(&data, &["status"]);
    assert!(
        status["storage"]["images"].as_u64().unwrap() > 0,
        "{status}"
    );
    let verified = common::admin(&data, &["verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    // The next backup clears what the killed one left and completes.
    let next = backup(&target, &data);
    let verify = esserver(&["backup", "verify", "--from"], &[&target]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    let partial_left = std::fs::read_dir(target.join("backups"))
        .unwrap()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().ends_with(".partial"));
    assert!(!partial_left);
    assert_ne!(next["name"], first["name"]);
    server.terminate(common::TIMEOUT);

    // A restore killed midway leaves no data directory, and run again it completes.
    let restored = dir.path().join("restored");
    let (mut child, _stderr) = started(
        &["restore", "--from"],
        &[&target, Path::new("--data"), &restored],
        "restore: ",
    );
    child.kill().unwrap();
    let _ = child.wait();
    assert!(!restored.exists(), "a killed restore left a data directory");
    let again = Command::new(common::esserver_path())
        .args(["restore", "--from"])
        .arg(&target)
        .arg("--data")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let verified = esserver(&["verify", "--data"], &[&restored]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    let partial_left = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .any(|entry| entry.file_name().to_string_lossy().ends_with(".partial"));
    assert!(
        !partial_left,
        "the second restore left the first one's partial copy"
    );
}

#[test]
fn the_server_takes_its_scheduled_backup_and_reports_it_and_a_failed_one() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("scheduled");
    // No backup in the target yet: the missed one is taken shortly after the start.
    let config = format!(
        "[Backup]\ntarget = {}\ntime_of_day = 03:00\nkeep = 2\n",
        target.display()
    );
    let mut server = common::spawn_in(&dir, false, &config);
    let data = server.data_dir().to_path_buf();
    common::upload_dish(&server, "SB-1", 10);
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let status = loop {
        let status = common::admin_json(&data, &["status"]);
        if status["backup"]["last_success"].is_object() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled backup: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let backup = &status["backup"];
    assert_eq!(backup["scheduled_target"].as_str(), target.to_str());
    assert!(backup["warning"].is_null(), "{backup}");
    assert!(
        backup["next_at_ms"].as_i64().unwrap() > backup["last_success"]["at_ms"].as_i64().unwrap()
    );
    let verify = esserver(&["backup", "verify", "--from"], &[&target]);
    assert!(verify.status.success(), "{}", stderr(&verify));

    // /metrics and `status` say so.
    let key = common::create_api_key(&server, "scraper", "read");
    let mut http = es_client::http::HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    );
    let authorization = format!("Bearer {key}");
    let metrics = http
        .get("/metrics", &[("authorization", authorization.as_str())])
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("esserver_backup_last_failed 0"),
        "{metrics}"
    );
    assert!(metrics.contains("esserver_backup_attention 0"), "{metrics}");
    assert!(!metrics.contains("esserver_backup_last_success_timestamp_seconds 0\n"));
    let text = esserver(&["status", "--data"], &[&data]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("backup:     last "));

    // A backup that cannot be written: the command fails with the reason, and status,
    // metrics and the dashboard's data warn.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let failed = Command::new(common::esserver_path())
        .args(["backup", "--to"])
        .arg(blocker.join("backups"))
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert!(
        stderr(&failed).contains("backup failed"),
        "{}",
        stderr(&failed)
    );
    let status = common::admin_json(&data, &["status"]);
    let warning = status["backup"]["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("the last backup failed"), "{status}");
    let metrics = http
        .get("/metrics", &[("authorization", authorization.as_str())])
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("esserver_backup_last_failed 1"),
        "{metrics}"
    );
    server.terminate(common::TIMEOUT);
}

#[test]
fn a_server_stopping_during_a_backup_ends_it_at_once_and_the_next_completes() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "[Storage]\nvolume_bytes_max = 4 MiB\n");
    let data = server.data_dir().to_path_buf();
    let target = dir.path().join("backups");
    upload_concurrently(&server, "SD", 1..=4, 300);
    let (mut child, lines) = started(
        &["backup", "--to"],
        &[&target, Path::new("--data"), &data],
        "backup: ",
    );
    // SIGTERM: the backup stops at its next chunk instead of holding the shutdown up.
    let stopped = std::time::Instant::now();
    assert_eq!(server.terminate(common::TIMEOUT), Some(0));
    assert!(stopped.elapsed() < std::time::Duration::from_secs(20));
    let status = child.wait().unwrap();
    assert!(!status.success(), "the interrupted backup reported success");
    drop(lines);
    assert!(
        common::server_log(&dir).contains("interrupted"),
        "the log does not say why the backup ended"
    );
    // Started again, the server's store verifies and the next backup completes.
    server.restart().unwrap();
    let verified = common::admin(&data, &["verify"]);
    assert!(verified.status.success(), "{}", stderr(&verified));
    backup(&target, &data);
    let verify = esserver(&["backup", "verify", "--from"], &[&target]);
    assert!(verify.status.success(), "{}", stderr(&verify));
    server.terminate(common::TIMEOUT);
}

#[test]
fn an_object_store_target_without_credentials_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["backup", "verify", "--from", "s3://bucket/prefix"],
        vec!["backup", "list", "--from", "s3://bucket/prefix"],
        vec![
            "restore",
            "--from",
            "s3://bucket/prefix",
            "--data",
            "restored",
        ],
    ] {
        let output = Command::new(common::esserver_path())
            .args(&args)
            .current_dir(dir.path())
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr(&output).contains("no credentials for the object store"),
            "{}",
            stderr(&output)
        );
    }
    // Nothing was made of the URL locally.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
