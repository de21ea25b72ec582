//! The background computation of activity curves (`[Server] activity = on`): one thread that
//! follows the change log and analyses each new acquisition of every embryo as it arrives,
//! storing the points (`es_storage::activity`), so that viewers and the API get curves without
//! waiting.
//!
//! # It never delays the data path
//!
//! - The thread runs at the lowest priority the system has (`SCHED_IDLE` and the idle I/O
//!   class on Linux, see [`crate::os::lower_thread_priority`]): the kernel gives it a CPU only
//!   when no event loop, worker or writer wants one. Under a burst it falls behind; it catches
//!   up when the burst ends, from the cursor it stored.
//! - It reads through MVCC snapshots (no lock an event loop could wait on), and writes one small
//!   `ActivityRecorded` per [`CURVES_PER_OP`] curves in the writer's small lane.
//! - Its work is bounded: [`CHANGES_PER_ROUND`] changes, [`FRAMES_PER_UPDATE`] frames of one
//!   embryo at a time, a decoded-frame cache of [`FRAME_CACHE_BYTES_MAX`].
//!
//! # Nothing is skipped, nothing is counted twice
//!
//! The cursor moves to the end of a page of changes only with the curves of every embryo the
//! page named; storage appends only points after a curve's `through_ms`. A crash repeats a
//! page, harmlessly. A cursor older than the retained change log (a first start on an older
//! store, a restored backup) makes the thread scan every embryo instead.
//!
//! Acquisition changes younger than [`SETTLE_MS`] wait: the focal planes of one acquisition
//! arrive in several uploads, and the change is recorded with the first.

