//! The blastomere-activity curve end to end: an incubator uploads a synthetic time-lapse (JPEG
//! frames of `es_models::synthetic`, cells that divide at chosen acquisitions), and the public API's
//! curve, computed from the stored JPEGs, peaks at every division and proposes t2-t5 within
//! one acquisition interval of the true times.

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
    let (server, _dir) = common::spawn(true);
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
