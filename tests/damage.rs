//! Damage stays where it is. A flipped byte inside one image record and a zeroed 64 KiB range
//! of a volume (a few records) are made behind a stopped server's back; then, after a clean
//! restart and again after a `kill -9` during uploads, `verify` names exactly the damaged
//! images and exits 1, each of them answers `image_damaged` on every path (the public API's
//! single image and time-lapse ZIP, the viewer's image and playback), and every other image is
//! served byte for byte.

mod common;

use es_loadtest::http_client::{HttpClient, HttpResponse};
use es_loadtest::sim::Workload;
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::ErrorCode;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const PASSWORD: &str = "Embryo-2026!";

/// One uploaded image: its workload, index, embryo and where its record is.
#[derive(Debug, Clone)]
struct Stored {
    serial: String,
    index: u64,
    embryo_id: String,
    acquired_at_ms: i64,
    jpeg: Vec<u8>,
    volume: u32,
    offset: u64,
    length: u32,
}

fn stored_images(data: &Path, workloads: &[Workload]) -> Vec<Stored> {
    let frames = es_loadtest::frames::generate(4, 7);
    let store =
        es_storage::Store::open_read_only(data, &es_storage::StoreOptions::default()).unwrap();
    let reader = store.read().unwrap();
    let mut out = Vec::new();
    for workload in workloads {
        let instrument = reader
            .instrument_by_serial(&workload.serial)
            .unwrap()
            .unwrap();
        for index in 0..workload.len() {
            let spec = workload.image(index);
            let location = store
                .image_location(
                    instrument.instrument_id,
                    &spec.dish_id,
                    spec.well,
                    spec.focal_plane,
                    spec.acquired_at_ms,
                )
                .unwrap()
                .unwrap();
            out.push(Stored {
                serial: workload.serial.clone(),
                index,
                embryo_id: format!("{}_S1_P-{}", workload.serial, spec.well),
                acquired_at_ms: spec.acquired_at_ms,
                jpeg: frames[(index % frames.len() as u64) as usize].to_vec(),
                volume: location.volume,
                offset: location.offset,
                length: location.length,
            });
        }
    }
    out
}

fn verify_offline_or_online(data: &Path) -> (bool, serde_json::Value) {
    let output = Command::new(common::esserver_path())
        .args(["verify", "--data"])
        .arg(data)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "verify printed no JSON: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.success(), report)
}

fn get(http: &mut HttpClient, key: &str, path: &str) -> Option<HttpResponse> {
    let auth = format!("Bearer {key}");
    http.request("GET", path, &[("authorization", auth.as_str())], None)
        .ok()
}

