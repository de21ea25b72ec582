//! The viewer benchmark: 4 simulated viewers work against a spawned server while simulated
//! high-capacity incubators upload at a multiple of their nominal rate. Measured open-loop
//! from each operation's intended start: frame fetch (GetImage), dish overview, annotation
//! save (durable), change push (save request to the notice's arrival at the other viewers) and
//! playback throughput to one viewer (frames/s).

use crate::bench::{self, IngestResult};
use crate::spawn::ServerProcess;
use crate::viewer_client::{Credentials, ViewerClient, ViewerError};
use bytes::Bytes;
use es_perf::catalog::DeviceModel;
use es_perf::latency::{LatencyRecorder, LatencySummary};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The password of the benchmark's users.
pub const PASSWORD: &str = "Bench-viewer-2026!";

#[derive(Debug, Clone)]
pub struct ViewerBenchOptions {
    pub viewers: u32,
    /// Images/s offered by the background incubators (0: none).
    pub incubator_rate: f64,
    pub incubators: u32,
    pub duration: Duration,
    /// Operations per second of each interactive viewer (frame fetches; overviews and saves
    /// are one in ten each).
    pub viewer_ops_per_s: f64,
    pub frames: Arc<Vec<Bytes>>,
    /// Set to end the viewers before `duration` (a catch-up run ends when its backlog is in).
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Operation {
    pub name: String,
    pub latency: LatencySummary,
    pub per_s: f64,
    pub errors: u64,
    /// (percentile, µs) points of the latency distribution, for plots.
    #[serde(skip)]
    pub curve: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewerBenchResult {
    pub viewers: u32,
    pub incubators: u32,
    pub incubator_rate_offered: f64,
    pub incubators_result: IngestResult,
    pub operations: Vec<Operation>,
    pub playback_frames_per_s: f64,
    pub playback_frames: u64,
    pub errors: Vec<String>,
}

/// Embryos seeded for the viewers: one dish of 4 wells with `cycles` acquisitions at plane 0.
pub const SEED_WELLS: u32 = 4;

/// Uploads the seed dish; returns its embryo ids.
pub fn seed(server: &ServerProcess, frames: &[Bytes], cycles: u32) -> Result<Vec<String>, String> {
    use crate::client::{Identity, IncubatorClient};
    use crate::sim::{self, Pacing, Workload};
    let mut identity = Identity {
        instrument_number: 0,
        serial: "VIEWSEED".into(),
        model: "es-plus".into(),
        firmware: "sim-1.0".into(),
        secret: String::new(),
    };
    let address = server.info.address("incubator");
    let tls = server.info.client_tls("incubator");
    let mut client =
        IncubatorClient::connect(address, &tls, &mut identity, Duration::from_secs(30))
            .map_err(|e| e.to_string())?;
    let workload = Workload {
        serial: "VIEWSEED".into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: SEED_WELLS,
        planes: vec![0],
        cycles,
        start_ms: crate::client::now_ms() - 30 * 86_400_000,
        interval_ms: 600_000,
    };
    sim::register_dishes(&mut client, &workload, Duration::from_secs(30))
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        frames,
        Pacing::Window,
        deadline,
    );
    if let Some(error) = error {
        return Err(format!("seeding: {error}"));
    }
    if stats.acked != workload.len() {
        return Err(format!(
            "seeding: {} of {} images acknowledged",
            stats.acked,
            workload.len()
        ));
    }
    // Gone before the benchmark's incubators connect: they fill the licence's capacity.
    client
        .close(Duration::from_secs(30))
        .map_err(|e| format!("seeding: closing: {e}"))?;
    Ok((1..=SEED_WELLS)
        .map(|well| format!("VIEWSEED_S1_P-{well}"))
        .collect())
}

struct Shared {
    /// change seq of a save -> when the save was meant to be sent.
    saves: Mutex<HashMap<u64, Instant>>,
}

/// Runs the viewers (and the background incubators) for the duration.
pub fn run(
    server: &ServerProcess,
    options: &ViewerBenchOptions,
    embryos: &[String],
    users: &[String],
) -> ViewerBenchResult {
    let shared = Arc::new(Shared {
        saves: Mutex::new(HashMap::new()),
    });
    let incubators = bench::background_ingest(
        server,
        options.incubators,
        options.incubator_rate,
        options.duration,
        options.frames.clone(),
        "vbench",
    );
    let begin = Instant::now() + Duration::from_millis(300);
    let end = begin + options.duration;
    let mut threads = Vec::new();
    for index in 0..options.viewers {
        let address = server.info.address("viewer");
        let tls = server.info.client_tls("viewer");
        let user = users[index as usize % users.len()].clone();
        let embryos = embryos.to_vec();
        let shared = shared.clone();
        let options = options.clone();
        threads.push(std::thread::spawn(move || {
            let credentials = Credentials {
                user,
                password: PASSWORD.into(),
                computer: format!("BENCH-{index}"),
            };
            let mut client =
                ViewerClient::login(address, &tls, &credentials, Duration::from_secs(30))?;
            let stop = options.stop.clone();
            let stopped = move || {
                stop.as_ref()
                    .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            };
            if index == 0 {
                playback_loop(&mut client, &embryos[0], begin, end, &stopped)
                    .map(ViewerOutcome::Playback)
            } else {
                let embryo = embryos[(index as usize) % embryos.len()].clone();
                interactive_loop(
                    &mut client,
                    &embryo,
                    &shared,
                    &options,
                    begin,
                    end,
                    &stopped,
                )
                .map(|stats| ViewerOutcome::Interactive(Box::new(stats)))
            }
        }));
    }
    let mut fetch = LatencyRecorder::new();
    let mut overview = LatencyRecorder::new();
    let mut save = LatencyRecorder::new();
    let mut errors = Vec::new();
    let mut op_errors = [0u64; 3];
    let mut arrivals: Vec<Arrivals> = Vec::new();
    let (mut playback_frames, mut playback_seconds) = (0u64, 0f64);
    for thread in threads {
        match thread.join().expect("viewer thread") {
            Ok(ViewerOutcome::Playback((frames, seconds))) => {
                playback_frames += frames;
                playback_seconds += seconds;
            }
            Ok(ViewerOutcome::Interactive(stats)) => {
                fetch.merge(&stats.fetch);
                overview.merge(&stats.overview);
                save.merge(&stats.save);
                for (total, add) in op_errors.iter_mut().zip(stats.errors) {
                    *total += add;
                }
                arrivals.push((stats.arrivals, stats.own_saves));
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    let incubators_result = match incubators {
        Some(thread) => thread.join().expect("incubator thread"),
        None => bench::empty_result(),
    };
    // The time the viewers ran (less than the duration when stopped early).
    let seconds = Instant::now()
        .saturating_duration_since(begin)
        .min(options.duration)
        .as_secs_f64()
        .max(1e-3);
    // Push latency: every other viewer's arrival of each save's notice.
    let mut push = LatencyRecorder::new();
    let saves = shared.saves.lock();
    for (seen, own) in &arrivals {
        for (change_seq, arrived) in seen {
            if own.contains(change_seq) {
                continue;
            }
            if let Some(sent) = saves.get(change_seq) {
                push.record(arrived.saturating_duration_since(*sent));
            }
        }
    }
    drop(saves);
    let operation = |name: &str, recorder: &LatencyRecorder, errors: u64| Operation {
        name: name.into(),
        latency: recorder.summary(),
        per_s: recorder.count() as f64 / seconds,
        errors,
        curve: recorder.percentile_curve(),
    };
    ViewerBenchResult {
        viewers: options.viewers,
        incubators: options.incubators,
        incubator_rate_offered: options.incubator_rate,
        incubators_result,
        operations: vec![
            operation("viewer_frame_fetch", &fetch, op_errors[0]),
            operation("viewer_dish_overview", &overview, op_errors[1]),
            operation("viewer_annotation_save", &save, op_errors[2]),
            operation("viewer_change_push", &push, 0),
        ],
        playback_frames_per_s: playback_frames as f64 / playback_seconds.max(1e-9),
        playback_frames,
        errors,
    }
}

/// The notices one viewer read (change seq, when) and the change seqs of its own saves.
type Arrivals = (Vec<(u64, Instant)>, std::collections::HashSet<u64>);

enum ViewerOutcome {
    Playback((u64, f64)),
    Interactive(Box<InteractiveStats>),
}

#[derive(Default)]
struct InteractiveStats {
    fetch: LatencyRecorder,
    overview: LatencyRecorder,
    save: LatencyRecorder,
    errors: [u64; 3],
    /// Every notice read: (change seq, when).
    arrivals: Vec<(u64, Instant)>,
    /// The change seqs of this viewer's own saves.
    own_saves: std::collections::HashSet<u64>,
}

/// Plays the embryo's whole sequence again and again; returns (frames, seconds).
fn playback_loop(
    client: &mut ViewerClient,
    embryo_id: &str,
    begin: Instant,
    end: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(u64, f64), ViewerError> {
    std::thread::sleep(begin.saturating_duration_since(Instant::now()));
    let started = Instant::now();
    let mut frames = 0u64;
    while Instant::now() < end && !stopped() {
        let seq = client.send(Request::Playback(pb::Playback {
            embryo_id: embryo_id.into(),
            focal_plane: 0,
            ..Default::default()
        }));
        loop {
            let Body::Frame(frame) = client.wait(seq, "a playback frame")? else {
                return Err(ViewerError::Unexpected("not a frame".into()));
            };
            if frame.image.is_some() {
                frames += 1;
            }
            if frame.last {
                break;
            }
        }
    }
    Ok((frames, started.elapsed().as_secs_f64()))
}

/// Open loop: operation i is due at begin + i / rate; one in ten is a dish overview, one in
/// ten an annotation save, the rest frame fetches.
fn interactive_loop(
    client: &mut ViewerClient,
    embryo_id: &str,
    shared: &Shared,
    options: &ViewerBenchOptions,
    begin: Instant,
    end: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<InteractiveStats, ViewerError> {
    let mut stats = InteractiveStats::default();
    let Body::Embryo(embryo) = client.call(Request::GetEmbryo(pb::GetEmbryo {
        embryo_id: embryo_id.into(),
    }))?
    else {
        return Err(ViewerError::Unexpected("not an embryo".into()));
    };
    let mut version = embryo.version;
    let dish_key = embryo.dish_key;
    let Body::AcquisitionList(list) =
        client.call(Request::ListAcquisitions(pb::ListAcquisitions {
            embryo_id: embryo_id.into(),
            ..Default::default()
        }))?
    else {
        return Err(ViewerError::Unexpected("not acquisitions".into()));
    };
    let times: Vec<i64> = list.acquisitions.iter().map(|a| a.acquired_at_ms).collect();
    if times.is_empty() {
        return Err(ViewerError::Unexpected(
            "the seed embryo has no images".into(),
        ));
    }
    let interval = Duration::from_secs_f64(1.0 / options.viewer_ops_per_s.max(0.1));
    for i in 0u64.. {
        let due = begin + interval * i as u32;
        if due >= end || stopped() {
            break;
        }
        // Read what arrives (notices) while waiting for the next operation's time.
        if due > Instant::now() {
            client.poll(due)?;
        }
        let (kind, request) = match i % 10 {
            3 => (
                1,
                Request::DishOverview(pb::DishOverview {
                    dish_key,
                    focal_plane: 0,
                }),
            ),
            7 => (
                2,
                Request::AddAnnotation(pb::AddAnnotation {
                    embryo_id: embryo_id.into(),
                    expected_version: version,
                    annotation: Some(pb::AnnotationInput {
                        name: "FRAG".into(),
                        value: format!("{}", i % 4),
                        ..Default::default()
                    }),
                }),
            ),
            _ => (
                0,
                Request::GetImage(pb::GetImage {
                    embryo_id: embryo_id.into(),
                    acquired_at_ms: times[(i as usize * 7919) % times.len()],
                    focal_plane: 0,
                }),
            ),
        };
        match client.call(request) {
            Ok(Body::Saved(saved)) => {
                version = saved.version;
                shared.saves.lock().insert(saved.change_seq, due);
                stats.own_saves.insert(saved.change_seq);
                stats.save.record(due.elapsed());
            }
            Ok(_) => {
                let recorder = if kind == 0 {
                    &mut stats.fetch
                } else {
                    &mut stats.overview
                };
                recorder.record(due.elapsed());
            }
            Err(ViewerError::Server {
                current_version, ..
            }) if kind == 2 && current_version > 0 => {
                version = current_version;
                stats.errors[kind] += 1;
            }
            Err(ViewerError::Server { .. }) => stats.errors[kind] += 1,
            Err(error) => return Err(error),
        }
    }
    // Collect the last notices.
    client.poll(Instant::now() + Duration::from_millis(500))?;
    stats.arrivals = std::mem::take(&mut client.notice_arrivals);
    Ok(stats)
}
