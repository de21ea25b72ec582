//! The ingestion benchmark: simulated incubators upload to a spawned server while the
//! load generator measures throughput and ack latency; then the disk's own limit is
//! measured with the same bytes and batching, so the result is a ratio from one run.

use crate::client::{ClientError, Identity, IncubatorClient};
use crate::sim::{self, Pacing, UploadStats, Workload};
use crate::spawn::ServerProcess;
use bytes::Bytes;
use es_perf::catalog::DeviceModel;
use es_perf::latency::{LatencyRecorder, LatencySummary};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub incubators: u32,
    pub model: DeviceModel,
    /// Total offered images/s over all incubators, open loop; `None` is as fast as the
    /// server's window allows.
    pub offered_per_s: Option<f64>,
    pub duration: Duration,
    /// Most image bytes the run sends (over all incubators).
    pub bytes_max: u64,
    pub frames: Arc<Vec<Bytes>>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct IngestResult {
    pub incubators: u32,
    pub offered_per_s: Option<f64>,
    /// Images sent (an image sent and not acknowledged was lost or cut by the deadline).
    pub images_sent: u64,
    pub images_acked: u64,
    pub bytes_acked: u64,
    pub elapsed_s: f64,
    pub images_per_s: f64,
    pub megabytes_per_s: f64,
    pub ack_latency: LatencySummary,
    pub errors: BTreeMap<String, u64>,
    pub connection_errors: Vec<String>,
    /// TELEMETRY messages acknowledged and alarms sent in them (`esload run`: every device
    /// sends its channels once a simulated minute; 0 in the other benchmarks).
    #[serde(default)]
    pub telemetry_acked: u64,
    #[serde(default)]
    pub alarms_sent: u64,
}

/// Starts the clients of one phase together: each connects (and registers) first, then
/// [`StartGate::wait`]s; every one gets the same start instant, shortly after the last one
/// is ready, so connection set-up never counts as latency of the first images.
pub struct StartGate {
    barrier: std::sync::Barrier,
    begin: std::sync::OnceLock<Instant>,
}

impl StartGate {
    pub fn new(clients: u32) -> StartGate {
        StartGate {
            barrier: std::sync::Barrier::new(clients.max(1) as usize),
            begin: std::sync::OnceLock::new(),
        }
    }

    /// The start instant, once every client is ready.
    pub fn started(&self) -> Option<Instant> {
        self.begin.get().copied()
    }

    /// Blocks until every client has called it; returns the common start instant. Each
    /// client must call it exactly once, also when its set-up failed.
    pub fn wait(&self) -> Instant {
        self.barrier.wait();
        *self
            .begin
            .get_or_init(|| Instant::now() + Duration::from_millis(50))
    }
}

/// Runs one ingestion phase against `server` (incubator serials are prefixed by `tag` so
/// phases do not collide).
pub fn run_ingest(server: &ServerProcess, options: &IngestOptions, tag: &str) -> IngestResult {
    run_ingest_on(&server.info, options, tag)
}

/// A result with nothing measured (no incubators ran).
pub fn empty_result() -> IngestResult {
    IngestResult {
        incubators: 0,
        offered_per_s: None,
        images_sent: 0,
        images_acked: 0,
        bytes_acked: 0,
        elapsed_s: 0.0,
        images_per_s: 0.0,
        megabytes_per_s: 0.0,
        ack_latency: LatencyRecorder::new().summary(),
        errors: BTreeMap::new(),
        connection_errors: Vec::new(),
        telemetry_acked: 0,
        alarms_sent: 0,
    }
}

