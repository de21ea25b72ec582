//! The disk's own limit: the same bytes, in the same batches, written and fsynced to a file
//! on the filesystem under test, the way the server writes its image volumes (`O_DIRECT` from
//! an aligned buffer into space preallocated in steps, where the filesystem allows it; else
//! through the page cache). The server's ingestion is reported as a ratio of this.

use std::fs::OpenOptions;
use std::io;
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
    /// Written with `O_DIRECT` (false: through the page cache).
    pub direct: bool,
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
    const BLOCK: usize = 4096;
    const STEP: u64 = 16 * 1024 * 1024;
    let file = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let direct = open_direct(path).ok();
    let record: Vec<u8> = (0..record_bytes).map(|i| (i * 31 % 251) as u8).collect();
    let batch_bytes = record_bytes * batch_records as usize;
    // An aligned buffer: a Vec of 4096-aligned blocks, one block spare for the padding.
    #[repr(C, align(4096))]
    #[derive(Clone, Copy)]
    struct Block([u8; BLOCK]);
    let mut blocks = vec![Block([0; BLOCK]); batch_bytes.div_ceil(BLOCK) + 1];
    // SAFETY: the blocks are one contiguous allocation of plain bytes.
    let buffer: &mut [u8] = unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), blocks.len() * BLOCK)
    };
    for (i, byte) in buffer.iter_mut().enumerate() {
        *byte = record[i % record_bytes.max(1)];
    }
    let started = Instant::now();
    let mut written = 0u64;
    let mut end = 0u64;
    let mut allocated = 0u64;
    let mut latency = es_perf::latency::LatencyRecorder::new();
    while written < records && started.elapsed() < duration_max {
        let count = batch_records.min(records - written);
        let bytes = count as usize * record_bytes;
        let batch_started = Instant::now();
        match &direct {
            Some(direct) => {
                // Like the server: from the block holding the end, padded to whole blocks.
                let start = end - end % BLOCK as u64;
                let head = (end - start) as usize;
                let len = (head + bytes).div_ceil(BLOCK) * BLOCK;
                if start + len as u64 > allocated {
                    let want = (start + len as u64).max(allocated + STEP);
                    preallocate(&file, allocated, want - allocated)?;
                    allocated = want;
                }
                std::os::unix::fs::FileExt::write_all_at(direct, &buffer[..len], start)?;
            }
            None => {
                std::os::unix::fs::FileExt::write_all_at(&file, &buffer[..bytes], end)?;
            }
        }
        file.sync_data()?;
        latency.record(batch_started.elapsed());
        end += bytes as u64;
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
        direct: direct.is_some(),
    })
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<std::fs::File> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(target_os = "linux")]
fn preallocate(file: &std::fs::File, from: u64, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, from as i64, len as i64) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn preallocate(_file: &std::fs::File, _from: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

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
