//! `loadtest backup-bench`: backup and restore throughput against the disk's own copy speed,
//! and what an incremental backup copies. Fills a spawned server with `--size-gb` of images
//! (256 MiB volumes, so most are sealed), takes a full backup while it runs, adds `--more-gb`,
//! takes a second backup, and restores it. The reference is a plain copy (read, write,
//! fsync) of the same volume files on the same filesystem, with the page cache emptied of
//! them before each measurement, taken before the first backup and after the second (the
//! faster of the two: a shared disk's speed varies). Everything is written under one scratch directory and
//! deleted at the end.

use es_loadtest::bench::{process_counters, IngestOptions};
use es_loadtest::disk;
use es_loadtest::spawn::{find_esserver, ServerProcess, SpawnOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BackupBenchArgs {
    /// Image bytes stored before the first backup, GB.
    #[arg(long, default_value_t = 2.0)]
    size_gb: f64,
    /// Image bytes added before the second (incremental) backup, GB.
    #[arg(long, default_value_t = 1.0)]
    more_gb: f64,
    #[arg(long)]
    esserver: Option<PathBuf>,
    /// Where the data directory, the backups and the restore go (a temporary directory
    /// under it).
    #[arg(long)]
    scratch: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One timed copy: bytes, seconds, MB/s, and its ratio to the reference copy speed.
#[derive(Debug, Clone, serde::Serialize)]
struct Timed {
    bytes: u64,
    seconds: f64,
    megabytes_per_s: f64,
    /// Over the plain copy of the same disk, measured in the same run.
    ratio_to_disk_copy: f64,
    /// CPU time of the process that did it (the server for a backup, `esserver restore` for
    /// a restore), seconds per GB copied.
    cpu_s_per_gb: Option<f64>,
    /// Bytes written to storage per byte copied (`/proc/<pid>/io`), where measured.
    written_per_byte: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    image_bytes_first: u64,
    image_bytes_added: u64,
    /// A plain read + write + fsync of the volume files, MB/s (the faster of two).
    disk_copy_megabytes_per_s: f64,
    disk_copy_before_megabytes_per_s: f64,
    disk_copy_after_megabytes_per_s: f64,
    full_backup: Timed,
    incremental_backup: Timed,
    /// What the second backup copied over the image bytes added since the first.
    incremental_copied_over_added: f64,
    restore: Timed,
}

pub fn backup_bench(args: BackupBenchArgs) -> Result<bool, String> {
    if !(args.size_gb > 0.0 && args.more_gb > 0.0) {
        return Err("--size-gb and --more-gb must be above 0".into());
    }
    let first = (args.size_gb * 1e9) as u64;
    let more = (args.more_gb * 1e9) as u64;
    let total = first + more;
    let root = args.scratch.clone().unwrap_or_else(std::env::temp_dir);
    // The store, two backups' worth, a restore, the reference copy, and room to spare.
    let scratch = disk::scratch_dir(
        &root,
        3 * total + 2_000_000_000,
        "esserver-backup-",
        "--size-gb",
    )?;
    let esserver = args.esserver.clone().unwrap_or_else(find_esserver);
    let data = scratch.path().join("data");
    let target = scratch.path().join("backups");
    let mut options = SpawnOptions::new(esserver.clone(), data.clone());
    options.incubator_tls = false;
    options.log_level = "warn".into();
    options.log_file = Some(scratch.path().join("server.log"));
    options.extra_config = "[Storage]\nvolume_bytes_max = 256 MiB\n".into();
    let mut server = ServerProcess::spawn(options)
        .map_err(|e| format!("cannot start {}: {e}", esserver.display()))?;
    let frames = std::sync::Arc::new(es_loadtest::frames::generate(16, 11));
    let fill = |server: &ServerProcess, bytes: u64, tag: &str| -> Result<(), String> {
        eprintln!(
            "backup-bench: storing {:.1} GB of images...",
            bytes as f64 / 1e9
        );
        let result = es_loadtest::bench::run_ingest(
            server,
            &IngestOptions {
                incubators: 16,
                model: es_perf::catalog::DeviceModel::EmbryoScope8,
                offered_per_s: None,
                duration: Duration::from_secs(3600),
                bytes_max: bytes,
                frames: frames.clone(),
            },
            tag,
        );
        if result.connection_errors.is_empty() && result.errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "storing failed: {:?} {:?}",
                result.connection_errors, result.errors
            ))
        }
    };
    fill(&server, first, "bk1")?;

    // The reference: the volume files copied plainly, cold; measured before the first
    // backup and again after the second (a shared disk's speed varies), the faster taken.
    let volumes = data.join("volumes");
    let reference = |scratch: &Path| -> Result<f64, String> {
        evict(&volumes);
        let (bytes, seconds) = plain_copy(&volumes, &scratch.join("reference"))?;
        std::fs::remove_dir_all(scratch.join("reference")).map_err(|e| e.to_string())?;
        Ok(bytes as f64 / seconds / 1e6)
    };
    let reference_before = reference(scratch.path())?;
    eprintln!("backup-bench: plain copy of the volumes {reference_before:.0} MB/s");

    evict(&volumes);
    let mut full = timed_backup(&esserver, &server, &data, &target)?;
    fill(&server, more, "bk2")?;
    evict(&volumes);
    let mut incremental = timed_backup(&esserver, &server, &data, &target)?;
    let stored = status_bytes(&esserver, &data)?;
    let reference_after = reference(scratch.path())?;
    eprintln!("backup-bench: plain copy of the volumes {reference_after:.0} MB/s");
    let disk_mb_s = reference_before.max(reference_after);
    for timed in [&mut full, &mut incremental] {
        timed.ratio_to_disk_copy = timed.megabytes_per_s / disk_mb_s;
    }
    server.terminate(Duration::from_secs(60));
    drop(server);

    let restored = scratch.path().join("restored");
    evict(&target.join("volumes"));
    let started = Instant::now();
    let mut child = Command::new(&esserver)
        .args(["restore", "--json", "--from"])
        .arg(&target)
        .arg("--data")
        .arg(&restored)
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (cpu, written) = watch(&mut child);
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err("restore failed".into());
    }
    let seconds = started.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let bytes = report["bytes"].as_u64().unwrap_or(0);
    let restore = Timed {
        bytes,
        seconds,
        megabytes_per_s: bytes as f64 / seconds / 1e6,
        ratio_to_disk_copy: bytes as f64 / seconds / 1e6 / disk_mb_s,
        cpu_s_per_gb: cpu.map(|c| c / (bytes as f64 / 1e9)),
        written_per_byte: written.map(|w| w as f64 / bytes as f64),
    };
    let added = stored.saturating_sub(full.bytes.min(stored)).max(more);
    let report = Report {
        image_bytes_first: first,
        image_bytes_added: more,
        disk_copy_megabytes_per_s: disk_mb_s,
        disk_copy_before_megabytes_per_s: reference_before,
        disk_copy_after_megabytes_per_s: reference_after,
        incremental_copied_over_added: incremental.bytes as f64 / added as f64,
        full_backup: full,
        incremental_backup: incremental,
        restore,
    };
    let line = |name: &str, t: &Timed| {
        println!(
            "{name:<12} {:>8.2} GB in {:>6.1} s: {:>6.0} MB/s, {:.2} of the plain copy; CPU {} s/GB; written {} bytes per byte",
            t.bytes as f64 / 1e9,
            t.seconds,
            t.megabytes_per_s,
            t.ratio_to_disk_copy,
            t.cpu_s_per_gb.map_or("?".into(), |c| format!("{c:.2}")),
            t.written_per_byte.map_or("?".into(), |w| format!("{w:.2}"))
        );
    };
    println!(
        "plain copy of the volumes: {reference_before:.0} MB/s before, {reference_after:.0} MB/s after (reference {disk_mb_s:.0})"
    );
    line("full backup", &report.full_backup);
    line("incremental", &report.incremental_backup);
    println!(
        "incremental backup copied {:.2} GB after {:.2} GB more images ({:.2} x)",
        report.incremental_backup.bytes as f64 / 1e9,
        more as f64 / 1e9,
        report.incremental_copied_over_added
    );
    line("restore", &report.restore);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    Ok(true)
}

