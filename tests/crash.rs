//! kill -9 at random moments during upload, 20 times, restarting on the same data
//! directory: every acknowledged image survives byte for byte, and re-sent images are
//! stored once. The schedule comes from a seed, printed so a failure can be replayed
//! (ESSERVER_CRASH_SEED=<seed>). A second run does the same with 1 MiB image volumes, so a
//! volume is sealed and the next one started every few dozen images and the kills land
//! around seals too.

mod common;

use es_loadtest::client::IncubatorClient;
use es_loadtest::sim::{self, Pacing, Workload};
use es_perf::catalog::DeviceModel;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const KILL_POINTS: u32 = 20;

#[test]
fn kill_9_during_upload_loses_no_acknowledged_image() {
    crash_run("", KILL_POINTS);
}

#[test]
fn kill_9_while_volumes_are_sealed_loses_no_acknowledged_image() {
    let volumes = crash_run("[Storage]\nvolume_bytes_max = 1 MiB\n", 15);
    assert!(
        volumes > 15,
        "volumes were sealed throughout the run ({volumes} volumes)"
    );
}

/// Runs the kill schedule; returns the number of image volumes at the end.
fn crash_run(extra_config: &str, kill_points: u32) -> u64 {
    let seed = crash_seed();
    println!("crash schedule seed: {seed} (replay with ESSERVER_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, extra_config);
    let frames = es_loadtest::frames::generate(8, seed);
    let workload = Workload::full(
        "CRASH-01",
        DeviceModel::EmbryoScopePlus,
        1,
        1_760_000_000_000,
    );
    let mut identity = common::identity("CRASH-01", "es-plus");
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut registered = false;

    for round in 0..kill_points {
        let address = server.info.address("incubator");
        let tls = server.info.client_tls("incubator");
        let mut client =
            IncubatorClient::connect(address, &tls, &mut identity, common::TIMEOUT).unwrap();
        if !registered {
            sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
            registered = true;
        }
        // Resume: everything not acknowledged yet, from the first gap.
        let from = (0..workload.len())
            .find(|i| !acked.contains(i))
            .unwrap_or(workload.len());
        let kill_after = Duration::from_millis(rng.random_range(20..400));
        let uploader = {
            let workload = workload.clone();
            let frames = frames.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let (stats, _error) = sim::upload(
                    &mut client,
                    &workload,
                    from..workload.len(),
                    &frames,
                    Pacing::Window,
                    deadline,
                );
                stats.acked_indexes
            })
        };
        std::thread::sleep(kill_after);
        server.kill9();
        let acked_now = uploader.join().unwrap();
        println!(
            "round {round}: killed after {kill_after:?}, {} acks this round",
            acked_now.len()
        );
        acked.extend(acked_now);
        server
            .restart()
            .expect("the server restarts on the same data directory");
    }

    // Finish: resend everything (acknowledged images come back as duplicates).
    let mut client = common::connect(&server, &mut identity);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        &frames,
        Pacing::Window,
        deadline,
    );
    assert!(
        error.is_none() && stats.errors.is_empty(),
        "{error:?} {:?}",
        stats.errors
    );
    assert_eq!(stats.acked, workload.len());
    assert!(
        stats.duplicates >= acked.len() as u64,
        "every image acknowledged before a kill is already stored ({} duplicates, {} acked before)",
        stats.duplicates,
        acked.len()
    );
    drop(client);
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
    let data = server.data_dir().to_path_buf();
    drop(server);

    // Every image is present once and byte-identical.
    let store =
        es_storage::Store::open(&data, &es_storage::StoreOptions::default(), [0; 16]).unwrap();
    let reader = store.read().unwrap();
    let instrument = reader
        .instrument_by_serial("CRASH-01")
        .unwrap()
        .expect("instrument recorded");
    for index in 0..workload.len() {
        let spec = workload.image(index);
        let stored = reader
            .image(
                instrument.instrument_id,
                &spec.dish_id,
                spec.well,
                spec.focal_plane,
                spec.acquired_at_ms,
            )
            .unwrap()
            .unwrap_or_else(|| {
                panic!(
                    "image {index} ({spec:?}) missing; acked before a kill: {}",
                    acked.contains(&index)
                )
            });
        let sent = &frames[(index % frames.len() as u64) as usize];
        assert_eq!(
            Sha256::digest(&stored),
            Sha256::digest(sent),
            "image {index} differs"
        );
    }
    let stats = reader.stats().unwrap();
    assert_eq!(
        stats.images,
        workload.len(),
        "each image stored exactly once"
    );
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "verify after crashes: {report:?}");
    assert!(
        !acked.is_empty(),
        "the schedule acknowledged something before the kills"
    );
    stats.volumes
}

