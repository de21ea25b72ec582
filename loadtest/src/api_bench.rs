//! The public API benchmark: simulated EMR clients call the REST API over HTTPS while
//! simulated high-capacity incubators upload at a multiple of their nominal rate. Measured
//! open-loop from each call's intended start: the patient list, one embryo's data, one image
//! (JPEG) and the change feed (a poll after the client's last seq). JSON GETs together form
//! `api_get`, images `api_image` (the targets).

use crate::bench::{self, IngestResult};
use crate::http_client::HttpClient;
use crate::spawn::ServerProcess;
use bytes::Bytes;
use es_perf::latency::LatencyRecorder;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::viewer_bench::Operation;

#[derive(Debug, Clone)]
pub struct ApiBenchOptions {
    pub clients: u32,
    /// Images/s offered by the background incubators (0: none).
    pub incubator_rate: f64,
    pub incubators: u32,
    pub duration: Duration,
    /// Calls per second of each client.
    pub calls_per_s: f64,
    pub frames: Arc<Vec<Bytes>>,
    /// The API key the clients send.
    pub key: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiBenchResult {
    pub clients: u32,
    pub incubators: u32,
    pub incubator_rate_offered: f64,
    pub incubators_result: IngestResult,
    /// Per call kind, then `api_get` (every JSON GET) and `api_image`.
    pub operations: Vec<Operation>,
    pub errors: Vec<String>,
}

#[derive(Default)]
struct ClientStats {
    recorders: [LatencyRecorder; 4],
    errors: [u64; 4],
}

const KINDS: [&str; 4] = [
    "api_patient_list",
    "api_embryo_data",
    "api_image",
    "api_change_feed",
];

/// Runs the clients (and the background incubators) for the duration. `embryos` are the
/// seeded embryo ids (see `viewer_bench::seed`).
pub fn run(
    server: &ServerProcess,
    options: &ApiBenchOptions,
    embryos: &[String],
) -> ApiBenchResult {
    let incubators = bench::background_ingest(
        server,
        options.incubators,
        options.incubator_rate,
        options.duration,
        options.frames.clone(),
        "abench",
    );
    let begin = Instant::now() + Duration::from_millis(300);
    let end = begin + options.duration;
    let mut threads = Vec::new();
    for index in 0..options.clients {
        let address = server.info.address("public-api");
        let tls = server.info.client_tls("public-api");
        let embryos = embryos.to_vec();
        let options = options.clone();
        threads.push(std::thread::spawn(move || {
            let mut http = HttpClient::new(address, tls, Duration::from_secs(30));
            client_loop(&mut http, index, &embryos, &options, begin, end)
        }));
    }
    let mut totals = ClientStats::default();
    let mut errors = Vec::new();
    for thread in threads {
        match thread.join().expect("API client thread") {
            Ok(stats) => {
                for kind in 0..4 {
                    totals.recorders[kind].merge(&stats.recorders[kind]);
                    totals.errors[kind] += stats.errors[kind];
                }
            }
            Err(error) => errors.push(error),
        }
    }
    let incubators_result = match incubators {
        Some(thread) => thread.join().expect("incubator thread"),
        None => bench::empty_result(),
    };
    let seconds = options.duration.as_secs_f64();
    let operation = |name: &str, recorder: &LatencyRecorder, errors: u64| Operation {
        name: name.into(),
        latency: recorder.summary(),
        per_s: recorder.count() as f64 / seconds,
        errors,
        curve: recorder.percentile_curve(),
    };
    let mut operations: Vec<Operation> = KINDS
        .iter()
        .enumerate()
        .map(|(kind, name)| operation(name, &totals.recorders[kind], totals.errors[kind]))
        .collect();
    let mut gets = LatencyRecorder::new();
    for kind in [0, 1, 3] {
        gets.merge(&totals.recorders[kind]);
    }
    let get_errors = totals.errors[0] + totals.errors[1] + totals.errors[3];
    operations.push(operation("api_get", &gets, get_errors));
    ApiBenchResult {
        clients: options.clients,
        incubators: options.incubators,
        incubator_rate_offered: options.incubator_rate,
        incubators_result,
        operations,
        errors,
    }
}

/// Open loop: call i is due at begin + i / rate; the kinds rotate (list, data, image x 2,
/// feed), so images are two in five.
fn client_loop(
    http: &mut HttpClient,
    index: u32,
    embryos: &[String],
    options: &ApiBenchOptions,
    begin: Instant,
    end: Instant,
) -> Result<ClientStats, String> {
    let auth = format!("Bearer {}", options.key);
    let headers = [("authorization", auth.as_str())];
    let embryo = &embryos[index as usize % embryos.len()];
    let acquisitions = http
        .get(
            &format!("/api/v1/embryos/{embryo}/acquisitions?limit=1000"),
            &headers,
        )
        .map_err(|e| e.to_string())?;
    if acquisitions.status != 200 {
        return Err(format!("acquisitions: HTTP {}", acquisitions.status));
    }
    let times: Vec<i64> = acquisitions.json()["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|a| a["acquired_at_ms"].as_i64())
                .collect()
        })
        .unwrap_or_default();
    if times.is_empty() {
        return Err("the seed embryo has no images".into());
    }
    let mut cursor = http
        .get("/api/v1/changes?limit=1", &headers)
        .map_err(|e| e.to_string())?
        .json()["last_seq"]
        .as_u64()
        .unwrap_or(0);
    let mut stats = ClientStats::default();
    let interval = Duration::from_secs_f64(1.0 / options.calls_per_s.max(0.1));
    for i in 0u64.. {
        let due = begin + interval * i as u32;
        if due >= end {
            break;
        }
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let (kind, target) = match i % 5 {
            0 => (0, "/api/v1/patients?limit=100".to_string()),
            1 => (1, format!("/api/v1/embryos/{embryo}")),
            2 | 3 => (
                2,
                format!(
                    "/api/v1/embryos/{embryo}/images/{}?focal_plane=0",
                    times[(i as usize * 7919) % times.len()]
                ),
            ),
            _ => (3, format!("/api/v1/changes?after={cursor}&limit=1000")),
        };
        match http.get(&target, &headers) {
            Ok(response) if response.status == 200 => {
                stats.recorders[kind].record(due.elapsed());
                if kind == 3 {
                    // Follow the feed as an EMR mirror would.
                    if let Some(next) = response.json()["next_after"].as_u64() {
                        cursor = next;
                    }
                }
            }
            Ok(_) => stats.errors[kind] += 1,
            Err(error) => return Err(format!("{target}: {error}")),
        }
    }
    Ok(stats)
}