/// Every path, for every image: damaged ones answer image_damaged, the rest byte for byte.
fn check_paths(server: &ServerProcess, key: &str, images: &[Stored], damaged: &BTreeSet<u64>) {
    let is_damaged = |image: &Stored| damaged.contains(&image.offset);
    let mut http = HttpClient::new(
        server.info.address("public-api"),
        server.info.client_tls("public-api"),
        common::TIMEOUT,
    );
    for image in images {
        let path = format!(
            "/api/v1/embryos/{}/images/{}?focal_plane=0",
            image.embryo_id, image.acquired_at_ms
        );
        let response = get(&mut http, key, &path).expect("an answer");
        if is_damaged(image) {
            assert_eq!(response.status, 500, "{image:?}");
            assert_eq!(response.json()["code"], "image_damaged", "{image:?}");
        } else {
            assert_eq!(response.status, 200, "{image:?}");
            assert!(
                response.body == image.jpeg,
                "{} {} differs",
                image.serial,
                image.index
            );
        }
    }
    // The time-lapse ZIP of each embryo: whole and byte for byte when nothing in it is
    // damaged; otherwise image_damaged (when the damage is in its first chunk) or a stream
    // that ends early (after the status line), never a complete archive.
    let embryos: BTreeSet<&str> = images.iter().map(|i| i.embryo_id.as_str()).collect();
    for embryo in embryos {
        let frames: Vec<&Stored> = images.iter().filter(|i| i.embryo_id == embryo).collect();
        let path = format!("/api/v1/embryos/{embryo}/timelapse?focal_plane=0");
        let mut fresh = HttpClient::new(
            server.info.address("public-api"),
            server.info.client_tls("public-api"),
            common::TIMEOUT,
        );
        let response = get(&mut fresh, key, &path);
        if frames.iter().any(|f| is_damaged(f)) {
            match response {
                Some(r) if r.status == 500 => assert_eq!(r.json()["code"], "image_damaged"),
                Some(r) => {
                    let end = r.body.len().saturating_sub(22);
                    assert!(
                        r.status != 200 || r.body.get(end..end + 4) != Some(b"PK\x05\x06"),
                        "a complete ZIP of {embryo} despite a damaged frame"
                    );
                }
                None => {} // The stream was cut after its status line.
            }
        } else {
            let r = response.expect("an answer");
            assert_eq!(r.status, 200, "{embryo}");
            for frame in &frames {
                assert!(
                    r.body
                        .windows(frame.jpeg.len())
                        .any(|w| w == frame.jpeg.as_slice()),
                    "frame {} of {embryo} missing from its ZIP",
                    frame.index
                );
            }
        }
    }
    // The viewer: one image, and a playback.
    let mut viewer = ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "anna".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-anna".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();
    for image in images.iter().filter(|i| is_damaged(i)) {
        let result = viewer.call(Request::GetImage(pb::GetImage {
            embryo_id: image.embryo_id.clone(),
            acquired_at_ms: image.acquired_at_ms,
            focal_plane: 0,
        }));
        let error = result.expect_err("a damaged image is not served");
        assert_eq!(
            error.error_code(),
            Some(ErrorCode::ImageDamaged),
            "{error:?}"
        );
    }
    let first_damaged = images.iter().find(|i| is_damaged(i)).unwrap();
    let seq = viewer.send(Request::Playback(pb::Playback {
        embryo_id: first_damaged.embryo_id.clone(),
        focal_plane: 0,
        from_ms: 0,
        to_ms: 0,
        max_frames: 0,
    }));
    let mut played = 0;
    let error = loop {
        match viewer.wait(seq, "a playback frame") {
            Ok(Body::Frame(frame)) => {
                let got = frame.image.expect("a frame has its image");
                assert!(got.acquired_at_ms < first_damaged.acquired_at_ms);
                played += 1;
                assert!(!frame.last, "the playback completed over a damaged frame");
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => break error,
        }
    };
    assert_eq!(
        error.error_code(),
        Some(ErrorCode::ImageDamaged),
        "{error:?}"
    );
    let before = images
        .iter()
        .filter(|i| i.embryo_id == first_damaged.embryo_id)
        .filter(|i| i.acquired_at_ms < first_damaged.acquired_at_ms)
        .count();
    // Every frame before the damaged one is played, even those read in its chunk; the
    // damaged frame ends the playback.
    assert_eq!(
        played, before,
        "{played} frames played, {before} before the damaged one"
    );
}

#[test]
fn damage_costs_only_the_records_it_touches_on_every_path_also_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, true, "");
    common::add_user(&server, "anna", "view", PASSWORD);
    let key = common::create_api_key(&server, "emr", "read");
    let workloads = vec![
        common::upload_dish(&server, "DMG-1", 40),
        common::upload_dish(&server, "DMG-2", 40),
    ];
    assert_eq!(server.terminate(common::TIMEOUT), Some(0));
    let data = server.data_dir().to_path_buf();
    let images = stored_images(&data, &workloads);

    // Damage: one flipped byte inside the JPEG of DMG-1's image 4 (embryo P-2, its second
    // frame), and 64 KiB of zeros from the middle of image 90 (a few records of cycle 30).
    let flip = images
        .iter()
        .find(|i| i.serial == "DMG-1" && i.index == 4)
        .unwrap();
    let zero = images
        .iter()
        .find(|i| i.serial == "DMG-1" && i.index == 90)
        .unwrap();
    let volume = data.join("volumes").join(format!("{:08}.vol", flip.volume));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&volume)
        .unwrap();
    let flip_at = flip.offset + u64::from(flip.length) - 100;
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, flip_at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x40], flip_at).unwrap();
    let zero_from = zero.offset + u64::from(zero.length) / 2;
    let zero_to = zero_from + 65_536;
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; 65_536], zero_from).unwrap();
    file.sync_all().unwrap();
    drop(file);
    let damaged: BTreeSet<u64> = images
        .iter()
        .filter(|i| {
            let end = i.offset + u64::from(i.length);
            i.offset == flip.offset
                || (i.volume == zero.volume && i.offset < zero_to && end > zero_from)
        })
        .map(|i| i.offset)
        .collect();
    assert!(damaged.len() >= 3, "{damaged:?}");

    // Offline verify (read-only): exactly those images, exit 1.
    let expect_report = |(clean, report): (bool, serde_json::Value)| {
        assert!(!clean, "verify exits 1: {report}");
        let listed = report["damaged_images"].as_array().unwrap();
        assert_eq!(listed.len(), damaged.len(), "{report}");
        for image in images.iter().filter(|i| damaged.contains(&i.offset)) {
            let well = image.embryo_id.rsplit('-').next().unwrap();
            let named = listed.iter().any(|k| {
                let k = k.as_str().unwrap();
                k.contains(&format!("well {well} "))
                    && k.contains(&format!("acquired_at_ms {} ", image.acquired_at_ms))
            });
            assert!(named, "{image:?} not named in {report}");
        }
        assert!(
            report["problems"].as_array().unwrap().is_empty(),
            "{report}"
        );
        assert!(
            report["orphan_records"].as_array().unwrap().is_empty(),
            "{report}"
        );
    };
    expect_report(verify_offline_or_online(&data));

    // A clean start: every path.
    server
        .restart()
        .expect("the server starts on the damaged store");
    check_paths(&server, &key, &images, &damaged);

    // kill -9 while an incubator uploads, then start again: the same, and verify (online).
    let uploading = {
        let server_info = server.info.clone();
        std::thread::spawn(move || {
            let mut identity = common::identity("DMG-3", "es-plus");
            let Ok(mut client) = es_loadtest::client::IncubatorClient::connect(
                server_info.address("incubator"),
                &server_info.client_tls("incubator"),
                &mut identity,
                common::TIMEOUT,
            ) else {
                return;
            };
            let workload = Workload {
                serial: "DMG-3".into(),
                model: es_perf::catalog::DeviceModel::EmbryoScopePlus,
                dishes: 1,
                wells_per_dish: 3,
                planes: vec![0],
                cycles: 2000,
                start_ms: common::START_MS,
                interval_ms: 600_000,
            };
            if es_loadtest::sim::register_dishes(&mut client, &workload, common::TIMEOUT).is_ok() {
                let frames = es_loadtest::frames::generate(4, 7);
                let _ = es_loadtest::sim::upload(
                    &mut client,
                    &workload,
                    0..workload.len(),
                    &frames,
                    es_loadtest::sim::Pacing::Window,
                    std::time::Instant::now() + std::time::Duration::from_secs(20),
                );
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(400));
    server.kill9();
    let _ = uploading.join();
    server.restart().expect("the server starts after kill -9");
    expect_report(verify_offline_or_online(&data));
    check_paths(&server, &key, &images, &damaged);
    assert_eq!(server.terminate(common::TIMEOUT), Some(0));
}