/// A version-4 store with about 170 MB of images inside redb; the server is killed with -9
/// five times while it moves them into volume files (each time once a random number of
/// volumes exist), then started to the end: every image is byte-identical, verify is clean.
#[test]
fn kill_9_during_the_migration_from_version_4_loses_no_image() {
    use es_loadtest::spawn::{ServerProcess, SpawnOptions};
    let seed = crash_seed();
    println!("migration crash seed: {seed} (replay with ESSERVER_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    const JPEG_BYTES: usize = 30_000;
    let planes = [-45, -30, -15, 0, 15, 30, 45];
    let images = es_storage::write_v4_fixture(&data, 400, &planes, JPEG_BYTES).unwrap();
    let total = images.len() as u64;
    let mut options = SpawnOptions::new(common::esserver_path(), data.clone());
    options.extra_config = "[Storage]\nvolume_bytes_max = 8 MiB\n".into();
    options.log_file = Some(dir.path().join("server.log"));
    let config = data.join("EmbryoServer.ini");
    std::fs::write(&config, options.config_text()).unwrap();
    let volumes_dir = data.join("volumes");
    let volume_files = || {
        std::fs::read_dir(&volumes_dir)
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    // About 210 MB in 8 MiB volumes: some 25 of them when done.
    let legacy_left = || -> Option<u64> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let db = redb::Database::open(data.join(es_storage::DATABASE_FILE_NAME)).unwrap();
        let txn = db.begin_read().unwrap();
        match txn.open_table(es_storage::tables::LEGACY_IMAGES) {
            Ok(table) => Some(table.len().unwrap()),
            Err(_) => None,
        }
    };
    let mut interrupted_midway = 0;
    for round in 0..5 {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("server.log"))
            .unwrap();
        let mut child = std::process::Command::new(common::esserver_path())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let kill_at = volume_files() + rng.random_range(1..6usize);
        let deadline = Instant::now() + Duration::from_secs(60);
        while volume_files() < kill_at
            && Instant::now() < deadline
            && matches!(child.try_wait(), Ok(None))
            && !data.join("server.json").exists()
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(data.join("server.json"));
        let left = legacy_left();
        println!(
            "round {round}: killed at {} volume files; {left:?} of {total} images not moved yet",
            volume_files()
        );
        if left.is_some_and(|left| left > 0 && left < total) {
            interrupted_midway += 1;
        }
    }
    assert!(
        interrupted_midway >= 1,
        "at least one kill landed in the middle of the migration"
    );
    let mut server = ServerProcess::spawn(options).expect("the server finishes the migration");
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
    drop(server);
    assert_eq!(legacy_left(), None, "the old table is gone");
    let store =
        es_storage::Store::open(&data, &es_storage::StoreOptions::default(), [0; 16]).unwrap();
    let reader = store.read().unwrap();
    for image in &images {
        let stored = reader
            .image(
                image.instrument_id,
                &image.dish_id,
                image.well,
                image.focal_plane,
                image.acquired_at_ms,
            )
            .unwrap()
            .unwrap_or_else(|| panic!("{image:?} is missing after the migration"));
        let original =
            es_storage::fixture_jpeg(image.well, image.index, image.focal_plane, JPEG_BYTES);
        assert!(stored.as_ref() == original.as_slice(), "{image:?} differs");
    }
    assert_eq!(reader.stats().unwrap().images, total);
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "verify after the migration: {report:?}");
}

/// ESSERVER_CRASH_SEED, or a seed from the clock (printed by each test so it can be replayed).
fn crash_seed() -> u64 {
    std::env::var("ESSERVER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}
