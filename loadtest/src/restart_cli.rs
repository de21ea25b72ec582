//! `loadtest restart`: how long a server takes to listen again after `kill -9`, as the store
//! grows. Fills a spawned server's store step by step (full-speed ingestion), and at each size
//! kills it with -9 while incubators are uploading, then times the restart until every port
//! listens. Also times a restart after a clean stop, for reference, and reports the index's
//! bytes per image.

use es_loadtest::bench::{IngestOptions, IngestResult};
use es_loadtest::disk;
use es_loadtest::spawn::{find_esserver, ServerProcess, SpawnOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Serial prefixes of the incubators uploading when the server is killed, one per step.
const LIVE_TAGS: [&str; 8] = [
    "live0", "live1", "live2", "live3", "live4", "live5", "live6", "live7",
];

#[derive(clap::Args)]
pub struct RestartArgs {
    /// Image bytes stored at each measurement, GB, ascending (comma-separated).
    #[arg(long, default_value = "5,20,50", value_delimiter = ',')]
    sizes_gb: Vec<f64>,
    /// Simulated incubators filling the store (EmbryoScope 8, as fast as accepted).
    #[arg(long, default_value_t = 16)]
    incubators: u32,
    #[arg(long)]
    esserver: Option<PathBuf>,
    /// Where the server's data directory goes (a temporary directory under it).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// A setting for the spawned server, as SECTION.KEY=VALUE (repeatable).
    #[arg(long = "server-setting", value_name = "SECTION.KEY=VALUE")]
    server_settings: Vec<String>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Step {
    image_bytes: u64,
    images: u64,
    database_bytes: u64,
    volume_bytes: u64,
    /// Database bytes per image stored.
    index_bytes_per_image: f64,
    /// From the spawn after `kill -9` until every listener is bound (server.json written).
    restart_after_kill_s: f64,
    /// The same after a clean stop (SIGTERM), measured at the same size.
    restart_after_clean_stop_s: f64,
    /// Filling this step: images/s and MB/s.
    fill: IngestResult,
}

#[derive(serde::Serialize)]
struct Report {
    steps: Vec<Step>,
    /// Images a high-capacity site adds in a year (8 EmbryoScope+ at their real rate).
    images_per_year_high_capacity: u64,
    /// The index a year of a high-capacity site makes, at the last step's bytes per image.
    projected_index_bytes_per_year: f64,
}

pub fn restart(args: RestartArgs) -> Result<bool, String> {
    let mut sizes = args.sizes_gb.clone();
    sizes.retain(|s| *s > 0.0);
    if sizes.is_empty() || sizes.len() > LIVE_TAGS.len() || sizes.windows(2).any(|w| w[0] >= w[1]) {
        return Err("--sizes-gb: give 1 to 8 ascending sizes in GB, e.g. 5,20,50".into());
    }
    let largest = (sizes[sizes.len() - 1] * 1e9) as u64;
    let root = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    // The images, the index, the preallocated volume tail, and room to spare.
    let scratch = disk::scratch_dir(
        &root,
        largest + largest / 20 + 2_000_000_000,
        "esserver-restart-",
        "--sizes-gb",
    )?;
    let esserver = args.esserver.clone().unwrap_or_else(find_esserver);
    let mut options = SpawnOptions::new(esserver.clone(), scratch.path().join("data"));
    options.incubator_tls = false;
    options.log_level = "warn".into();
    options.log_file = Some(scratch.path().join("server.log"));
    options.extra_config = crate::run_cli::server_config(&args.server_settings)?;
    let frames = std::sync::Arc::new(es_loadtest::frames::generate(16, 9));
    let mut server = ServerProcess::spawn(options.clone())
        .map_err(|e| format!("cannot start {}: {e}", esserver.display()))?;
    let mut steps = Vec::new();
    let mut stored = 0u64;
    for (n, size) in sizes.iter().enumerate() {
        let target = (size * 1e9) as u64;
        eprintln!("restart: filling the store to {size} GB of images...");
        let fill = es_loadtest::bench::run_ingest(
            &server,
            &IngestOptions {
                incubators: args.incubators,
                model: es_perf::catalog::DeviceModel::EmbryoScope8,
                offered_per_s: None,
                duration: Duration::from_secs(3600),
                bytes_max: target.saturating_sub(stored),
                frames: frames.clone(),
            },
            // New instruments per step: a dish's insemination time cannot change.
            &format!("fill{n}"),
        );
        if !fill.connection_errors.is_empty() || !fill.errors.is_empty() {
            return Err(format!(
                "filling the store failed: {:?} {:?}",
                fill.connection_errors, fill.errors
            ));
        }
        eprintln!(
            "restart: {:.0} images/s, {:.0} MB/s",
            fill.images_per_s, fill.megabytes_per_s
        );
        // A clean stop and start first, for reference.
        server.terminate(Duration::from_secs(60));
        let clean = timed_spawn(&options)?;
        server = clean.0;
        // Then kill -9 while incubators upload.
        let background = es_loadtest::bench::background_ingest(
            &server,
            4,
            2000.0,
            Duration::from_secs(3),
            frames.clone(),
            LIVE_TAGS[n % LIVE_TAGS.len()],
        );
        std::thread::sleep(Duration::from_millis(1500));
        server.kill9();
        if let Some(handle) = background {
            let _ = handle.join();
        }
        let killed = timed_spawn(&options)?;
        server = killed.0;
        let after = self::status(&esserver, server.data_dir())?;
        stored = after.image_bytes;
        let step = Step {
            image_bytes: after.image_bytes,
            images: after.images,
            database_bytes: after.database_bytes,
            volume_bytes: after.volume_bytes,
            index_bytes_per_image: after.database_bytes as f64 / after.images.max(1) as f64,
            restart_after_kill_s: killed.1.as_secs_f64(),
            restart_after_clean_stop_s: clean.1.as_secs_f64(),
            fill,
        };
        println!(
            "{:>7.1} GB, {:>10} images: database {:>8.1} MB ({:>5.1} bytes per image); restart after kill -9 {:.2} s, after a clean stop {:.2} s",
            step.image_bytes as f64 / 1e9,
            step.images,
            step.database_bytes as f64 / 1e6,
            step.index_bytes_per_image,
            step.restart_after_kill_s,
            step.restart_after_clean_stop_s
        );
        steps.push(step);
    }
    server.terminate(Duration::from_secs(60));
    drop(server);
    let per_year = high_capacity_images_per_year();
    let bytes_per_image = steps
        .last()
        .expect("one step at least")
        .index_bytes_per_image;
    let report = Report {
        images_per_year_high_capacity: per_year,
        projected_index_bytes_per_year: bytes_per_image * per_year as f64,
        steps,
    };
    println!(
        "a year of a high-capacity site: {} images; at {:.1} bytes per image the index is {:.1} GB",
        report.images_per_year_high_capacity,
        bytes_per_image,
        report.projected_index_bytes_per_year / 1e9
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    Ok(true)
}

/// Spawns the server and times it until every listener is bound.
fn timed_spawn(options: &SpawnOptions) -> Result<(ServerProcess, Duration), String> {
    let started = Instant::now();
    let server = ServerProcess::spawn(options.clone())
        .map_err(|e| format!("the server did not start again: {e}"))?;
    Ok((server, started.elapsed()))
}

struct Status {
    images: u64,
    image_bytes: u64,
    database_bytes: u64,
    volume_bytes: u64,
}

fn status(esserver: &Path, data_dir: &Path) -> Result<Status, String> {
    let output = std::process::Command::new(esserver)
        .args(["status", "--json", "--data"])
        .arg(data_dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", esserver.display()))?;
    let body: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| format!("esserver status: {e}"))?;
    let storage = &body["storage"];
    Ok(Status {
        images: storage["images"].as_u64().unwrap_or(0),
        image_bytes: storage["image_bytes"].as_u64().unwrap_or(0),
        volume_bytes: storage["volume_bytes"].as_u64().unwrap_or(0),
        database_bytes: body["database_bytes"].as_u64().unwrap_or(0),
    })
}

fn high_capacity_images_per_year() -> u64 {
    let spec = es_perf::catalog::DeviceModel::EmbryoScopePlus.spec();
    (spec.images_per_second() * 8.0 * 365.0 * 86_400.0) as u64
}
