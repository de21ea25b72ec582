//! A simulated EmbryoScope+ uploads one full acquisition cycle (2,640 images) over the real
//! protocol (TLS on), and SYNC_STATE then reports exactly what was acknowledged.

mod common;

use es_loadtest::sim::{self, Pacing, Workload};
use es_perf::catalog::DeviceModel;
use es_proto::incubator::{pb, Message};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[test]
fn es_plus_full_cycle_is_acknowledged_and_sync_state_matches() {
    let (server, dir) = common::spawn(true);
    let mut identity = common::identity("ESP-0001", "es-plus");
    let mut client = common::connect(&server, &mut identity);
    assert!(
        !identity.secret.is_empty(),
        "a new instrument is issued a secret"
    );
    assert_eq!(client.hello_ok().server_id, server.info.server_id);

    let workload = Workload::full(
        "ESP-0001",
        DeviceModel::EmbryoScopePlus,
        1,
        1_760_000_000_000,
    );
    assert_eq!(workload.len(), 2640, "one ES+ cycle is 2,640 images");
    sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(4, 11);
    let deadline = Instant::now() + Duration::from_secs(300);
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        &frames,
        Pacing::Window,
        deadline,
    );
    assert!(error.is_none(), "upload failed: {error:?}");
    assert!(stats.errors.is_empty(), "errors: {:?}", stats.errors);
    assert_eq!(stats.acked, 2640);
    assert_eq!(stats.duplicates, 0);

    // What the server says it holds, per dish, well and acquisition.
    let mut expected: BTreeMap<(String, u32, i64), BTreeSet<i32>> = BTreeMap::new();
    for index in &stats.acked_indexes {
        let spec = workload.image(*index);
        expected
            .entry((spec.dish_id, spec.well, spec.acquired_at_ms))
            .or_default()
            .insert(spec.focal_plane);
    }
    let mut reported: BTreeMap<(String, u32, i64), BTreeSet<i32>> = BTreeMap::new();
    for dish in workload.dish_registrations() {
        let reply = client
            .request(
                Message::SyncState(pb::SyncState {
                    seq: 0,
                    dish_id: dish.dish_id.clone(),
                }),
                common::TIMEOUT,
            )
            .unwrap();
        let Message::SyncStateResult(result) = reply else {
            panic!("unexpected {reply:?}")
        };
        assert!(result.known);
        assert_eq!(result.wells.len(), 16);
        for well in result.wells {
            assert_eq!(
                well.embryo_id,
                format!("ESP-0001_S{}_P-{}", dish.slot, well.well)
            );
            for acquisition in well.acquisitions {
                reported
                    .entry((dish.dish_id.clone(), well.well, acquisition.acquired_at_ms))
                    .or_default()
                    .extend(acquisition.focal_planes);
            }
        }
    }
    assert_eq!(
        reported, expected,
        "SYNC_STATE must report exactly the acknowledged images"
    );

    // An unknown dish is reported as unknown, not as an error.
    let reply = client
        .request(
            Message::SyncState(pb::SyncState {
                seq: 0,
                dish_id: "NOPE".into(),
            }),
            common::TIMEOUT,
        )
        .unwrap();
    assert!(
        matches!(reply, Message::SyncStateResult(ref r) if !r.known),
        "{reply:?}"
    );

    // Re-sending an acknowledged image is acknowledged again as a duplicate.
    let (again, error) = sim::upload(
        &mut client,
        &workload,
        0..11,
        &frames,
        Pacing::Window,
        Instant::now() + common::TIMEOUT,
    );
    assert!(error.is_none());
    assert_eq!((again.acked, again.duplicates), (11, 11));

    // The patients registered with the dishes are listed.
    let reply = client
        .request(
            Message::ListPatients(pb::ListPatients {
                seq: 0,
                after_patient_id: String::new(),
                limit: 0,
            }),
            common::TIMEOUT,
        )
        .unwrap();
    let Message::PatientList(list) = reply else {
        panic!("unexpected {reply:?}")
    };
    assert_eq!(list.patients.len(), 15);
    drop(client);
    drop(dir);
}

