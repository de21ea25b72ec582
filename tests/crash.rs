//! kill -9 at random moments during upload, 20 times, restarting on the same data
//! directory: every acknowledged image survives byte for byte, and re-sent images are
//! stored once. The schedule comes from a seed, printed so a failure can be replayed
//! (ESSERVER_CRASH_SEED=<seed>).

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
    let seed: u64 = std::env::var("ESSERVER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("crash schedule seed: {seed} (replay with ESSERVER_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "");
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

    for round in 0..KILL_POINTS {
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
}
