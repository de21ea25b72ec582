//! `loadtest run`, `saturate` and `catch-up`: a device mix (a licence configuration or an
//! explicit list) at its real rates times a speed-up, open loop, with live progress, a report
//! against the targets in es-perf, JSON and an SVG plot.

use crate::bench::IngestResult;
use crate::client::{ClientError, Identity, IncubatorClient};
use crate::sim::{self, Pacing, Progress, Workload};
use crate::spawn::ServerInfo;
use bytes::Bytes;
use es_perf::catalog::DeviceModel;
use es_perf::config_rules::{self, Configuration};
use es_perf::latency::{LatencyRecorder, LatencySummary};
use es_perf::targets::{self, TargetResult};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a run simulates: incubators (one entry per device) and viewer computers.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    pub incubators: Vec<DeviceModel>,
    pub viewers: u32,
    /// Browsers on the browser viewer (`crate::browser_bench`).
    pub browsers: u32,
}

impl Mix {
    /// The devices a licence configuration allows at most: basic is one EmbryoScope+ (its
    /// two units) and one viewer computer; high capacity eight EmbryoScope+ (sixteen units)
    /// and four viewer computers.
    pub fn of_configuration(configuration: Configuration) -> Mix {
        let plus = configuration
            .plus_flex_max()
            .min(configuration.units_max() / 2);
        Mix {
            incubators: vec![DeviceModel::EmbryoScopePlus; plus as usize],
            viewers: configuration.computers_max(),
            browsers: 0,
        }
    }

    /// `es-plus:7,es-d:2,viewer:4,browser:4`: every catalog model by name, `viewer` and
    /// `browser`.
    pub fn parse(text: &str) -> Result<Mix, String> {
        let mut viewers = 0;
        let mut browsers = 0;
        let mut rest = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once(':') {
                Some(("viewer" | "viewers", count)) => {
                    viewers = count
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| *n <= 64)
                        .ok_or_else(|| format!("`{part}`: viewers are a number from 0 to 64"))?;
                }
                Some(("browser" | "browsers", count)) => {
                    browsers = count
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| *n <= 64)
                        .ok_or_else(|| format!("`{part}`: browsers are a number from 0 to 64"))?;
                }
                _ => rest.push(part),
            }
        }
        let devices = config_rules::parse_devices(&rest.join(","))?;
        let incubators = devices
            .into_iter()
            .flat_map(|(model, count)| std::iter::repeat_n(model, count as usize))
            .collect();
        Ok(Mix {
            incubators,
            viewers,
            browsers,
        })
    }

    /// Images/s of the incubators at their real rates.
    pub fn nominal_images_per_s(&self) -> f64 {
        self.incubators
            .iter()
            .map(|m| m.spec().images_per_second())
            .sum()
    }

    pub fn describe(&self) -> String {
        let mut counts: Vec<(DeviceModel, u32)> = Vec::new();
        for model in &self.incubators {
            match counts.iter_mut().find(|(m, _)| m == model) {
                Some((_, n)) => *n += 1,
                None => counts.push((*model, 1)),
            }
        }
        let mut parts: Vec<String> = counts
            .iter()
            .map(|(m, n)| format!("{}:{n}", m.name()))
            .collect();
        if self.viewers > 0 {
            parts.push(format!("viewer:{}", self.viewers));
        }
        if self.browsers > 0 {
            parts.push(format!("browser:{}", self.browsers));
        }
        parts.join(",")
    }
}

/// The high-capacity configuration's nominal image rate: the unit saturate reports in.
pub fn high_capacity_nominal_per_s() -> f64 {
    Mix::of_configuration(Configuration::HighCapacity).nominal_images_per_s()
}

/// One incubator of a phase that uploads a backlog as fast as the server accepts.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    /// Which incubator of the mix.
    pub index: usize,
    pub hours: f64,
}

