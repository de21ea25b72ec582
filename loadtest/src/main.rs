//! `loadtest`: the load generator's command line.

use clap::{Parser, Subcommand};
use es_loadtest::bench::{self, IngestOptions, IngestResult};
use es_loadtest::disk;
use es_loadtest::spawn::{find_esserver, ServerProcess, SpawnOptions};
use es_perf::catalog::DeviceModel;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod backup_cli;
mod restart_cli;
mod run_cli;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator and benchmarks for esserver"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A device mix (a licence configuration or explicit devices) at its real rates times
    /// --speedup, open loop, with progress; a table against the targets, JSON and a plot.
    /// Exits 2 when a target fails.
    Run(run_cli::RunArgs),
    /// Raises the offered load step by step until a target fails (within a duration and byte
    /// budget) and reports the highest load that met every target.
    Saturate(run_cli::SaturateArgs),
    /// One incubator uploads an H-hour backlog as fast as the server accepts while the other
    /// devices carry on live; reports the catch-up time and the live devices' latency.
    CatchUp(run_cli::CatchUpArgs),
    /// The CI performance gate (at most 60 s of load): ingestion over the same-run disk
    /// limit, and ack p99 at 10 x nominal over the same-run write+fsync p99. Exits 2 when a
    /// ratio is out of bounds.
    Gate(run_cli::GateArgs),
    /// Restart time after kill -9 as the store grows: fills a spawned server to each size,
    /// kills it while incubators upload, and times it until every port listens again.
    Restart(restart_cli::RestartArgs),
    /// Backup and restore throughput over the disk's plain copy speed, and what an
    /// incremental backup copies after more images.
    BackupBench(backup_cli::BackupBenchArgs),
    /// Ingestion benchmark: throughput and ack latency from simulated incubators against a
    /// spawned server, and the disk's own limit for the same bytes and batching.
    IngestBench(IngestArgs),
    /// Viewer benchmark: 4 viewers (frame fetch, dish overview, annotation save, change push,
    /// playback) while simulated high-capacity incubators upload at a multiple of nominal.
    ViewerBench(ViewerArgs),
    /// Public API benchmark: EMR clients (patient list, embryo data, one image, change feed)
    /// over HTTPS while simulated high-capacity incubators upload at a multiple of nominal.
    ApiBench(ApiArgs),
    /// Same-run comparison with PostgreSQL: the ingestion workload (same frames, same
    /// incubators, one durable commit per acknowledged image) against esserver and against a
    /// PostgreSQL server this mode starts on loopback; reports esserver/PostgreSQL ratios.
    PgCompare(PgCompareArgs),
    /// The disk's own limit alone: write + fsync of 30 KB records in batches.
    DiskLimit {
        /// Directory on the filesystem to measure (default: the system temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 20_000)]
        records: u64,
        #[arg(long, default_value_t = 64)]
        batch: u64,
    },
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Simulated incubators.
    #[arg(long, default_value_t = 16)]
    incubators: u32,
    /// Device model of every simulated incubator (es-d, es-plus, es-flex, es-8). es-8 takes
    /// one capacity unit, so 16 of them fit the high-capacity licence the spawned server runs
    /// with (16 EmbryoScope+ would need 32 units); its images are EmbryoScope+'s (11 planes).
    #[arg(long, default_value = "es-8")]
    model: DeviceModel,
    /// Longest duration of each phase, in seconds.
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Most image bytes sent per phase, in MB.
    #[arg(long, default_value_t = 1500)]
    bytes_max_mb: u64,
    /// Offered rate (images/s over all incubators) of the open-loop latency phase.
    #[arg(long, default_value_t = 3500.0)]
    offered: f64,
    /// Incubator port transport: on, off, or both (two runs).
    #[arg(long, default_value = "both")]
    tls: String,
    /// The esserver binary (default: beside this executable).
    #[arg(long)]
    esserver: Option<PathBuf>,
    /// Where the spawned server's data directory goes (a temporary directory under it).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ViewerArgs {
    /// Simulated viewers: the first plays back continuously, the others fetch frames, open
    /// dish overviews and save annotations.
    #[arg(long, default_value_t = 4)]
    viewers: u32,
    /// Simulated EmbryoScope+ incubators in the background (8: a full high-capacity site).
    #[arg(long, default_value_t = 8)]
    incubators: u32,
    /// Their rate as a multiple of nominal (4.4 images/s each).
    #[arg(long, default_value_t = 100.0)]
    multiple: f64,
    /// Operations per second of each interactive viewer.
    #[arg(long, default_value_t = 50.0)]
    ops_per_s: f64,
    /// Acquisitions of each seeded embryo (the playback length).
    #[arg(long, default_value_t = 1000)]
    seed_cycles: u32,
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    #[arg(long)]
    esserver: Option<PathBuf>,
    #[arg(long)]
    scratch: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ApiArgs {
    /// Simulated EMR clients.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Calls per second of each client (field clients send up to 10).
    #[arg(long, default_value_t = 10.0)]
    calls_per_s: f64,
    /// Simulated EmbryoScope+ incubators in the background (8: a full high-capacity site).
    #[arg(long, default_value_t = 8)]
    incubators: u32,
    /// Their rate as a multiple of nominal (4.4 images/s each).
    #[arg(long, default_value_t = 100.0)]
    multiple: f64,
    /// Acquisitions of each seeded embryo.
    #[arg(long, default_value_t = 1000)]
    seed_cycles: u32,
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    #[arg(long)]
    esserver: Option<PathBuf>,
    #[arg(long)]
    scratch: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PgCompareArgs {
    /// Simulated incubators sending to esserver; PostgreSQL gets as many client connections
    /// (unless --pg-connections), each on its own thread.
    #[arg(long, default_value_t = 16)]
    incubators: u32,
    /// Device model of every simulated incubator (as for ingest-bench).
    #[arg(long, default_value = "es-8")]
    model: DeviceModel,
    /// Longest duration of each phase, in seconds.
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Most image bytes sent per throughput phase, in MB.
    #[arg(long, default_value_t = 1000)]
    bytes_max_mb: u64,
    /// Offered rate (images/s over all incubators) of the open-loop latency phases (default:
    /// half the lower of the two throughputs measured in this run, so both systems can carry
    /// it).
    #[arg(long)]
    offered: Option<f64>,
    /// PostgreSQL client connections (default: one per incubator).
    #[arg(long)]
    pg_connections: Option<u32>,
    /// PostgreSQL shared_buffers, in MB.
    #[arg(long, default_value_t = 256)]
    pg_shared_buffers_mb: u64,
    /// Another PostgreSQL setting, NAME=VALUE (repeatable; applied after the defaults of
    /// this mode, e.g. --pg-set max_wal_size=8GB).
    #[arg(long = "pg-set", value_name = "NAME=VALUE", value_parser = es_loadtest::pg::parse_setting)]
    pg_set: Vec<(String, String)>,
    /// Directory holding initdb, pg_ctl and postgres (default: the highest version under
    /// /usr/lib/postgresql/<version>/bin, then PATH).
    #[arg(long)]
    pg_bin: Option<PathBuf>,
    /// The esserver binary (default: beside this executable).
    #[arg(long)]
    esserver: Option<PathBuf>,
    /// Where the data directories go (temporary directories under it; with root, the
    /// `postgres` user must be able to reach it).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct ModeReport {
    incubator_tls: bool,
    throughput: IngestResult,
    latency_at_offered: IngestResult,
    average_batch_requests: f64,
    disk_limit: disk::DiskLimit,
    ratio_to_disk_bytes: f64,
    server_peak_rss_bytes: Option<u64>,
}

fn main() -> ExitCode {
    if let Err(error) = es_loadtest::cleanup::install() {
        eprintln!("loadtest: cannot watch for Ctrl-C ({error}); an interrupted run leaves its data behind");
    }
    let verdict = |result: Result<bool, String>| match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(message) => {
            eprintln!("loadtest: {message}");
            ExitCode::FAILURE
        }
    };
    match Cli::parse().command {
        Command::Run(args) => verdict(run_cli::run(args)),
        Command::Saturate(args) => verdict(run_cli::saturate(args)),
        Command::CatchUp(args) => verdict(run_cli::catch_up(args)),
        Command::Gate(args) => verdict(run_cli::gate(args)),
        Command::Restart(args) => verdict(restart_cli::restart(args)),
        Command::BackupBench(args) => verdict(backup_cli::backup_bench(args)),
        Command::IngestBench(args) => match ingest_bench(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("loadtest: {message}");
                ExitCode::FAILURE
            }
        },
        Command::ViewerBench(args) => match viewer_bench(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(message) => {
                eprintln!("loadtest: {message}");
                ExitCode::FAILURE
            }
        },
        Command::ApiBench(args) => match api_bench(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(2),
            Err(message) => {
                eprintln!("loadtest: {message}");
                ExitCode::FAILURE
            }
        },
        Command::PgCompare(args) => match pg_compare(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("loadtest: {message}");
                ExitCode::FAILURE
            }
        },
        Command::DiskLimit {
            dir,
            records,
            batch,
        } => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            match disk::measure(&dir, records, 30 * 1024, batch, Duration::from_secs(60)) {
                Ok(limit) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&limit).unwrap_or_default()
                    );
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("loadtest: disk limit: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn ingest_bench(args: IngestArgs) -> Result<(), String> {
    let modes: Vec<bool> = match args.tls.as_str() {
        "on" => vec![true],
        "off" => vec![false],
        "both" => vec![true, false],
        other => return Err(format!("--tls must be on, off or both, not {other:?}")),
    };
    let scratch_root = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let bytes_max = args.bytes_max_mb * 1_000_000;
    // Each mode writes two phases plus the disk-limit file; redb needs headroom.
    let needed = bytes_max * 4;
    disk::check_free(&scratch_root, needed, "--bytes-max-mb")?;
    eprintln!("generating frames...");
    let frames = Arc::new(es_loadtest::frames::generate(16, 1));
    let frame_bytes = frames.iter().map(|f| f.len()).sum::<usize>() / frames.len();
    eprintln!(
        "{} frames of {} bytes on average",
        frames.len(),
        frame_bytes
    );
    let esserver = args.esserver.clone().unwrap_or_else(find_esserver);
    let mut reports = Vec::new();
    for tls in modes {
        settle();
        reports.push(run_mode(
            &args,
            tls,
            &esserver,
            &scratch_root,
            bytes_max,
            frames.clone(),
            frame_bytes,
        )?);
    }
    print_report(&reports);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn run_mode(
    args: &IngestArgs,
    tls: bool,
    esserver: &std::path::Path,
    scratch_root: &std::path::Path,
    bytes_max: u64,
    frames: Arc<Vec<bytes::Bytes>>,
    frame_bytes: usize,
) -> Result<ModeReport, String> {
    let scratch = disk::Scratch::new(scratch_root, "esserver-bench-")?;
    let mut options = SpawnOptions::new(esserver.to_path_buf(), scratch.path().join("data"));
    options.extra_config = es_loadtest::spawn::LOAD_GENERATOR_CONFIG.into();
    options.incubator_tls = tls;
    options.log_level = "warn".into();
    options.log_file = Some(scratch.path().join("server.log"));
    let mut server = ServerProcess::spawn(options)
        .map_err(|e| format!("cannot start {}: {e}", esserver.display()))?;
    let label = if tls { "TLS" } else { "plain TCP" };
    let ingest = IngestOptions {
        incubators: args.incubators,
        model: args.model,
        offered_per_s: None,
        duration: Duration::from_secs(args.duration_s),
        bytes_max,
        frames: frames.clone(),
    };
    // Latency first, on a settled system: right after the throughput phase the kernel is
    // still writing gigabytes back, and every fsync waits behind that.
    eprintln!(
        "[{label}] latency phase: {} images/s offered, open loop, {} s",
        args.offered, args.duration_s
    );
    let offered = IngestOptions {
        offered_per_s: Some(args.offered),
        bytes_max: (args.offered * args.duration_s as f64 * frame_bytes as f64) as u64,
        ..ingest.clone()
    };
    let latency_at_offered =
        bench::run_ingest(&server, &offered, if tls { "tls-lat" } else { "tcp-lat" });
    eprintln!(
        "[{label}] throughput phase: {} incubators, up to {} s or {} MB",
        args.incubators,
        args.duration_s,
        bytes_max / 1_000_000
    );
    let before = writer_counters(esserver, server.data_dir());
    let throughput = bench::run_ingest(&server, &ingest, if tls { "tls-max" } else { "tcp-max" });
    eprintln!(
        "[{label}] {:.0} images/s, {:.1} MB/s",
        throughput.images_per_s, throughput.megabytes_per_s
    );
    let after = writer_counters(esserver, server.data_dir());
    let batch = match (before, after) {
        (Some((c0, r0)), Some((c1, r1))) if c1 > c0 => (r1 - r0) / (c1 - c0),
        _ => 1.0,
    };
    let rss = bench::peak_rss_bytes(server.pid());
    let code = server.terminate(Duration::from_secs(30));
    if code != Some(0) {
        eprintln!("[{label}] warning: the server exited with {code:?}");
    }
    drop(server);
    eprintln!(
        "[{label}] disk limit: {} records of {} bytes, batches of {:.0}",
        throughput.images_acked, frame_bytes, batch
    );
    let disk_limit = disk::measure(
        scratch.path(),
        throughput.images_acked.max(1000),
        frame_bytes,
        batch.round() as u64,
        Duration::from_secs(args.duration_s * 2),
    )
    .map_err(|e| format!("disk limit: {e}"))?;
    let ratio = throughput.megabytes_per_s * 1e6 / disk_limit.bytes_per_s.max(1.0);
    Ok(ModeReport {
        incubator_tls: tls,
        throughput,
        latency_at_offered,
        average_batch_requests: batch,
        disk_limit,
        ratio_to_disk_bytes: ratio,
        server_peak_rss_bytes: rss,
    })
}

/// Lets the previous mode's writeback finish (its data was just deleted), so one mode's
/// gigabytes do not slow the next mode's fsyncs: sync, then wait (at most 60 s) until the
/// kernel holds less than 32 MB dirty or under writeback, then a few quiet seconds.
fn settle() {
    #[cfg(unix)]
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe {
        libc::sync();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline
        && dirty_bytes().is_some_and(|bytes| bytes > 32_000_000)
    {
        std::thread::sleep(Duration::from_millis(250));
    }
    std::thread::sleep(Duration::from_secs(5));
}

/// Dirty plus writeback page-cache bytes (Linux /proc/meminfo).
fn dirty_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|line| line.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some(field("Dirty:")? + field("Writeback:")?)
}

/// The writer's (commits, requests) so far, from `esserver status --json`.
fn writer_counters(esserver: &std::path::Path, data_dir: &std::path::Path) -> Option<(f64, f64)> {
    let output = std::process::Command::new(esserver)
        .args(["status", "--json", "--data"])
        .arg(data_dir)
        .output()
        .ok()?;
    let body: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let writer = &body["writer"];
    Some((writer["commits"].as_f64()?, writer["requests"].as_f64()?))
}

fn print_report(reports: &[ModeReport]) {
    println!();
    println!(
        "{:<10} {:>12} {:>9} {:>10} {:>10} {:>10} {:>12} {:>10} {:>9}",
        "transport",
        "images/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "disk MB/s",
        "ratio",
        "RSS MB"
    );
    for r in reports {
        let t = &r.throughput;
        println!(
            "{:<10} {:>12.0} {:>9.1} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>10.2} {:>9.0}",
            if r.incubator_tls { "TLS" } else { "plain" },
            t.images_per_s,
            t.megabytes_per_s,
            t.ack_latency.p50_us as f64 / 1000.0,
            t.ack_latency.p99_us as f64 / 1000.0,
            t.ack_latency.p999_us as f64 / 1000.0,
            r.disk_limit.bytes_per_s / 1e6,
            r.ratio_to_disk_bytes,
            r.server_peak_rss_bytes.unwrap_or(0) as f64 / 1e6
        );
    }
    println!();
    println!("open-loop ack latency at the offered rate (measured from the intended send time):");
    for r in reports {
        let l = &r.latency_at_offered;
        println!(
            "  {:<6} offered {:>6.0}/s achieved {:>8.0}/s  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  errors {:?}",
            if r.incubator_tls { "TLS" } else { "plain" },
            l.offered_per_s.unwrap_or(0.0),
            l.images_per_s,
            l.ack_latency.p50_us as f64 / 1000.0,
            l.ack_latency.p99_us as f64 / 1000.0,
            l.ack_latency.p999_us as f64 / 1000.0,
            l.ack_latency.max_us as f64 / 1000.0,
            l.errors
        );
    }
    println!();
    println!(
        "targets (es-perf): ack latency at the offered rate, sustained ingestion at full speed"
    );
    for r in reports {
        let mode = if r.incubator_tls { "TLS" } else { "plain" };
        let checks = [
            ("image_ack", &r.latency_at_offered),
            ("image_ingest_sustained", &r.throughput),
        ];
        for (operation, run) in checks {
            let Some(target) = es_perf::targets::target(operation) else {
                continue;
            };
            for result in es_perf::targets::evaluate(target, &run.ack_latency, run.images_per_s) {
                println!("  {mode:<6} {result}");
            }
        }
        if !r.throughput.connection_errors.is_empty()
            || !r.latency_at_offered.connection_errors.is_empty()
        {
            println!(
                "  {mode:<6} connection errors: {:?} {:?}",
                r.throughput.connection_errors, r.latency_at_offered.connection_errors
            );
        }
    }
}

/// A spawned server on a scratch directory, for the viewer and API benchmarks. Checks free
/// space first (about 3 x the bytes the run writes: `rate` images/s for `duration_s` plus the
/// seed), and seeds `seed_cycles` acquisitions of `viewer_bench::SEED_WELLS` embryos.
struct BenchServer {
    scratch: disk::Scratch,
    server: ServerProcess,
    esserver: PathBuf,
    frames: Arc<Vec<bytes::Bytes>>,
    embryos: Vec<String>,
}

fn bench_server(
    prefix: &str,
    scratch: Option<PathBuf>,
    esserver: Option<PathBuf>,
    rate: f64,
    duration_s: u64,
    seed_cycles: u32,
) -> Result<BenchServer, String> {
    use es_loadtest::viewer_bench as vb;
    let scratch_root = scratch.unwrap_or_else(std::env::temp_dir);
    let frame_bytes_typical = 32_000.0;
    let needed = ((rate * duration_s as f64 + (seed_cycles * vb::SEED_WELLS) as f64)
        * frame_bytes_typical
        * 3.0) as u64;
    let scratch = disk::scratch_dir(&scratch_root, needed, prefix, "--multiple or --duration-s")?;
    let esserver = esserver.unwrap_or_else(find_esserver);
    let mut options = SpawnOptions::new(esserver.clone(), scratch.path().join("data"));
    options.extra_config = es_loadtest::spawn::LOAD_GENERATOR_CONFIG.into();
    options.log_level = "warn".into();
    options.log_file = Some(scratch.path().join("server.log"));
    let server = ServerProcess::spawn(options)
        .map_err(|e| format!("cannot start {}: {e}", esserver.display()))?;
    eprintln!("generating frames...");
    let frames = Arc::new(es_loadtest::frames::generate(16, 3));
    eprintln!(
        "seeding {} embryos of {} acquisitions...",
        vb::SEED_WELLS,
        seed_cycles
    );
    let embryos = vb::seed(&server, &frames, seed_cycles)?;
    Ok(BenchServer {
        scratch,
        server,
        esserver,
        frames,
        embryos,
    })
}

/// Prints the operations' figures.
fn report_operations(operations: &[es_loadtest::viewer_bench::Operation]) {
    print_operations(
        operations
            .iter()
            .map(|op| (op.name.as_str(), op.per_s, &op.latency, op.errors)),
    );
}

/// One line per operation: name, rate, p50, p99, p99.9, max (ms) and errors.
pub(crate) fn print_operations<'a>(
    rows: impl Iterator<Item = (&'a str, f64, &'a es_perf::latency::LatencySummary, u64)>,
) {
    println!();
    println!(
        "{:<24} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "operation", "per s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "errors"
    );
    for (name, per_s, l, errors) in rows {
        println!(
            "{:<24} {:>9.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
            name,
            per_s,
            l.p50_us as f64 / 1000.0,
            l.p99_us as f64 / 1000.0,
            l.p999_us as f64 / 1000.0,
            l.max_us as f64 / 1000.0,
            errors
        );
    }
}

