//! The blastomere-activity curve end to end: an incubator uploads a synthetic time-lapse (JPEG
//! frames of `es_models::synthetic`, cells that divide at chosen acquisitions), and the public API's
//! curve, computed from the stored JPEGs, peaks at every division and proposes t2-t5 within
//! one acquisition interval of the true times. The background computation stores exactly the
//! curve the frames give, goes on after a `kill -9` from where it stopped, and draws it.

mod common;

use common::START_MS;
use es_loadtest::http_client::HttpClient;
use es_loadtest::sim::{self, Pacing, Workload};
use es_perf::catalog::DeviceModel;
use std::time::{Duration, Instant};

const SIDE: usize = 240;
const FRAMES: u32 = 90;
const DIVISIONS: [u32; 4] = [30, 42, 45, 60];

fn frame(index: u32) -> bytes::Bytes {
    let divisions: Vec<usize> = DIVISIONS.iter().map(|&d| d as usize).collect();
    let pixels = es_models::synthetic::frame(SIDE, index as usize, &divisions);
    es_loadtest::frames::encode_grey(&pixels, SIDE as u16, SIDE as u16)
}

#[test]
fn the_curve_from_stored_jpegs_peaks_at_each_division_and_proposes_t2_to_t5() {
    // Computed when asked for: the background computation is off.
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, true, "[Server]\nactivity = off\n");
    let workload = Workload {
        serial: "AC-1".into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: 1,
        planes: vec![0],
        cycles: FRAMES,
        start_ms: START_MS,
        interval_ms: 600_000,
    };
    let frames: Vec<bytes::Bytes> = (0..FRAMES).map(frame).collect();
    let mut identity = common::identity("AC-1", "es-plus");
    let mut client = common::connect(&server, &mut identity);
    sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        &frames,
        Pacing::Window,
        Instant::now() + Duration::from_secs(120),
    );
    assert!(error.is_none() && stats.errors.is_empty(), "{error:?}");
    assert_eq!(stats.acked, u64::from(FRAMES));

    let key = common::create_api_key(&server, "activity test", "read");
    let mut http = HttpClient::new(
        server.info.address("public-api"),
        server.info.client_tls("public-api"),
        common::TIMEOUT,
    );
    let auth = format!("Bearer {key}");
    let response = http
        .request(
            "GET",
            "/api/v1/embryos/AC-1_S1_P-1/activity",
            &[("authorization", auth.as_str())],
            None,
        )
        .unwrap();
    assert_eq!(
        response.status,
        200,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    let curve = response.json();
    assert_eq!(
        curve["points"].as_array().unwrap().len(),
        FRAMES as usize - 1
    );
    assert_eq!(curve["frames_skipped"], 0);
    assert_eq!(curve["source"], "computed_now");
    assert_eq!(curve["pending"], false);
    // The acquisition times of the divisions, in hours after insemination (START_MS - 1 h).
    let interval_h = 600_000.0 / 3_600_000.0;
    for (name, division) in ["t2", "t3", "t4", "t5"].into_iter().zip(DIVISIONS) {
        let spec = workload.image(u64::from(division));
        let want = (spec.acquired_at_ms - (START_MS - 3_600_000)) as f64 / 3_600_000.0;
        let got = curve["proposed"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name}: {}", curve["proposed"]));
        assert!(
            (got - want).abs() <= interval_h + 0.011,
            "{name}: proposed {got} h, divided at {want} h"
        );
    }
    // An embryologist accepts the proposed t2: saved with source `computed` at its acquisition;
    // asked again, it is refused (a saved annotation is never replaced).
    let write_key = common::create_api_key(&server, "activity writer", "write");
    let write_auth = format!("Bearer {write_key}");
    let embryo = http
        .request(
            "GET",
            "/api/v1/embryos/AC-1_S1_P-1",
            &[("authorization", write_auth.as_str())],
            None,
        )
        .unwrap()
        .json();
    let etag = format!("\"{}\"", embryo["version"]);
    let accept = |http: &mut HttpClient, etag: &str| {
        http.request(
            "POST",
            "/api/v1/embryos/AC-1_S1_P-1/activity/proposals/t2",
            &[("authorization", write_auth.as_str()), ("if-match", etag)],
            None,
        )
        .unwrap()
    };
    let accepted = accept(&mut http, &etag);
    assert_eq!(
        accepted.status,
        200,
        "{}",
        String::from_utf8_lossy(&accepted.body)
    );
    let embryo = accepted.json();
    let t2 = embryo["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "t2")
        .expect("t2 saved");
    assert_eq!(t2["source"], "computed");
    assert!(
        (t2["hours"].as_f64().unwrap() - curve["proposed"]["t2"].as_f64().unwrap()).abs() < 0.011
    );
    let again = accept(&mut http, &format!("\"{}\"", embryo["version"]));
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );

    let unknown = http
        .request(
            "GET",
            "/api/v1/embryos/NOPE/activity",
            &[("authorization", auth.as_str())],
            None,
        )
        .unwrap();
    assert_eq!(unknown.status, 404);
}

fn workload(cycles: u32) -> Workload {
    Workload {
        serial: "AB-1".into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: 1,
        planes: vec![0],
        cycles,
        start_ms: START_MS,
        interval_ms: 600_000,
    }
}