#[derive(Debug, Clone)]
pub struct PhaseOptions {
    pub mix: Mix,
    /// Multiple of the real rates.
    pub speedup: f64,
    pub duration: Duration,
    /// Most image bytes the phase sends.
    pub bytes_max: u64,
    pub frames: Arc<Vec<Bytes>>,
    /// Serial prefix, distinct per phase.
    pub tag: String,
    pub backlog: Option<Backlog>,
    /// Print a progress line every second.
    pub progress: bool,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_s: f64,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    /// Ack p99 of the images acknowledged in that second, ms.
    pub p99_ms: f64,
}

/// One operation's figures and its curve (percentile, µs).
#[derive(Debug, Clone, Serialize)]
pub struct OperationReport {
    pub name: String,
    pub per_s: f64,
    pub latency: LatencySummary,
    pub errors: u64,
    pub curve: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    pub mix: String,
    pub speedup: f64,
    pub offered_per_s: f64,
    /// The offered rate as a multiple of the high-capacity configuration's nominal rate.
    pub offered_high_capacity_multiple: f64,
    pub live: IngestResult,
    pub backlog: Option<IngestResult>,
    pub operations: Vec<OperationReport>,
    pub timeline: Vec<Sample>,
    pub targets: Vec<TargetResult>,
    pub errors: Vec<String>,
    pub pass: bool,
    /// The spawned server's CPU per image, bytes written per image byte and data directory
    /// per image byte stored (None for a server this run did not start).
    pub server_cost: Option<crate::bench::ServerCost>,
    /// The spawned server's background activity computation at the end of the phase (None
    /// when it is off or the server was not spawned).
    pub server_activity: Option<ServerActivity>,
    /// The browsers' playbacks (None without browsers).
    pub browsers: Option<BrowserSummary>,
}

/// What the browsers' playbacks did (`crate::browser_bench`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct BrowserSummary {
    pub browsers: u32,
    pub playbacks: u64,
    pub playbacks_stalled: u64,
    pub fps_min: f64,
    pub fps_median: f64,
    pub frames: u64,
    /// Answers of the pages' long polls of the change feed.
    pub polls: u64,
}

impl BrowserSummary {
    pub fn line(&self) -> String {
        format!(
            "browsers: {} playing {} frames each at {} frames/s over TLS: {} playbacks, {} with a stall; \
             playback rate lowest {:.1}, median {:.1} frames/s; {} frames fetched (with a \
             smaller one per playback); {} long-poll answers",
            self.browsers,
            crate::browser_bench::PLAYBACK_FRAMES,
            crate::browser_bench::PLAYBACK_FPS,
            self.playbacks,
            self.playbacks_stalled,
            self.fps_min,
            self.fps_median,
            self.frames,
            self.polls
        )
    }
}

/// What the server's background activity computation did (`esserver status`, `activity`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ServerActivity {
    pub images_analysed: u64,
    pub cpu_ms: u64,
    pub images_per_cpu_s: f64,
    /// Changes still to look at when the phase ended.
    pub changes_behind: u64,
    pub curves: u64,
}

impl ServerActivity {
    /// From `esserver status --json`; None when the computation is off.
    pub fn from_status(status: &serde_json::Value) -> Option<ServerActivity> {
        let activity = status.get("activity").filter(|a| !a.is_null())?;
        let number = |name: &str| activity[name].as_u64().unwrap_or(0);
        Some(ServerActivity {
            images_analysed: number("images_analysed"),
            cpu_ms: number("cpu_ms"),
            images_per_cpu_s: activity["images_per_cpu_s"].as_f64().unwrap_or(0.0),
            changes_behind: number("changes_behind"),
            curves: number("curves"),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "server activity computation: {} images analysed in {:.1} s of CPU ({:.0} per CPU second), {} curves, {} changes behind at the end",
            self.images_analysed,
            self.cpu_ms as f64 / 1000.0,
            self.images_per_cpu_s,
            self.curves,
            self.changes_behind
        )
    }
}

/// Viewers for a phase: they need a spawned server (users and a seeded dish).
pub struct ViewerSetup<'a> {
    pub server: &'a crate::spawn::ServerProcess,
    pub embryos: &'a [String],
    pub users: &'a [String],
    pub ops_per_s: f64,
}