fn check_targets(operations: &[es_loadtest::viewer_bench::Operation]) -> bool {
    let mut all_pass = true;
    for op in operations {
        if let Some(target) = es_perf::targets::target(&op.name) {
            for check in es_perf::targets::evaluate(target, &op.latency, op.per_s) {
                all_pass &= check.pass;
                println!("  {check}");
            }
        }
    }
    all_pass
}

fn report_background(rate: f64, inc: &IngestResult, rss: Option<u64>) {
    println!(
        "background incubators: offered {:.0}/s, achieved {:.0}/s, ack p50 {:.2} ms p99 {:.2} ms, errors {:?} {:?}",
        rate, inc.images_per_s, inc.ack_latency.p50_us as f64 / 1000.0, inc.ack_latency.p99_us as f64 / 1000.0,
        inc.errors, inc.connection_errors
    );
    if let Some(rss) = rss {
        println!("server peak RSS: {:.0} MB", rss as f64 / 1e6);
    }
}

/// Runs the viewer benchmark; true when every target passed.
fn viewer_bench(args: ViewerArgs) -> Result<bool, String> {
    use es_loadtest::viewer_bench::{self as vb, ViewerBenchOptions};
    let rate = DeviceModel::EmbryoScopePlus.spec().images_per_second()
        * args.incubators as f64
        * args.multiple;
    let BenchServer {
        scratch,
        mut server,
        esserver,
        frames,
        embryos,
    } = bench_server(
        "esserver-viewer-bench-",
        args.scratch.clone(),
        args.esserver.clone(),
        rate,
        args.duration_s,
        args.seed_cycles,
    )?;
    let users: Vec<String> = (0..args.viewers.max(1))
        .map(|n| format!("bench{n}"))
        .collect();
    for user in &users {
        add_user(&esserver, server.data_dir(), user)?;
    }
    eprintln!(
        "running {} s: {} viewers, {} incubators at {:.0} images/s ({} x nominal)",
        args.duration_s, args.viewers, args.incubators, rate, args.multiple
    );
    let bench_options = ViewerBenchOptions {
        viewers: args.viewers,
        incubator_rate: rate,
        incubators: args.incubators,
        duration: Duration::from_secs(args.duration_s),
        viewer_ops_per_s: args.ops_per_s,
        frames,
        stop: None,
    };
    let result = vb::run(&server, &bench_options, &embryos, &users);
    let rss = bench::peak_rss_bytes(server.pid());
    let code = server.terminate(Duration::from_secs(30));
    if code != Some(0) {
        eprintln!("warning: the server exited with {code:?}");
    }
    report_operations(&result.operations);
    println!(
        "{:<24} {:>8.0} frames/s to one viewer ({} frames)",
        "viewer_playback", result.playback_frames_per_s, result.playback_frames
    );
    report_background(rate, &result.incubators_result, rss);
    if !result.errors.is_empty() {
        println!("viewer errors: {:?}", result.errors);
    }
    println!();
    println!("targets (es-perf):");
    let mut all_pass = result.errors.is_empty() & check_targets(&result.operations);
    if let Some(target) = es_perf::targets::target("viewer_playback") {
        let empty = es_perf::latency::LatencyRecorder::new().summary();
        for check in es_perf::targets::evaluate(target, &empty, result.playback_frames_per_s) {
            all_pass &= check.pass;
            println!("  {check}");
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    drop(server);
    drop(scratch);
    Ok(all_pass)
}

/// Runs the public API benchmark; true when every target passed.
fn api_bench(args: ApiArgs) -> Result<bool, String> {
    use es_loadtest::api_bench::{self as ab, ApiBenchOptions};
    let rate = DeviceModel::EmbryoScopePlus.spec().images_per_second()
        * args.incubators as f64
        * args.multiple;
    let BenchServer {
        scratch,
        mut server,
        esserver,
        frames,
        embryos,
    } = bench_server(
        "esserver-api-bench-",
        args.scratch.clone(),
        args.esserver.clone(),
        rate,
        args.duration_s,
        args.seed_cycles,
    )?;
    let key = create_api_key(&esserver, server.data_dir())?;
    eprintln!(
        "running {} s: {} API clients at {} calls/s, {} incubators at {:.0} images/s ({} x nominal)",
        args.duration_s, args.clients, args.calls_per_s, args.incubators, rate, args.multiple
    );
    let options = ApiBenchOptions {
        clients: args.clients,
        incubator_rate: rate,
        incubators: args.incubators,
        duration: Duration::from_secs(args.duration_s),
        calls_per_s: args.calls_per_s,
        frames,
        key,
    };
    let result = ab::run(&server, &options, &embryos);
    let rss = bench::peak_rss_bytes(server.pid());
    let code = server.terminate(Duration::from_secs(30));
    if code != Some(0) {
        eprintln!("warning: the server exited with {code:?}");
    }
    report_operations(&result.operations);
    report_background(rate, &result.incubators_result, rss);
    if !result.errors.is_empty() {
        println!("API client errors: {:?}", result.errors);
    }
    println!();
    println!("targets (es-perf):");
    let all_pass = result.errors.is_empty() & check_targets(&result.operations);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    drop(server);
    drop(scratch);
    Ok(all_pass)
}

/// `esserver apikey create --scope read`; returns the key.
fn create_api_key(
    esserver: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<String, String> {
    let output = std::process::Command::new(esserver)
        .args([
            "apikey", "create", "--name", "bench", "--scope", "read", "--data",
        ])
        .arg(data_dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", esserver.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find(|line| line.starts_with("esk_"))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "apikey create printed no key: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
}

fn add_user(
    esserver: &std::path::Path,
    data_dir: &std::path::Path,
    name: &str,
) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new(esserver)
        .args([
            "user",
            "add",
            name,
            "--rights",
            "edit",
            "--password-stdin",
            "--data",
        ])
        .arg(data_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", esserver.display()))?;
    writeln!(
        child.stdin.take().expect("piped"),
        "{}",
        es_loadtest::viewer_bench::PASSWORD
    )
    .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "user add {name}: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}

/// One system's figures in `pg-compare`.
#[derive(serde::Serialize)]
struct SystemReport {
    system: &'static str,
    client_connections: u32,
    throughput: IngestResult,
    latency_at_offered: IngestResult,
    /// Bytes on disk after the throughput phase (esserver: the redb file; PostgreSQL: the
    /// table with its TOAST table and index, plus pg_wal).
    stored_bytes_after_throughput: Option<u64>,
    peak_rss_bytes: Option<u64>,
    /// Images per fsync in the full-speed and the open-loop phase: esserver's requests per
    /// group commit (from `esserver status`), PostgreSQL's commits per WAL sync (from
    /// `pg_stat_wal`, PostgreSQL 14 and later).
    images_per_fsync: (Option<f64>, Option<f64>),
    /// PostgreSQL only: checkpoints started during the throughput and the latency phase.
    checkpoints: Option<(u64, u64)>,
    notes: Vec<String>,
}

#[derive(serde::Serialize)]
struct PgCompareReport {
    incubators: u32,
    model: String,
    frames: usize,
    frame_bytes_average: usize,
    duration_s: u64,
    bytes_max_mb: u64,
    offered_per_s: f64,
    offered_rule: String,
    esserver: SystemReport,
    postgresql: SystemReport,
    postgresql_settings: std::collections::BTreeMap<String, String>,
    /// esserver images/s / PostgreSQL images/s at full speed (above 1: esserver ingests more).
    throughput_ratio_esserver_over_postgresql: f64,
    /// PostgreSQL p99 / esserver p99 of the open-loop phase (above 1: esserver's tail is
    /// shorter).
    p99_ratio_postgresql_over_esserver: f64,
    p999_ratio_postgresql_over_esserver: f64,
}

fn pg_compare(args: PgCompareArgs) -> Result<(), String> {
    use es_loadtest::pg;
    let binaries = match &args.pg_bin {
        Some(dir) => pg::PgBinaries::in_dir(dir).ok_or_else(|| {
            format!(
                "{} does not hold initdb, pg_ctl and postgres; {}",
                dir.display(),
                pg::INSTALL_HINT
            )
        })?,
        None => pg::find_binaries(
            std::path::Path::new(pg::DEBIAN_ROOT),
            std::env::var_os("PATH").as_deref(),
        )?,
    };
    eprintln!("PostgreSQL: {}", binaries.postgres.display());
    let scratch_root = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    let bytes_max = args.bytes_max_mb * 1_000_000;
    // One phase's data at a time: redb's file (about 2 x the images), or PostgreSQL's WAL
    // and table (about 2 x, plus max_wal_size).
    let needed = bytes_max * 4;
    disk::check_free(&scratch_root, needed, "--bytes-max-mb")?;
    let connections = args.pg_connections.unwrap_or(args.incubators).max(1);
    let settings = pg::PgSettings {
        shared_buffers_mb: args.pg_shared_buffers_mb,
        max_connections: (connections + 10).max(100),
        extra: args.pg_set.clone(),
    };
    eprintln!("generating frames...");
    let frames = Arc::new(es_loadtest::frames::generate(16, 1));
    let frame_bytes = frames.iter().map(|f| f.len()).sum::<usize>() / frames.len();
    let esserver = args.esserver.clone().unwrap_or_else(find_esserver);
    let full_speed = IngestOptions {
        incubators: args.incubators,
        model: args.model,
        offered_per_s: None,
        duration: Duration::from_secs(args.duration_s),
        bytes_max,
        frames: frames.clone(),
    };
    let pg_full_speed = IngestOptions {
        incubators: connections,
        ..full_speed.clone()
    };

    settle();
    eprintln!(
        "[esserver] throughput phase: {} incubators (plain TCP), up to {} s or {} MB",
        args.incubators,
        args.duration_s,
        bytes_max / 1_000_000
    );
    let es_max = esserver_phase(&esserver, &scratch_root, &full_speed, "es-max")?;
    eprintln!(
        "[esserver] {:.0} images/s, {:.1} MB/s",
        es_max.result.images_per_s, es_max.result.megabytes_per_s
    );
    settle();
    eprintln!(
        "[PostgreSQL] throughput phase: {connections} connections, up to {} s or {} MB",
        args.duration_s,
        bytes_max / 1_000_000
    );
    let pg_max = postgres_phase(
        &binaries,
        &scratch_root,
        &settings,
        &pg_full_speed,
        "pg-max",
    )?;
    eprintln!(
        "[PostgreSQL] {:.0} images/s, {:.1} MB/s",
        pg_max.result.images_per_s, pg_max.result.megabytes_per_s
    );

    let (offered, offered_rule) = match args.offered {
        Some(rate) => (rate, "given (--offered)".to_string()),
        None => (
            (es_max.result.images_per_s.min(pg_max.result.images_per_s) * 0.5)
                .round()
                .max(1.0),
            "half the lower of the two throughputs measured in this run".to_string(),
        ),
    };
    let at_offered = IngestOptions {
        offered_per_s: Some(offered),
        bytes_max: (offered * args.duration_s as f64 * frame_bytes as f64) as u64,
        ..full_speed.clone()
    };
    let pg_at_offered = IngestOptions {
        incubators: connections,
        ..at_offered.clone()
    };
    settle();
    eprintln!(
        "[esserver] latency phase: {offered:.0} images/s offered, open loop, {} s",
        args.duration_s
    );
    let es_lat = esserver_phase(&esserver, &scratch_root, &at_offered, "es-lat")?;
    settle();
    eprintln!(
        "[PostgreSQL] latency phase: {offered:.0} images/s offered, open loop, {} s",
        args.duration_s
    );
    let pg_lat = postgres_phase(
        &binaries,
        &scratch_root,
        &settings,
        &pg_at_offered,
        "pg-lat",
    )?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let report = PgCompareReport {
        incubators: args.incubators,
        model: args.model.name().to_string(),
        frames: frames.len(),
        frame_bytes_average: frame_bytes,
        duration_s: args.duration_s,
        bytes_max_mb: args.bytes_max_mb,
        offered_per_s: offered,
        offered_rule,
        throughput_ratio_esserver_over_postgresql: ratio(
            es_max.result.images_per_s,
            pg_max.result.images_per_s,
        ),
        p99_ratio_postgresql_over_esserver: ratio(
            pg_lat.result.ack_latency.p99_us as f64,
            es_lat.result.ack_latency.p99_us as f64,
        ),
        p999_ratio_postgresql_over_esserver: ratio(
            pg_lat.result.ack_latency.p999_us as f64,
            es_lat.result.ack_latency.p999_us as f64,
        ),
        esserver: SystemReport {
            system: "esserver",
            client_connections: args.incubators,
            throughput: es_max.result,
            latency_at_offered: es_lat.result,
            stored_bytes_after_throughput: es_max.stored,
            peak_rss_bytes: es_max.rss.max(es_lat.rss),
            images_per_fsync: (es_max.images_per_fsync, es_lat.images_per_fsync),
            checkpoints: None,
            notes: vec![
                "incubator port with tls = off (PostgreSQL's connections are plain loopback TCP too)".into(),
                "up to 64 unacknowledged images in flight per connection; one group commit (one fsync) per batch".into(),
            ],
        },
        postgresql: SystemReport {
            system: "PostgreSQL",
            client_connections: connections,
            throughput: pg_max.result,
            latency_at_offered: pg_lat.result,
            stored_bytes_after_throughput: pg_max.stored,
            peak_rss_bytes: None,
            images_per_fsync: (pg_max.images_per_fsync, pg_lat.images_per_fsync),
            checkpoints: pg_max.checkpoints.zip(pg_lat.checkpoints),
            notes: vec![
                "one INSERT ... ON CONFLICT DO NOTHING per image in its own transaction (autocommit), one image in flight per connection".into(),
                "jpeg column STORAGE EXTERNAL (out of line, uncompressed); SHA-256 and storing time computed by the server".into(),
            ],
        },
        postgresql_settings: pg_max.settings,
    };
    print_pg_compare(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// What one phase of `pg-compare` measured.
struct Phase {
    result: IngestResult,
    /// Bytes on disk at the end of the phase.
    stored: Option<u64>,
    rss: Option<u64>,
    images_per_fsync: Option<f64>,
    /// PostgreSQL: checkpoints started during the phase.
    checkpoints: Option<u64>,
    /// PostgreSQL: its settings as `SHOW` gives them.
    settings: std::collections::BTreeMap<String, String>,
}

/// One esserver phase on a fresh server (incubator port plain TCP) and data directory,
/// deleted afterwards.
fn esserver_phase(
    esserver: &std::path::Path,
    scratch_root: &std::path::Path,
    options: &IngestOptions,
    tag: &str,
) -> Result<Phase, String> {
    let scratch = disk::Scratch::new(scratch_root, "esserver-pgcompare-")?;
    let mut spawn = SpawnOptions::new(esserver.to_path_buf(), scratch.path().join("data"));
    spawn.incubator_tls = false;
    spawn.log_level = "warn".into();
    spawn.log_file = Some(scratch.path().join("server.log"));
    let mut server = ServerProcess::spawn(spawn)
        .map_err(|e| format!("cannot start {}: {e}", esserver.display()))?;
    let before = writer_counters(esserver, server.data_dir());
    let result = bench::run_ingest(&server, options, tag);
    let after = writer_counters(esserver, server.data_dir());
    let images_per_fsync = match (before, after) {
        (Some((c0, r0)), Some((c1, r1))) if c1 > c0 => Some((r1 - r0) / (c1 - c0)),
        _ => None,
    };
    let stored = bench::stored_bytes(server.data_dir());
    let rss = bench::peak_rss_bytes(server.pid());
    let code = server.terminate(Duration::from_secs(30));
    if code != Some(0) {
        eprintln!("[esserver] warning: the server exited with {code:?}");
    }
    Ok(Phase {
        result,
        stored,
        rss,
        images_per_fsync,
        checkpoints: None,
        settings: Default::default(),
    })
}

/// One PostgreSQL phase on a fresh cluster, deleted afterwards.
fn postgres_phase(
    binaries: &es_loadtest::pg::PgBinaries,
    scratch_root: &std::path::Path,
    settings: &es_loadtest::pg::PgSettings,
    options: &IngestOptions,
    tag: &str,
) -> Result<Phase, String> {
    let mut server = es_loadtest::pg::PgServer::start(binaries, scratch_root, settings)?;
    let shown = server.settings()?;
    let before = server.wal_syncs();
    let result = es_loadtest::pg::run_pg_ingest(&server, options, tag);
    // The clients' backends report their statistics as they exit.
    std::thread::sleep(Duration::from_secs(2));
    let after = server.wal_syncs();
    let images_per_fsync = match (before, after) {
        (Some(s0), Some(s1)) if s1 > s0 => Some(result.images_acked as f64 / (s1 - s0) as f64),
        _ => None,
    };
    let stored = match server.table_size() {
        Ok((rows, bytes)) => {
            if rows != result.images_acked {
                eprintln!(
                    "[PostgreSQL] warning: {rows} rows in the table, {} inserts committed",
                    result.images_acked
                );
            }
            Some(bytes + server.wal_bytes())
        }
        Err(error) => {
            eprintln!("[PostgreSQL] warning: table size: {error}");
            None
        }
    };
    let checkpoints = server.checkpoints_logged();
    server.stop()?;
    Ok(Phase {
        result,
        stored,
        rss: None,
        images_per_fsync,
        checkpoints: Some(checkpoints),
        settings: shown,
    })
}

fn print_pg_compare(report: &PgCompareReport) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!();
    println!(
        "{} incubators ({}), {} frames of {} bytes on average; PostgreSQL {}",
        report.incubators,
        report.model,
        report.frames,
        report.frame_bytes_average,
        report
            .postgresql_settings
            .get("server_version")
            .map(String::as_str)
            .unwrap_or("?")
    );
    println!(
        "{:<11} {:<18} {:>6} {:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "system",
        "phase",
        "conns",
        "images/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "errors"
    );
    for system in [&report.esserver, &report.postgresql] {
        for (phase, run) in [
            ("full speed".to_string(), &system.throughput),
            (
                format!("open loop {:.0}/s", report.offered_per_s),
                &system.latency_at_offered,
            ),
        ] {
            let errors: u64 = run.errors.values().sum::<u64>() + run.connection_errors.len() as u64;
            println!(
                "{:<11} {:<18} {:>6} {:>10.0} {:>8.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>7}",
                system.system,
                phase,
                system.client_connections,
                run.images_per_s,
                run.megabytes_per_s,
                ms(run.ack_latency.p50_us),
                ms(run.ack_latency.p99_us),
                ms(run.ack_latency.p999_us),
                ms(run.ack_latency.max_us),
                errors
            );
        }
    }
    println!();
    println!(
        "throughput esserver/PostgreSQL: {:.2} (above 1: esserver ingests more)",
        report.throughput_ratio_esserver_over_postgresql
    );
    println!(
        "p99 at {:.0}/s offered, PostgreSQL/esserver: {:.2} (above 1: esserver's p99 is lower); p99.9: {:.2}",
        report.offered_per_s,
        report.p99_ratio_postgresql_over_esserver,
        report.p999_ratio_postgresql_over_esserver
    );
    println!("offered rate: {}", report.offered_rule);
    for system in [&report.esserver, &report.postgresql] {
        if let Some(bytes) = system.stored_bytes_after_throughput {
            println!(
                "{} stored {:.0} MB for {:.0} MB of images",
                system.system,
                bytes as f64 / 1e6,
                system.throughput.bytes_acked as f64 / 1e6
            );
        }
        if let (Some(full_speed), Some(open_loop)) = system.images_per_fsync {
            println!(
                "{} images per fsync: {full_speed:.1} at full speed, {open_loop:.1} in the open-loop phase",
                system.system
            );
        }
        if let Some((full_speed, open_loop)) = system.checkpoints {
            println!(
                "{} checkpoints started: {full_speed} at full speed, {open_loop} in the open-loop phase",
                system.system
            );
        }
        for run in [&system.throughput, &system.latency_at_offered] {
            if !run.errors.is_empty() || !run.connection_errors.is_empty() {
                println!(
                    "{} errors: {:?} {:?}",
                    system.system, run.errors, run.connection_errors
                );
            }
        }
    }
    let settings: Vec<String> = report
        .postgresql_settings
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("PostgreSQL settings: {}", settings.join(" "));
}