/// [`run_ingest`] against the server `info` describes.
pub fn run_ingest_on(
    info: &crate::spawn::ServerInfo,
    options: &IngestOptions,
    tag: &str,
) -> IngestResult {
    let address = info.address("incubator");
    let tls = info.client_tls("incubator");
    let frame_bytes = options.frames.iter().map(|f| f.len() as u64).sum::<u64>()
        / options.frames.len().max(1) as u64;
    let images_total = options.bytes_max / frame_bytes.max(1);
    let per_incubator = (images_total / options.incubators.max(1) as u64).max(1);
    let start_ms = crate::client::now_ms() - 86_400_000;
    let gate = Arc::new(StartGate::new(options.incubators));
    let threads: Vec<_> = (0..options.incubators)
        .map(|n| {
            let options = options.clone();
            let tls = tls.clone();
            let serial = format!("{tag}-{n:02}");
            let gate = gate.clone();
            std::thread::spawn(move || -> (UploadStats, Option<ClientError>) {
                let spec = options.model.spec();
                let per_cycle = spec.positions() as u64 * spec.focal_planes.len() as u64;
                let cycles = per_incubator.div_ceil(per_cycle.max(1)) as u32;
                let workload = Workload::full(&serial, options.model, cycles.max(1), start_ms);
                let mut identity = Identity {
                    instrument_number: 0,
                    serial: serial.clone(),
                    model: options.model.name().into(),
                    firmware: "sim-1.0".into(),
                    secret: String::new(),
                };
                let connect =
                    IncubatorClient::connect(address, &tls, &mut identity, Duration::from_secs(30));
                let ready = connect.and_then(|mut client| {
                    sim::register_dishes(&mut client, &workload, Duration::from_secs(30))
                        .map(|()| client)
                });
                // Every incubator is connected and registered before the schedule starts.
                let begin = gate.wait();
                let mut client = match ready {
                    Ok(client) => client,
                    Err(error) => return (UploadStats::default(), Some(error)),
                };
                let pacing = match options.offered_per_s {
                    Some(total) => Pacing::OpenLoop {
                        start: begin,
                        interval: Duration::from_secs_f64(options.incubators as f64 / total),
                    },
                    None => Pacing::Window,
                };
                let deadline = begin.max(Instant::now()) + options.duration;
                sim::upload(
                    &mut client,
                    &workload,
                    0..per_incubator.min(workload.len()),
                    &options.frames,
                    pacing,
                    deadline,
                )
            })
        })
        .collect();
    let mut latency = LatencyRecorder::new();
    let mut result = IngestResult {
        incubators: options.incubators,
        offered_per_s: options.offered_per_s,
        images_sent: 0,
        images_acked: 0,
        bytes_acked: 0,
        elapsed_s: 0.0,
        images_per_s: 0.0,
        megabytes_per_s: 0.0,
        ack_latency: LatencyRecorder::new().summary(),
        errors: BTreeMap::new(),
        connection_errors: Vec::new(),
        telemetry_acked: 0,
        alarms_sent: 0,
    };
    let mut elapsed_max = Duration::ZERO;
    for thread in threads {
        let (stats, error) = thread.join().expect("incubator thread");
        latency.merge(&stats.latency);
        result.images_sent += stats.sent;
        result.images_acked += stats.acked;
        result.bytes_acked += stats.bytes_acked;
        elapsed_max = elapsed_max.max(stats.elapsed);
        for (name, count) in stats.errors {
            *result.errors.entry(name).or_default() += count;
        }
        if let Some(error) = error {
            result.connection_errors.push(error.to_string());
        }
    }
    result.elapsed_s = elapsed_max.as_secs_f64().max(1e-9);
    result.images_per_s = result.images_acked as f64 / result.elapsed_s;
    result.megabytes_per_s = result.bytes_acked as f64 / result.elapsed_s / 1e6;
    result.ack_latency = latency.summary();
    result
}