/// Runs one phase: every incubator of the mix open loop at its real rate x `speedup` (the
/// backlog one, if any, as fast as the server accepts), and the viewers, for `duration`.
pub fn run_phase(
    info: &ServerInfo,
    options: &PhaseOptions,
    viewers: Option<&ViewerSetup<'_>>,
) -> PhaseReport {
    let frame_bytes = (options.frames.iter().map(|f| f.len() as u64).sum::<u64>()
        / options.frames.len().max(1) as u64)
        .max(1);
    let live_rates: Vec<f64> = options
        .mix
        .incubators
        .iter()
        .enumerate()
        .map(|(i, m)| match options.backlog {
            Some(b) if b.index == i => 0.0,
            _ => m.spec().images_per_second() * options.speedup,
        })
        .collect();
    let offered: f64 = live_rates.iter().sum();
    // The byte budget: the live incubators' share first (their schedule), the rest to the
    // backlog.
    let live_bytes =
        ((offered * options.duration.as_secs_f64()) as u64 * frame_bytes).min(options.bytes_max);
    let backlog_bytes = options.bytes_max.saturating_sub(live_bytes);
    let live_progress = Arc::new(Progress::default());
    let backlog_progress = Arc::new(Progress::default());
    let start_ms = crate::client::now_ms() - 86_400_000;
    // Every incubator connects and registers its dishes first; the schedule starts after.
    let gate = Arc::new(crate::bench::StartGate::new(
        options.mix.incubators.len() as u32
    ));
    let duration = options.duration;
    let speedup = options.speedup;
    let mut threads = Vec::new();
    for (index, model) in options.mix.incubators.iter().copied().enumerate() {
        let serial = format!("{}-{index:02}", options.tag);
        let address = info.address("incubator");
        let tls = info.client_tls("incubator");
        let frames = options.frames.clone();
        let backlog = options.backlog.filter(|b| b.index == index);
        let (progress, interval, images) = match backlog {
            Some(b) => {
                let images = ((model.spec().images_per_second() * b.hours * 3600.0) as u64)
                    .min(backlog_bytes / frame_bytes)
                    .max(1);
                (backlog_progress.clone(), None, images)
            }
            None => {
                let rate = live_rates[index];
                let share = if offered > 0.0 { rate / offered } else { 0.0 };
                let by_time = (rate * options.duration.as_secs_f64()).ceil() as u64 + 1;
                let by_bytes = (live_bytes as f64 * share) as u64 / frame_bytes;
                let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
                // A device that makes no images (CulturePro) connects and sends none.
                let images = if rate > 0.0 {
                    by_time.min(by_bytes).max(1)
                } else {
                    0
                };
                (live_progress.clone(), Some(interval), images)
            }
        };
        let is_backlog = backlog.is_some();
        let gate = gate.clone();
        threads.push((
            is_backlog,
            std::thread::spawn(move || {
                let device = Device {
                    serial: &serial,
                    model,
                    address,
                    tls: &tls,
                    speedup,
                };
                upload_one(
                    &device, &frames, interval, images, start_ms, duration, &gate, &progress,
                )
            }),
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let display = {
        let (live, backlog, stop) = (
            live_progress.clone(),
            backlog_progress.clone(),
            stop.clone(),
        );
        let (show, total) = (options.progress, options.duration);
        let has_backlog = options.backlog.is_some();
        let gate = gate.clone();
        std::thread::spawn(move || {
            // The clock starts when every incubator is ready.
            let begin = loop {
                if let Some(begin) = gate.started() {
                    break begin;
                }
                if stop.load(Ordering::Relaxed) {
                    return Vec::new();
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            progress_loop(
                &live,
                &backlog,
                has_backlog,
                offered,
                begin,
                total,
                show,
                &stop,
            )
        })
    };
    let mut live = Collected::default();
    let mut backlog = options.backlog.map(|_| Collected::default());
    let viewers_stop = Arc::new(AtomicBool::new(false));
    let viewer_result = std::thread::scope(|scope| {
        // The viewers run beside the incubators.
        let viewer_thread = viewers.filter(|_| options.mix.viewers > 0).map(|v| {
            let viewer_options = crate::viewer_bench::ViewerBenchOptions {
                viewers: options.mix.viewers,
                incubator_rate: 0.0,
                incubators: 0,
                duration: options.duration,
                viewer_ops_per_s: v.ops_per_s,
                frames: options.frames.clone(),
                stop: Some(viewers_stop.clone()),
            };
            scope.spawn(move || {
                crate::viewer_bench::run(v.server, &viewer_options, v.embryos, v.users)
            })
        });
        let browser_thread = viewers.filter(|_| options.mix.browsers > 0).map(|v| {
            let browser_options = crate::browser_bench::BrowserOptions {
                browsers: options.mix.browsers,
                duration: options.duration,
                stop: Some(viewers_stop.clone()),
                password: crate::viewer_bench::PASSWORD.to_string(),
            };
            scope.spawn(move || {
                crate::browser_bench::run(v.server, &browser_options, v.embryos, v.users)
            })
        });
        // The backlog first: once it is uploaded, the live devices stop too.
        let (backlog_threads, live_threads): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|(is_backlog, _)| *is_backlog);
        if let Some(collected) = &mut backlog {
            for (_, thread) in backlog_threads {
                let (stats, error) = thread.join().expect("incubator thread");
                collected.add(stats, error);
            }
            live_progress.stop.store(true, Ordering::Relaxed);
            viewers_stop.store(true, Ordering::Relaxed);
        }
        for (_, thread) in live_threads {
            let (stats, error) = thread.join().expect("incubator thread");
            live.add(stats, error);
        }
        (
            viewer_thread.map(|thread| thread.join().expect("viewer thread")),
            browser_thread.map(|thread| thread.join().expect("browser thread")),
        )
    });
    let (viewer_result, browser_result) = viewer_result;
    stop.store(true, Ordering::Relaxed);
    let timeline = display.join().expect("progress thread");
    let live_incubators = options.mix.incubators.len() - usize::from(backlog.is_some());
    let (live, live_curve) = live.result(live_incubators as u32, Some(offered));
    let backlog = backlog.map(|b| b.result(1, None).0);
    let mut operations = vec![OperationReport {
        name: "image_ack".into(),
        per_s: live.images_per_s,
        latency: live.ack_latency,
        // TELEMETRY errors are named "telemetry ...": not the images'.
        errors: live
            .errors
            .iter()
            .filter(|(name, _)| !name.starts_with("telemetry "))
            .map(|(_, count)| count)
            .sum(),
        curve: live_curve,
    }];
    let mut errors: Vec<String> = live.connection_errors.clone();
    if let Some(b) = &backlog {
        errors.extend(b.connection_errors.iter().cloned());
    }
    if let Some(v) = &viewer_result {
        for op in &v.operations {
            operations.push(OperationReport {
                name: op.name.clone(),
                per_s: op.per_s,
                latency: op.latency,
                errors: op.errors,
                curve: op.curve.clone(),
            });
        }
        errors.extend(v.errors.iter().cloned());
    }
    if let Some(b) = &browser_result {
        let seconds = b.elapsed.as_secs_f64().max(1e-9);
        for (name, latency, count) in [
            ("browser_first_frame", &b.first_frame, b.playbacks),
            ("browser_frame", &b.frame, b.frames),
        ] {
            operations.push(OperationReport {
                name: name.into(),
                per_s: count as f64 / seconds,
                latency: latency.summary(),
                errors: 0,
                curve: latency.percentile_curve(),
            });
        }
        // The lowest playback's rate, as a throughput: the paced rate every playback must hold.
        operations.push(OperationReport {
            name: "browser_playback".into(),
            per_s: b.fps_min(),
            latency: Default::default(),
            errors: b.errors.len() as u64,
            curve: Vec::new(),
        });
        errors.extend(b.errors.iter().map(|e| format!("browser: {e}")));
    }
    let mut target_results = Vec::new();
    for op in &operations {
        if let Some(target) = targets::target(&op.name) {
            // Throughput floors belong to the sustained-ingestion test, not a paced run; a
            // playback's frame rate is the paced rate itself, checked as it is.
            let latency_only = targets::Target {
                throughput_per_s_min: target
                    .throughput_per_s_min
                    .filter(|_| op.name == "browser_playback"),
                ..*target
            };
            target_results.extend(targets::evaluate(&latency_only, &op.latency, op.per_s));
        }
    }
    if !live.errors.is_empty() {
        errors.push(format!("incubator ERROR answers: {:?}", live.errors));
    }
    // The catch-up device's refusals fail the run too: a backlog the server refused is not
    // caught up.
    if let Some(b) = backlog.as_ref().filter(|b| !b.errors.is_empty()) {
        errors.push(format!("catch-up incubator ERROR answers: {:?}", b.errors));
    }
    let pass = errors.is_empty() && target_results.iter().all(|t| t.pass);
    PhaseReport {
        mix: options.mix.describe(),
        speedup: options.speedup,
        offered_per_s: offered,
        offered_high_capacity_multiple: offered / high_capacity_nominal_per_s(),
        live,
        backlog,
        operations,
        timeline,
        targets: target_results,
        errors,
        pass,
        server_cost: None,
        server_activity: None,
        browsers: browser_result.map(|b| BrowserSummary {
            browsers: options.mix.browsers,
            playbacks: b.playbacks,
            playbacks_stalled: b.playbacks_stalled,
            fps_min: b.fps_min(),
            fps_median: b.fps_median(),
            frames: b.frames,
            polls: b.polls,
        }),
    }
}

#[derive(Default)]
struct Collected {
    latency: LatencyRecorder,
    sent: u64,
    acked: u64,
    bytes: u64,
    elapsed: Duration,
    errors: std::collections::BTreeMap<String, u64>,
    connection_errors: Vec<String>,
    telemetry_acked: u64,
    alarms_sent: u64,
}

impl Collected {
    fn add(&mut self, stats: sim::UploadStats, error: Option<ClientError>) {
        self.latency.merge(&stats.latency);
        self.sent += stats.sent;
        self.acked += stats.acked;
        self.bytes += stats.bytes_acked;
        self.telemetry_acked += stats.telemetry_acked;
        self.alarms_sent += stats.alarms_sent;
        self.elapsed = self.elapsed.max(stats.elapsed);
        for (name, count) in stats.errors {
            *self.errors.entry(name).or_default() += count;
        }
        if let Some(error) = error {
            self.connection_errors.push(error.to_string());
        }
    }

    /// The figures, and the latency curve (percentile, µs).
    fn result(self, incubators: u32, offered: Option<f64>) -> (IngestResult, Vec<(f64, u64)>) {
        let elapsed = self.elapsed.as_secs_f64().max(1e-9);
        let curve = self.latency.percentile_curve();
        let result = IngestResult {
            incubators,
            offered_per_s: offered,
            images_sent: self.sent,
            images_acked: self.acked,
            bytes_acked: self.bytes,
            elapsed_s: elapsed,
            images_per_s: self.acked as f64 / elapsed,
            megabytes_per_s: self.bytes as f64 / elapsed / 1e6,
            ack_latency: self.latency.summary(),
            errors: self.errors,
            connection_errors: self.connection_errors,
            telemetry_acked: self.telemetry_acked,
            alarms_sent: self.alarms_sent,
        };
        (result, curve)
    }
}

/// One simulated incubator's identity and where it connects.
struct Device<'a> {
    serial: &'a str,
    model: DeviceModel,
    address: std::net::SocketAddr,
    tls: &'a es_net::client::ClientTls,
    /// Simulated time runs this many times faster than real time (telemetry included).
    speedup: f64,
}

/// Connects, registers the dishes, waits for every other incubator at `gate`, then uploads
/// `images` open loop at `interval` (None: as fast as the server's window allows) until
/// `duration` after the common start.
#[allow(clippy::too_many_arguments)]
fn upload_one(
    device: &Device<'_>,
    frames: &[Bytes],
    interval: Option<Duration>,
    images: u64,
    start_ms: i64,
    duration: Duration,
    gate: &crate::bench::StartGate,
    progress: &Progress,
) -> (sim::UploadStats, Option<ClientError>) {
    let spec = device.model.spec();
    let cycles = images.div_ceil(spec.images_per_cycle().max(1)) as u32;
    let workload = Workload::full(device.serial, device.model, cycles.max(1), start_ms);
    let mut identity = Identity {
        instrument_number: 0,
        serial: device.serial.to_owned(),
        model: device.model.name().into(),
        firmware: "sim-1.0".into(),
        secret: String::new(),
    };
    let ready = IncubatorClient::connect(
        device.address,
        device.tls,
        &mut identity,
        Duration::from_secs(30),
    )
    .and_then(|mut client| {
        sim::register_dishes(&mut client, &workload, Duration::from_secs(30)).map(|()| client)
    });
    let begin = gate.wait();
    let mut client = match ready {
        Ok(client) => client,
        Err(error) => return (sim::UploadStats::default(), Some(error)),
    };
    let pacing = match interval {
        Some(interval) => Pacing::OpenLoop {
            start: begin,
            interval,
        },
        None => Pacing::Window,
    };
    let deadline = begin + duration;
    // Telemetry at the real rate times the same speed-up as the images.
    let telemetry = sim::TelemetryPacing {
        start: begin,
        interval: Duration::from_secs_f64(
            es_perf::catalog::TELEMETRY_INTERVAL_S as f64 / device.speedup.max(1e-6),
        ),
        start_ms,
    };
    sim::upload_with_progress(
        &mut client,
        &workload,
        0..images.min(workload.len()),
        frames,
        pacing,
        deadline,
        Some(progress),
        Some(telemetry),
    )
}

/// Prints a line a second (elapsed, offered, achieved, that second's ack p99) and returns
/// the timeline.
#[allow(clippy::too_many_arguments)]
fn progress_loop(
    live: &Progress,
    backlog: &Progress,
    has_backlog: bool,
    offered: f64,
    begin: Instant,
    total: Duration,
    show: bool,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let mut timeline = Vec::new();
    let mut last_acked = 0u64;
    let mut last_backlog = 0u64;
    let mut tick = begin + Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < tick {
            std::thread::sleep((tick - now).min(Duration::from_millis(100)));
            continue;
        }
        let acked = live.acked.load(Ordering::Relaxed);
        let window = std::mem::take(&mut *live.window.lock());
        let backlog_acked = backlog.acked.load(Ordering::Relaxed);
        let _ = std::mem::take(&mut *backlog.window.lock());
        let t_s = (tick - begin).as_secs_f64();
        let sample = Sample {
            t_s,
            offered_per_s: offered,
            achieved_per_s: (acked - last_acked) as f64,
            p99_ms: window.value_at_quantile(0.99) as f64 / 1000.0,
        };
        if show {
            let mut line = format!(
                "[{:>4.0} s/{:.0} s] offered {:>7.0}/s achieved {:>7.0}/s  image_ack p99 {:>7.2} ms",
                t_s,
                total.as_secs_f64(),
                offered,
                sample.achieved_per_s,
                sample.p99_ms
            );
            if has_backlog {
                let _ = write!(
                    line,
                    "  backlog {:>6.0}/s ({} done)",
                    (backlog_acked - last_backlog) as f64,
                    backlog_acked
                );
            }
            let errors =
                live.errors.load(Ordering::Relaxed) + backlog.errors.load(Ordering::Relaxed);
            if errors > 0 {
                let _ = write!(line, "  errors {errors}");
            }
            eprintln!("{line}");
        }
        timeline.push(sample);
        last_acked = acked;
        last_backlog = backlog_acked;
        tick += Duration::from_secs(1);
    }
    timeline
}
