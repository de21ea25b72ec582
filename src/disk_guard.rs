//! Keeps `[Storage] reserve_bytes` free on the data directory's filesystem: a thread samples
//! the free space once a second, and while it is below the reserve new writes are refused
//! with `disk_full` (incubators keep their data and retry) while reads go on. The reserve
//! leaves room for redb's own commit pages, so the database never meets a real ENOSPC in
//! normal operation.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Shared view of the data directory's free space.
#[derive(Debug, Default)]
pub struct DiskState {
    low: AtomicBool,
    free_bytes: AtomicU64,
    /// `[Storage] reserve_bytes`, which a reload may change.
    reserve_bytes: AtomicU64,
}

impl DiskState {
    /// The reserve in force.
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes.load(Ordering::Relaxed)
    }

    /// A new reserve (a reload): the next sample, within a second, applies it.
    pub fn set_reserve_bytes(&self, reserve_bytes: u64) {
        self.reserve_bytes.store(reserve_bytes, Ordering::Relaxed);
    }

    /// True while free space is below the reserve: refuse writes.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Records one sample; logs when the state changes.
    pub fn update(&self, free_bytes: u64, reserve_bytes: u64) {
        self.free_bytes.store(free_bytes, Ordering::Relaxed);
        let low = free_bytes < reserve_bytes;
        let was_low = self.low.swap(low, Ordering::Relaxed);
        if low && !was_low {
            tracing::error!(free_bytes, reserve_bytes,
                "free disk space is below [Storage] reserve_bytes: new writes are refused with disk_full until space returns; reads go on");
        } else if !low && was_low {
            tracing::warn!(
                free_bytes,
                reserve_bytes,
                "free disk space is above the reserve again: writes resume"
            );
        }
    }
}

pub struct DiskGuard {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DiskGuard {
    /// Takes a first sample at once (so a server started on a full disk refuses writes from
    /// its first request), then samples on its own thread.
    pub fn start(
        path: PathBuf,
        reserve_bytes: u64,
        state: Arc<DiskState>,
    ) -> std::io::Result<DiskGuard> {
        state.set_reserve_bytes(reserve_bytes);
        sample(&path, &state);
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("es-disk-guard".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(SAMPLE_INTERVAL);
                    sample(&path, &state);
                }
            })?;
        Ok(DiskGuard {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sample(path: &std::path::Path, state: &DiskState) {
    match crate::os::disk_free_bytes(path) {
        Ok(free) => state.update(free, state.reserve_bytes()),
        Err(error) => tracing::warn!(%error, path = %path.display(), "cannot read free disk space"),
    }
}

#[cfg(test)]
mod tests {
    use super::DiskState;

    #[test]
    fn below_the_reserve_is_low_and_recovers() {
        let state = DiskState::default();
        state.update(10, 5);
        assert!(!state.is_low());
        state.update(4, 5);
        assert!(state.is_low());
        assert_eq!(state.free_bytes(), 4);
        state.update(6, 5);
        assert!(!state.is_low());
    }
}