/// Peak resident memory of a process (Linux: VmHWM), in bytes.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Simulated EmbryoScope+ incubators uploading open loop at `rate` images/s for `duration`
/// on their own thread, in the background of another benchmark (None when `rate` is 0).
pub fn background_ingest(
    server: &crate::spawn::ServerProcess,
    incubators: u32,
    rate: f64,
    duration: std::time::Duration,
    frames: std::sync::Arc<Vec<bytes::Bytes>>,
    tag: &'static str,
) -> Option<std::thread::JoinHandle<IngestResult>> {
    (rate > 0.0).then(|| {
        let ingest = IngestOptions {
            incubators,
            model: es_perf::catalog::DeviceModel::EmbryoScopePlus,
            offered_per_s: Some(rate),
            duration,
            bytes_max: (rate * duration.as_secs_f64() * 40_000.0) as u64,
            frames,
        };
        let server_info = server.info.clone();
        std::thread::spawn(move || run_ingest_on(&server_info, &ingest, tag))
    })
}

/// What the server process has used so far (Linux: `/proc/<pid>/stat` and `/proc/<pid>/io`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessCounters {
    /// User plus system CPU time, seconds.
    pub cpu_s: f64,
    /// Bytes the process caused to be written to the storage layer (`write_bytes`).
    pub write_bytes: u64,
}

/// The counters of process `pid`, None where /proc does not have them.
pub fn process_counters(pid: u32) -> Option<ProcessCounters> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of stat(5); `after` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let write_bytes = io
        .lines()
        .find_map(|line| line.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessCounters {
        cpu_s: (utime + stime) as f64 / clock_ticks_per_s(),
        write_bytes,
    })
}

fn clock_ticks_per_s() -> f64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf reads a constant of the system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            return ticks as f64;
        }
    }
    100.0
}

/// The server's cost of a phase: CPU per image, bytes written per image byte, and what its data
/// directory holds per image byte stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ServerCost {
    /// Images and image bytes acknowledged in the phase.
    pub images: u64,
    pub image_bytes: u64,
    /// Server CPU (user + system) during the phase, per image, milliseconds.
    pub cpu_ms_per_image: f64,
    /// Bytes the server wrote to disk during the phase per image byte acknowledged.
    pub written_per_image_byte: f64,
    /// The data directory's bytes (database and volumes) per image byte stored, at the end.
    pub data_dir_per_image_byte: Option<f64>,
}

impl ServerCost {
    /// From the counters before and after a phase that acknowledged `images` of
    /// `image_bytes`; `stored` is (data directory bytes, image bytes stored) at the end.
    pub fn between(
        before: ProcessCounters,
        after: ProcessCounters,
        images: u64,
        image_bytes: u64,
        stored: Option<(u64, u64)>,
    ) -> ServerCost {
        ServerCost {
            images,
            image_bytes,
            cpu_ms_per_image: (after.cpu_s - before.cpu_s) * 1000.0 / images.max(1) as f64,
            written_per_image_byte: after.write_bytes.saturating_sub(before.write_bytes) as f64
                / image_bytes.max(1) as f64,
            data_dir_per_image_byte: stored.map(|(dir, images)| dir as f64 / images.max(1) as f64),
        }
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let stored = match self.data_dir_per_image_byte {
            Some(ratio) => format!("; data directory {ratio:.3} bytes per image byte stored"),
            None => String::new(),
        };
        format!(
            "server cost: {:.4} ms CPU per image; {:.3} bytes written per image byte{stored}",
            self.cpu_ms_per_image, self.written_per_image_byte
        )
    }
}

/// Bytes of a server's store on disk: the database file and the image volumes (`volumes/`).
/// None when the database file is not there.
pub fn stored_bytes(data_dir: &std::path::Path) -> Option<u64> {
    let database = std::fs::metadata(data_dir.join("esserver.redb"))
        .ok()?
        .len();
    let volumes: u64 = std::fs::read_dir(data_dir.join("volumes"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.metadata().ok())
                .filter(|meta| meta.is_file())
                .map(|meta| meta.len())
                .sum()
        })
        .unwrap_or(0);
    Some(database + volumes)
}
