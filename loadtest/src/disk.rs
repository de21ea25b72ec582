//! The disk's own limit: the same bytes, in the same batches, written and fsynced to a file
//! on the filesystem under test. The server's ingestion is reported as a ratio of this.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskLimit {
    pub records: u64,
    pub record_bytes: u64,
    pub batch_records: u64,
    pub elapsed_s: f64,
    pub records_per_s: f64,
    pub bytes_per_s: f64,
    /// Time of each batch's write + fdatasync.
    pub batch_latency: es_perf::latency::LatencySummary,
}

/// Appends `records` records of `record_bytes` in batches of `batch_records`, one
/// `fdatasync` per batch, into a scratch file in `dir` (deleted afterwards). Stops early at
/// `duration_max`.
pub fn measure(
    dir: &Path,
    records: u64,
    record_bytes: usize,
    batch_records: u64,
    duration_max: Duration,
) -> io::Result<DiskLimit> {
    let path = dir.join("disk-limit.scratch");
    let result = write_batches(
        &path,
        records,
        record_bytes,
        batch_records.max(1),
        duration_max,
    );
    let _ = std::fs::remove_file(&path);
    result
}

fn write_batches(
    path: &Path,
    records: u64,
    record_bytes: usize,
    batch_records: u64,
    duration_max: Duration,
) -> io::Result<DiskLimit> {
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let record: Vec<u8> = (0..record_bytes).map(|i| (i * 31 % 251) as u8).collect();
    let batch: Vec<u8> = record.repeat(batch_records as usize);
    let started = Instant::now();
    let mut written = 0u64;
    let mut latency = es_perf::latency::LatencyRecorder::new();
    while written < records && started.elapsed() < duration_max {
        let count = batch_records.min(records - written);
        let batch_started = Instant::now();
        file.write_all(&batch[..count as usize * record_bytes])?;
        file.sync_data()?;
        latency.record(batch_started.elapsed());
        written += count;
    }
    let elapsed_s = started.elapsed().as_secs_f64().max(1e-9);
    Ok(DiskLimit {
        records: written,
        record_bytes: record_bytes as u64,
        batch_records,
        elapsed_s,
        records_per_s: written as f64 / elapsed_s,
        bytes_per_s: (written * record_bytes as u64) as f64 / elapsed_s,
        batch_latency: latency.summary(),
    })
}

/// A temporary directory under `root` for a run that writes about `needed` bytes, once the
/// free space there is checked; `lower` says what to lower when it is not enough.
pub fn scratch_dir(root: &Path, needed: u64, prefix: &str, lower: &str) -> Result<Scratch, String> {
    check_free(root, needed, lower)?;
    Scratch::new(root, prefix)
}

/// A temporary directory of a run: deleted when dropped, and also when the load generator
/// is interrupted (see [`crate::cleanup`]).
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
    _undo: crate::cleanup::Registration,
}

impl Scratch {
    pub fn new(root: &Path, prefix: &str) -> Result<Scratch, String> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(root)
            .map_err(|e| format!("cannot make a scratch directory in {}: {e}", root.display()))?;
        let undo = crate::cleanup::remove_on_interrupt(dir.path().to_path_buf());
        Ok(Scratch { dir, _undo: undo })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Refuses a run that needs more than the free space under `root`, saying what to lower.
pub fn check_free(root: &Path, needed: u64, lower: &str) -> Result<(), String> {
    let free = free_bytes(root).map_err(|e| format!("cannot read free space: {e}"))?;
    if free < needed {
        return Err(format!(
            "{} has {} MB free; this run needs about {} MB (lower {lower})",
            root.display(),
            free / 1_000_000,
            needed / 1_000_000
        ));
    }
    Ok(())
}

/// Bytes free for this user on the filesystem holding `path`.
#[cfg(unix)]
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(not(unix))]
pub fn free_bytes(_path: &Path) -> io::Result<u64> {
    Ok(u64::MAX)
}