#[test]
fn same_key_with_other_bytes_is_an_image_conflict_and_the_original_is_kept() {
    let (server, _dir) = common::spawn(false);
    let mut identity = common::identity("ESD-0002", "es-d");
    let mut client = common::connect(&server, &mut identity);
    let workload = Workload::full("ESD-0002", DeviceModel::EmbryoScopeD, 1, 1_760_000_000_000);
    sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let spec = workload.image(0);
    let image = |jpeg: &'static [u8]| {
        Message::Image(pb::Image {
            seq: 0,
            dish_id: spec.dish_id.clone(),
            well: spec.well,
            focal_plane: spec.focal_plane,
            acquired_at_ms: spec.acquired_at_ms,
            jpeg: bytes::Bytes::from_static(jpeg),
        })
    };
    let first = client
        .request(image(b"\xFF\xD8first\xFF\xD9"), common::TIMEOUT)
        .unwrap();
    assert!(
        matches!(first, Message::Ack(ref a) if !a.duplicate),
        "{first:?}"
    );
    let conflict = client
        .request(image(b"\xFF\xD8other\xFF\xD9"), common::TIMEOUT)
        .unwrap();
    let Message::Error(error) = conflict else {
        panic!("expected image_conflict, got {conflict:?}")
    };
    assert_eq!(error.name, "image_conflict");
    let same = client
        .request(image(b"\xFF\xD8first\xFF\xD9"), common::TIMEOUT)
        .unwrap();
    assert!(
        matches!(same, Message::Ack(ref a) if a.duplicate),
        "the original is still stored: {same:?}"
    );
}

#[test]
fn status_shows_connected_incubators_their_figures_and_storage() {
    let (server, _dir) = common::spawn(true);
    let mut identity = common::identity("STAT-01", "es-8");
    let mut client = common::connect(&server, &mut identity);
    let workload = Workload::full("STAT-01", DeviceModel::EmbryoScope8, 1, 1_760_000_000_000);
    sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(2, 5);
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..100,
        &frames,
        Pacing::Window,
        Instant::now() + common::TIMEOUT,
    );
    assert!(error.is_none() && stats.acked == 100, "{error:?} {stats:?}");

    let body = common::admin_json(server.data_dir(), &["status"]);
    let incubators = body["incubators"].as_array().unwrap();
    assert_eq!(incubators.len(), 1, "{body}");
    assert_eq!(incubators[0]["serial"], "STAT-01");
    assert_eq!(incubators[0]["model"], "es-8");
    assert_eq!(incubators[0]["images"], 100);
    assert!(incubators[0]["images_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(body["storage"]["images"], 100);
    assert_eq!(body["storage"]["dishes"], 8);
    let listeners = body["listeners"].as_array().unwrap();
    let incubator = listeners
        .iter()
        .find(|l| l["service"] == "incubator")
        .unwrap();
    assert_eq!(incubator["connections_open"], 1);

    // The readable form names the incubator too.
    let output = std::process::Command::new(common::esserver_path())
        .args(["status", "--data"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("STAT-01") && text.contains("incubators connected: 1"),
        "{text}"
    );
}

#[test]
fn a_client_that_half_closes_still_gets_every_answer() {
    half_close_gets_every_answer(true);
    half_close_gets_every_answer(false);
}

fn half_close_gets_every_answer(tls: bool) {
    let (server, dir) = common::spawn(tls);
    let mut identity = common::identity("HALF-01", "es-d");
    let mut client = common::connect(&server, &mut identity);
    let workload = Workload::full("HALF-01", DeviceModel::EmbryoScopeD, 1, 1_760_000_000_000);
    sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(2, 9);
    let mut sent = BTreeSet::new();
    // More than the server's in-flight limit (64): the rest wait in its input buffer.
    let count = u64::from(client.hello_ok().inflight_requests_max) + 36;
    for index in 0..count {
        let spec = workload.image(index);
        let seq = client.send(Message::Image(pb::Image {
            seq: 0,
            dish_id: spec.dish_id,
            well: spec.well,
            focal_plane: spec.focal_plane,
            acquired_at_ms: spec.acquired_at_ms,
            jpeg: frames[(index % 2) as usize].clone(),
        }));
        sent.insert(seq);
    }
    client.finish_sending(common::TIMEOUT).unwrap();
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        match client.next_response(deadline) {
            Ok(Some((seq, Message::Ack(_)))) => {
                acked.insert(seq);
            }
            Ok(Some((seq, other))) => panic!("seq {seq}: unexpected {other:?}"),
            Ok(None) => panic!(
                "timed out with {} of {count} acks; log:\n{}",
                acked.len(),
                common::server_log(&dir)
            ),
            Err(_) => break, // the server closes once everything is answered
        }
    }
    assert_eq!(
        acked, sent,
        "every request sent before the half-close is answered"
    );
}