/// The curve of `frames` as the server must compute it: each JPEG decoded to grey and
/// compared with the one before.
fn expected_points(frames: &[bytes::Bytes], workload: &Workload) -> Vec<(i64, f64)> {
    let decoded: Vec<_> = frames
        .iter()
        .map(|jpeg| esserver::activity::decode_grey(jpeg).unwrap())
        .collect();
    (1..frames.len())
        .map(|i| {
            fn grey(d: &(usize, usize, Vec<u8>)) -> es_models::activity::Grey<'_> {
                es_models::activity::Grey {
                    width: d.0,
                    height: d.1,
                    pixels: &d.2,
                }
            }
            let value =
                es_models::activity::activity(&grey(&decoded[i - 1]), &grey(&decoded[i])).unwrap();
            (workload.image(i as u64).acquired_at_ms, value)
        })
        .collect()
}

/// Polls the curve until the background computation has analysed every acquisition.
fn settled_curve(http: &mut HttpClient, auth: &str, points: usize) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let response = http
            .request(
                "GET",
                "/api/v1/embryos/AB-1_S1_P-1/activity",
                &[("authorization", auth)],
                None,
            )
            .unwrap();
        if response.status == 200 {
            let curve = response.json();
            if curve["source"] == "background"
                && curve["pending"] == false
                && curve["points"].as_array().unwrap().len() == points
            {
                return curve;
            }
            assert!(
                Instant::now() < deadline,
                "the curve did not settle: {curve}"
            );
        } else {
            assert!(
                Instant::now() < deadline,
                "{}: {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn points_of(curve: &serde_json::Value) -> Vec<(i64, f64)> {
    curve["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["acquired_at_ms"].as_i64().unwrap(),
                p["activity"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_background_stores_the_exact_curve_and_goes_on_after_a_kill() {
    let (mut server, dir) = common::spawn(true);
    let data = dir.path().join("data");
    let whole = workload(FRAMES);
    let frames: Vec<bytes::Bytes> = (0..FRAMES).map(frame).collect();
    let mut identity = common::identity("AB-1", "es-plus");
    let mut upload = |server: &es_loadtest::spawn::ServerProcess, range: std::ops::Range<u64>| {
        let mut client = common::connect(server, &mut identity);
        sim::register_dishes(&mut client, &whole, common::TIMEOUT).unwrap();
        let (stats, error) = sim::upload(
            &mut client,
            &whole,
            range.clone(),
            &frames,
            Pacing::Window,
            Instant::now() + Duration::from_secs(120),
        );
        assert!(error.is_none() && stats.errors.is_empty(), "{error:?}");
        assert_eq!(stats.acked, range.end - range.start);
    };
    let half = u64::from(FRAMES / 2);
    upload(&server, 0..half);
    let key = common::create_api_key(&server, "activity test", "read");
    let auth = format!("Bearer {key}");
    let http_for = |server: &es_loadtest::spawn::ServerProcess| {
        HttpClient::new(
            server.info.address("public-api"),
            server.info.client_tls("public-api"),
            common::TIMEOUT,
        )
    };
    let expected = expected_points(&frames, &whole);
    let mut http = http_for(&server);
    let first = settled_curve(&mut http, &auth, half as usize - 1);
    assert_eq!(points_of(&first), expected[..half as usize - 1]);
    assert_eq!(first["frames_skipped"], 0);

    // Killed, restarted, the other half uploaded: the curve goes on from the stored point
    // (the frame before is decoded once more), with nothing repeated and nothing missing.
    server.restart().unwrap();
    upload(&server, half..u64::from(FRAMES));
    let mut http = http_for(&server);
    let whole_curve = settled_curve(&mut http, &auth, FRAMES as usize - 1);
    assert_eq!(points_of(&whole_curve), expected);
    let status = common::admin_json(&data, &["status"]);
    let activity = &status["activity"];
    assert_eq!(activity["changes_behind"], 0, "{activity}");
    assert_eq!(activity["curves"], 1, "{activity}");
    let analysed = activity["images_analysed"].as_u64().unwrap();
    assert!(
        analysed >= u64::from(FRAMES) - half && analysed <= u64::from(FRAMES) - half + 1,
        "after the restart only the new frames (and the one before) are decoded: {activity}"
    );
    assert!(activity["cpu_ms"].as_u64().is_some(), "{activity}");
    #[cfg(target_os = "linux")]
    assert!(
        activity["priority"]
            .as_str()
            .unwrap()
            .starts_with("SCHED_IDLE"),
        "{activity}"
    );

    // /metrics counts the same.
    let mut web = HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    );
    let metrics = web
        .request("GET", "/metrics", &[("authorization", auth.as_str())], None)
        .unwrap();
    assert_eq!(metrics.status, 200);
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("esserver_activity_changes_behind 0"),
        "{metrics}"
    );
    assert!(metrics.contains("esserver_activity_curves 1"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "esserver_activity_images_analysed_total {analysed}"
        )),
        "{metrics}"
    );
    let text = common::admin(&data, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("activity:   1 curve(s), 0 change(s)"),
        "{text}"
    );

    // The plot: one vertex per point, t2-t5 marked.
    let plot = http
        .request(
            "GET",
            "/api/v1/embryos/AB-1_S1_P-1/activity/plot",
            &[("authorization", auth.as_str())],
            None,
        )
        .unwrap();
    assert_eq!(plot.status, 200);
    assert_eq!(plot.header("content-type"), Some("image/svg+xml"));
    let svg = String::from_utf8(plot.body.to_vec()).unwrap();
    let vertices = svg
        .split("points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    assert_eq!(vertices.split(' ').count(), FRAMES as usize - 1);
    for name in ["t2", "t3", "t4", "t5"] {
        assert!(svg.contains(&format!(">{name} ")), "{name} is not marked");
    }
}