use super::{central_plane, Analysis, Decoded};
use es_storage::activity::{ActivityRecorded, CurveUpdate};
use es_storage::limits::ACTIVITY_POINTS_PER_EMBRYO_MAX;
use es_storage::{ChangeEntity, StorageError, Store, Writer};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Changes read per round.
pub const CHANGES_PER_ROUND: u32 = 256;
/// Embryos read per page of a full scan.
pub const SCAN_EMBRYOS_PER_PAGE: u32 = 64;
/// Frames of one embryo analysed per update.
pub const FRAMES_PER_UPDATE: u32 = 64;
/// Curves per `ActivityRecorded`.
pub const CURVES_PER_OP: usize = 64;
/// Decoded frames kept (the last of each embryo), so that a new acquisition is compared
/// without decoding the one before again.
pub const FRAME_CACHE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long an acquisition change waits before it is analysed (its other focal planes may
/// still be arriving).
pub const SETTLE_MS: i64 = 3_000;
/// How often an idle thread looks at the change log (commits wake it sooner).
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// How long the thread waits after a failed round.
const FAILURE_WAIT: Duration = Duration::from_secs(5);

/// The running computation.
pub struct Background {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    store: Store,
    writer: Writer,
    stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    priority: Mutex<String>,
    images_analysed: AtomicU64,
    frames_skipped: AtomicU64,
    points: AtomicU64,
    cpu_ns: AtomicU64,
    embryos_failed: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// What `status`, `/metrics` and the dashboard show.
#[derive(Debug, Clone, Serialize)]
pub struct BackgroundStatus {
    /// How the thread's priority was lowered ("SCHED_IDLE, idle I/O class").
    pub priority: String,
    /// The change-log seq analysed up to, and how many changes are still to look at.
    pub cursor: u64,
    pub changes_behind: u64,
    /// Embryos with a stored curve.
    pub curves: u64,
    /// Frames decoded and compared since the start.
    pub images_analysed: u64,
    pub frames_skipped: u64,
    pub points: u64,
    /// CPU time of the thread since the start.
    pub cpu_ms: u64,
    /// Images analysed per second of CPU (0 before the first).
    pub images_per_cpu_s: f64,
    /// Embryos whose frames could not be read (passed over, computed when asked for).
    pub embryos_failed: u64,
    pub last_error: Option<String>,
}

impl Background {
    /// Starts the thread.
    pub fn start(store: &Store, writer: &Writer) -> Result<Background, String> {
        let shared = Arc::new(Shared {
            store: store.clone(),
            writer: writer.clone(),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            priority: Mutex::new("normal".into()),
            images_analysed: AtomicU64::new(0),
            frames_skipped: AtomicU64::new(0),
            points: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            embryos_failed: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let weak = Arc::downgrade(&shared);
        store.on_commit(Box::new(move |_| {
            if let Some(shared) = weak.upgrade() {
                shared.wake();
            }
        }));
        let running = shared.clone();
        let thread = std::thread::Builder::new()
            .name("es-activity".into())
            .spawn(move || running.run())
            .map_err(|error| format!("cannot start the activity thread: {error}"))?;
        Ok(Background {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The computation's progress.
    pub fn status(&self) -> BackgroundStatus {
        let shared = &self.shared;
        let (cursor, head, curves) = shared
            .store
            .read()
            .and_then(|r| {
                Ok((
                    r.activity_cursor()?,
                    r.last_change_seq()?,
                    r.activity_curve_count()?,
                ))
            })
            .unwrap_or_default();
        let images = shared.images_analysed.load(Ordering::Relaxed);
        let cpu_ns = shared.cpu_ns.load(Ordering::Relaxed);
        BackgroundStatus {
            priority: shared.priority.lock().clone(),
            cursor,
            changes_behind: head.saturating_sub(cursor),
            curves,
            images_analysed: images,
            frames_skipped: shared.frames_skipped.load(Ordering::Relaxed),
            points: shared.points.load(Ordering::Relaxed),
            cpu_ms: cpu_ns / 1_000_000,
            images_per_cpu_s: if cpu_ns == 0 {
                0.0
            } else {
                images as f64 / (cpu_ns as f64 / 1e9)
            },
            embryos_failed: shared.embryos_failed.load(Ordering::Relaxed),
            last_error: shared.last_error.lock().clone(),
        }
    }

    /// Stops the thread after the frame it is analysing.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last decoded frame of each embryo, bounded in bytes: when full, the entries of the
/// least recent acquisitions go first.
#[derive(Default)]
struct FrameCache {
    entries: HashMap<String, (i64, Decoded)>,
    bytes: usize,
}

impl FrameCache {
    fn take(&mut self, embryo_id: &str, at_ms: i64) -> Option<(i64, Decoded)> {
        let entry = self.entries.remove(embryo_id)?;
        self.bytes -= entry.1 .2.len();
        (entry.0 == at_ms).then_some(entry)
    }

    fn put(&mut self, embryo_id: &str, at_ms: i64, decoded: Decoded) {
        if let Some(old) = self.entries.remove(embryo_id) {
            self.bytes -= old.1 .2.len();
        }
        if decoded.2.len() > FRAME_CACHE_BYTES_MAX / 4 {
            return;
        }
        while self.bytes + decoded.2.len() > FRAME_CACHE_BYTES_MAX {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(id, _)| id.clone())
            else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= gone.1 .2.len();
            }
        }
        self.bytes += decoded.2.len();
        self.entries.insert(embryo_id.to_string(), (at_ms, decoded));
    }
}

/// Why a round ended early.
enum RoundError {
    Stopped,
    Failed(String),
}

impl From<StorageError> for RoundError {
    fn from(error: StorageError) -> Self {
        RoundError::Failed(error.to_string())
    }
}

impl Shared {
    fn wake(&self) {
        let (lock, condvar) = &self.wake;
        *lock.lock() = true;
        condvar.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(&self) {
        let priority = match crate::os::lower_thread_priority() {
            Ok(applied) => applied.to_string(),
            Err(error) => {
                tracing::warn!(%error, "the activity thread runs at normal priority");
                format!("normal ({error})")
            }
        };
        tracing::info!(%priority, "activity curves are computed in the background as images arrive");
        *self.priority.lock() = priority;
        let mut cache = FrameCache::default();
        while !self.stopping() {
            let started_ns = crate::os::thread_cpu_ns();
            let outcome = self.round(&mut cache);
            self.cpu_ns.fetch_add(
                crate::os::thread_cpu_ns().saturating_sub(started_ns),
                Ordering::Relaxed,
            );
            let wait = match outcome {
                Ok(true) => continue,
                Ok(false) => IDLE_WAIT,
                Err(RoundError::Stopped) => break,
                Err(RoundError::Failed(error)) => {
                    tracing::warn!(%error, "the activity computation failed; it tries again");
                    *self.last_error.lock() = Some(error);
                    FAILURE_WAIT
                }
            };
            let (lock, condvar) = &self.wake;
            let mut woken = lock.lock();
            if !*woken && !self.stopping() {
                condvar.wait_for(&mut woken, wait);
            }
            *woken = false;
        }
    }

    /// One page of changes (or a whole scan); true when there was work.
    fn round(&self, cache: &mut FrameCache) -> Result<bool, RoundError> {
        let reader = self.store.read()?;
        let cursor = reader.activity_cursor()?;
        let head = reader.last_change_seq()?;
        if cursor >= head {
            return Ok(false);
        }
        let changes = match reader.changes_after(cursor, CHANGES_PER_ROUND) {
            Ok(changes) => changes,
            Err(StorageError::CursorExpired { oldest }) => {
                drop(reader);
                tracing::info!(cursor, oldest, "the activity computation scans every embryo (its place in the change log is gone)");
                self.scan(cache, head)?;
                return Ok(true);
            }
            Err(error) => return Err(error.into()),
        };
        drop(reader);
        let settled_before = crate::now_ms() - SETTLE_MS;
        let mut end = cursor;
        let mut embryos: Vec<String> = Vec::new();
        for change in &changes {
            if change.at_ms > settled_before {
                break;
            }
            end = change.seq;
            if change.entity == ChangeEntity::Acquisition && !embryos.contains(&change.id) {
                embryos.push(change.id.clone());
            }
        }
        if end == cursor {
            return Ok(false);
        }
        self.analyse(cache, &embryos, cursor, end)?;
        Ok(true)
    }

    /// Every embryo, then the cursor to `head` (the log's end when the scan began).
    fn scan(&self, cache: &mut FrameCache, head: u64) -> Result<(), RoundError> {
        let mut after = 0;
        loop {
            let page = self
                .store
                .read()?
                .embryo_ids_after(after, SCAN_EMBRYOS_PER_PAGE)?;
            let Some(&(last, _)) = page.last() else {
                break;
            };
            after = last;
            let ids: Vec<String> = page.into_iter().map(|(_, id)| id).collect();
            let cursor = self.store.read()?.activity_cursor()?;
            self.analyse(cache, &ids, cursor, cursor)?;
        }
        let cursor = self.store.read()?.activity_cursor()?;
        self.analyse(cache, &[], cursor, head)
    }

    /// Brings the curves of `embryos` up to date, then records the cursor `end`; the
    /// updates recorded before the last carry `cursor` (no move).
    fn analyse(
        &self,
        cache: &mut FrameCache,
        embryos: &[String],
        cursor: u64,
        end: u64,
    ) -> Result<(), RoundError> {
        let mut updates = Vec::new();
        for embryo_id in embryos {
            loop {
                if self.stopping() {
                    return Err(RoundError::Stopped);
                }
                let (update, more) = match self.embryo_update(embryo_id, cache) {
                    Ok(done) => done,
                    Err(error) => {
                        self.embryos_failed.fetch_add(1, Ordering::Relaxed);
                        let message = format!("embryo {embryo_id}: {error}");
                        tracing::warn!(%embryo_id, %error, "the activity curve of an embryo cannot be computed in the background; it is computed when asked for");
                        *self.last_error.lock() = Some(message);
                        (None, false)
                    }
                };
                updates.extend(update);
                if updates.len() >= CURVES_PER_OP || (more && !updates.is_empty()) {
                    self.record(std::mem::take(&mut updates), cursor)?;
                }
                if !more {
                    break;
                }
            }
        }
        self.record(updates, end)
    }

    fn record(&self, curves: Vec<CurveUpdate>, cursor: u64) -> Result<(), RoundError> {
        match self.writer.write(ActivityRecorded { curves, cursor }) {
            Ok(applied) => {
                self.points.fetch_add(applied.points, Ordering::Relaxed);
                Ok(())
            }
            Err(es_storage::WriteError::ShuttingDown) => Err(RoundError::Stopped),
            Err(error) => Err(RoundError::Failed(format!(
                "recording activity curves: {error}"
            ))),
        }
    }

    /// The next frames of one embryo (at most [`FRAMES_PER_UPDATE`]) as an update, and
    /// whether more are waiting.
    fn embryo_update(
        &self,
        embryo_id: &str,
        cache: &mut FrameCache,
    ) -> Result<(Option<CurveUpdate>, bool), StorageError> {
        let reader = self.store.read()?;
        let stored = reader.activity_curve(embryo_id)?;
        let (focal_plane, through) = match &stored {
            Some(curve) if curve.row.points.len() >= ACTIVITY_POINTS_PER_EMBRYO_MAX => {
                return Ok((None, false));
            }
            Some(curve) => (curve.row.focal_plane, curve.row.through_ms),
            None => (central_plane(&reader, embryo_id)?, i64::MIN),
        };
        // From the frame last analysed (the one the next is compared with), unless it is
        // still decoded in the cache.
        let previous = cache.take(embryo_id, through);
        let from_ms = if previous.is_some() {
            through.saturating_add(1)
        } else {
            through
        };
        let limit = FRAMES_PER_UPDATE + 1;
        let Some(chunk) = reader.frames(embryo_id, focal_plane, from_ms, i64::MAX, limit)? else {
            return Ok((None, false));
        };
        let mut analysis = Analysis::starting_from(previous);
        let mut last = through;
        for frame in &chunk.frames {
            if frame.acquired_at_ms <= through {
                // The frame the next is compared with: decoded, not a point of its own.
                analysis.frame(embryo_id, frame.acquired_at_ms, &frame.jpeg);
                analysis.points.clear();
                continue;
            }
            analysis.frame(embryo_id, frame.acquired_at_ms, &frame.jpeg);
            last = frame.acquired_at_ms;
        }
        let mut more = chunk.frames.len() >= limit as usize;
        if chunk.damaged.is_some() {
            // The frame after the last one read does not check: pass over its acquisition.
            if let Some(next) = reader
                .acquisitions(embryo_id, Some(last), 1)?
                .and_then(|later| later.into_iter().next())
            {
                tracing::warn!(%embryo_id, acquired_at_ms = next.acquired_at_ms, "a damaged frame is passed over by the activity curve");
                last = next.acquired_at_ms;
                analysis.skipped += 1;
                analysis.previous = None;
                more = true;
            }
        }
        drop(reader);
        self.images_analysed
            .fetch_add(analysis.decoded, Ordering::Relaxed);
        self.frames_skipped
            .fetch_add(u64::from(analysis.skipped), Ordering::Relaxed);
        if let Some((at_ms, decoded)) = analysis.previous.take() {
            if at_ms == last {
                cache.put(embryo_id, at_ms, decoded);
            }
        }
        if last <= through {
            return Ok((None, false));
        }
        let update = CurveUpdate {
            embryo_id: embryo_id.to_string(),
            focal_plane,
            points: analysis
                .points
                .iter()
                .map(|p| (p.acquired_at_ms, p.activity))
                .collect(),
            frames_skipped: analysis.skipped,
            through_ms: last,
        };
        Ok((Some(update), more))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frame_cache_is_bounded_and_gives_back_only_the_frame_asked_for() {
        let mut cache = FrameCache::default();
        let frame = |n: usize| (n, 1, vec![0u8; n]);
        let side = FRAME_CACHE_BYTES_MAX / 8;
        for i in 0..20 {
            cache.put(&format!("E{i}"), i, frame(side));
            assert!(cache.bytes <= FRAME_CACHE_BYTES_MAX);
        }
        assert_eq!(cache.entries.len(), 8);
        assert!(cache.take("E0", 0).is_none(), "the oldest went first");
        assert!(
            cache.take("E19", 18).is_none(),
            "another acquisition's frame"
        );
        assert!(
            cache.take("E19", 19).is_none(),
            "taken (and dropped) just above"
        );
        assert_eq!(cache.take("E18", 18).map(|(at, _)| at), Some(18));
        assert_eq!(cache.bytes, 6 * side);
        cache.put("huge", 1, frame(FRAME_CACHE_BYTES_MAX));
        assert!(!cache.entries.contains_key("huge"));
    }
}