/// Takes a backup through the running server; the bytes it copied and their timing.
fn timed_backup(
    esserver: &Path,
    server: &ServerProcess,
    data: &Path,
    target: &Path,
) -> Result<Timed, String> {
    let before = process_counters(server.pid());
    let started = Instant::now();
    let output = Command::new(esserver)
        .args(["backup", "--json", "--to"])
        .arg(target)
        .arg("--data")
        .arg(data)
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err("backup failed".into());
    }
    let after = process_counters(server.pid());
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    let bytes = report["bytes_copied"].as_u64().unwrap_or(0);
    let (cpu, written) = match (before, after) {
        (Some(b), Some(a)) => (Some(a.cpu_s - b.cpu_s), Some(a.write_bytes - b.write_bytes)),
        _ => (None, None),
    };
    Ok(Timed {
        bytes,
        seconds,
        megabytes_per_s: bytes as f64 / seconds / 1e6,
        ratio_to_disk_copy: 0.0,
        // The server ingests nothing meanwhile: its CPU and writes are the backup's.
        cpu_s_per_gb: cpu.map(|c| c / (bytes as f64 / 1e9)),
        written_per_byte: written.map(|w| w as f64 / bytes.max(1) as f64),
    })
}

/// The CPU seconds and bytes written of `child` until it exits (sampled; its output is
/// small enough not to fill the pipe meanwhile).
fn watch(child: &mut std::process::Child) -> (Option<f64>, Option<u64>) {
    let mut last = None;
    while matches!(child.try_wait(), Ok(None)) {
        if let Some(counters) = process_counters(child.id()) {
            last = Some(counters);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (last.map(|c| c.cpu_s), last.map(|c| c.write_bytes))
}

/// Image bytes the store holds (`esserver status`).
fn status_bytes(esserver: &Path, data: &Path) -> Result<u64, String> {
    let output = Command::new(esserver)
        .args(["status", "--json", "--data"])
        .arg(data)
        .output()
        .map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    Ok(body["storage"]["image_bytes"].as_u64().unwrap_or(0))
}

/// Copies every file of `dir` into `to` (read, write, fsync): (bytes, seconds).
fn plain_copy(dir: &Path, to: &Path) -> Result<(u64, f64), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        if !entry.file_name().to_string_lossy().ends_with(".vol") {
            continue;
        }
        let mut input = std::fs::File::open(entry.path()).map_err(|e| e.to_string())?;
        let mut output =
            std::fs::File::create(to.join(entry.file_name())).map_err(|e| e.to_string())?;
        loop {
            let read = input.read(&mut buffer).map_err(|e| e.to_string())?;
            if read == 0 {
                break;
            }
            output
                .write_all(&buffer[..read])
                .map_err(|e| e.to_string())?;
            bytes += read as u64;
        }
        output.sync_all().map_err(|e| e.to_string())?;
    }
    Ok((bytes, started.elapsed().as_secs_f64()))
}

/// Asks the kernel to drop the page cache's copies of every file under `dir` (clean pages
/// only; no privileges needed), so the next read comes from the disk.
fn evict(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            evict(&path);
            continue;
        }
        if let Ok(file) = std::fs::File::open(&path) {
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let _ = file.sync_all();
                // SAFETY: posix_fadvise on a file descriptor we own; it only advises.
                unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
                }
            }
            drop(file);
        }
    }
}
