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

use super::{central_plane, decode_grey, next_frame_at, Analysis, Decoded};
use es_storage::activity::{ActivityRecorded, CurveUpdate};
use es_storage::limits::{ACTIVITY_POINTS_PER_EMBRYO_MAX, INSTANT_MS_MAX};
use es_storage::{ChangeEntity, Operation, StorageError, Store, Writer};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

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
/// Embryos whose frames could not be read for a passing reason (the archive's object store
/// unreachable, say) are tried again this often, at most this many of them (the others wait
/// for their next acquisition).
const RETRY_INTERVAL: Duration = Duration::from_secs(30);
pub const RETRY_EMBRYOS_MAX: usize = 4096;

/// The running computation.
pub struct Background {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    store: Store,
    writer: Writer,
    stop: AtomicBool,
    /// Set by every commit (on the writer's thread: it never waits for this idle thread, so
    /// no lock is shared with it), then the thread is unparked.
    woken: AtomicBool,
    thread: OnceLock<Thread>,
    priority: Mutex<String>,
    images_analysed: AtomicU64,
    frames_skipped: AtomicU64,
    points: AtomicU64,
    cpu_ns: AtomicU64,
    embryos_failed: AtomicU64,
    embryos_waiting: AtomicU64,
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
    /// Embryo updates that failed since the start.
    pub embryos_failed: u64,
    /// Embryos to be tried again (their frames could not be read for a passing reason).
    pub embryos_waiting: u64,
    pub last_error: Option<String>,
}

impl Background {
    /// Starts the thread.
    pub fn start(store: &Store, writer: &Writer) -> Result<Background, String> {
        let shared = Arc::new(Shared {
            store: store.clone(),
            writer: writer.clone(),
            stop: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            thread: OnceLock::new(),
            priority: Mutex::new("normal".into()),
            images_analysed: AtomicU64::new(0),
            frames_skipped: AtomicU64::new(0),
            points: AtomicU64::new(0),
            cpu_ns: AtomicU64::new(0),
            embryos_failed: AtomicU64::new(0),
            embryos_waiting: AtomicU64::new(0),
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
            embryos_waiting: shared.embryos_waiting.load(Ordering::Relaxed),
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

/// What the thread keeps between rounds.
#[derive(Default)]
struct Pass {
    cache: FrameCache,
    /// Embryos to try again, and when.
    retry: BTreeSet<String>,
    retry_at: Option<Instant>,
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
        self.woken.store(true, Ordering::Release);
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn run(&self) {
        let _ = self.thread.set(std::thread::current());
        let priority = match crate::os::lower_thread_priority() {
            Ok(applied) => applied.to_string(),
            Err(error) => {
                tracing::warn!(%error, "the activity thread runs at normal priority");
                format!("normal ({error})")
            }
        };
        tracing::info!(%priority, "activity curves are computed in the background as images arrive");
        *self.priority.lock() = priority;
        let mut pass = Pass::default();
        while !self.stopping() {
            let started_ns = crate::os::thread_cpu_ns();
            let outcome = self.retry(&mut pass).and_then(|()| self.round(&mut pass));
            self.cpu_ns.fetch_add(
                crate::os::thread_cpu_ns().saturating_sub(started_ns),
                Ordering::Relaxed,
            );
            self.embryos_waiting
                .store(pass.retry.len() as u64, Ordering::Relaxed);
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
            if !self.woken.swap(false, Ordering::AcqRel) && !self.stopping() {
                std::thread::park_timeout(wait);
                self.woken.store(false, Ordering::Release);
            }
        }
    }

    /// The embryos whose frames could not be read, once [`RETRY_INTERVAL`] has passed.
    fn retry(&self, pass: &mut Pass) -> Result<(), RoundError> {
        if pass.retry.is_empty() || pass.retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        let embryos: Vec<String> = std::mem::take(&mut pass.retry).into_iter().collect();
        pass.retry_at = Some(Instant::now() + RETRY_INTERVAL);
        let cursor = self.store.read()?.activity_cursor()?;
        self.analyse(pass, &embryos, cursor, cursor)
    }

    /// One page of changes (or a whole scan); true when there was work.
    fn round(&self, pass: &mut Pass) -> Result<bool, RoundError> {
        let reader = self.store.read()?;
        let cursor = reader.activity_cursor()?;
        let head = reader.last_change_seq()?;
        if cursor == head {
            return Ok(false);
        }
        if cursor > head {
            // Not a cursor this store wrote (the cursor and the log are written together):
            // the computation waits rather than guess, and says so.
            let message = format!(
                "meta/activity_cursor is {cursor}, past the change log's end {head}: background \
                 activity curves wait (curves are computed when asked for)"
            );
            if self.last_error.lock().as_deref() != Some(message.as_str()) {
                tracing::error!("{message}");
                *self.last_error.lock() = Some(message);
            }
            return Ok(false);
        }
        let changes = match reader.changes_after(cursor, CHANGES_PER_ROUND) {
            Ok(changes) => changes,
            Err(StorageError::CursorExpired { oldest }) => {
                drop(reader);
                tracing::info!(cursor, oldest, head, "the activity computation scans every embryo (its place in the change log is gone)");
                self.scan(pass, head)?;
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
        self.analyse(pass, &embryos, cursor, end)?;
        Ok(true)
    }

    /// Every embryo, then the cursor to `head` (the log's end when the scan began).
    fn scan(&self, pass: &mut Pass, head: u64) -> Result<(), RoundError> {
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
            self.analyse(pass, &ids, cursor, cursor)?;
        }
        let cursor = self.store.read()?.activity_cursor()?;
        self.analyse(pass, &[], cursor, head)
    }

    /// Brings the curves of `embryos` up to date, then records the cursor `end`; the
    /// updates recorded before the last carry `cursor` (no move). An embryo whose frames
    /// cannot be read now goes to the retry list; an update the store would refuse (a frame
    /// stamped out of bounds) is passed over, so that one embryo never holds up the others.
    fn analyse(
        &self,
        pass: &mut Pass,
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
                let (update, more) = match self.embryo_update(embryo_id, &mut pass.cache) {
                    Ok(done) => done,
                    Err(error) => {
                        self.embryos_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%embryo_id, %error, "the activity curve of an embryo cannot be brought up to date now; it is tried again");
                        *self.last_error.lock() = Some(format!("embryo {embryo_id}: {error}"));
                        if pass.retry.len() < RETRY_EMBRYOS_MAX {
                            pass.retry.insert(embryo_id.clone());
                        }
                        break;
                    }
                };
                if let Some(update) = update {
                    let alone = ActivityRecorded {
                        curves: vec![update],
                        cursor: 0,
                    };
                    match alone.validate() {
                        Ok(()) => updates.extend(alone.curves),
                        Err(error) => {
                            self.embryos_failed.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%embryo_id, %error, "an activity curve update is passed over");
                            *self.last_error.lock() = Some(format!("embryo {embryo_id}: {error}"));
                            break;
                        }
                    }
                }
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
    /// whether more are waiting. A damaged frame is passed over (counted in `frames_skipped`);
    /// a frame the object store cannot give now is an error (tried again later).
    fn embryo_update(
        &self,
        embryo_id: &str,
        cache: &mut FrameCache,
    ) -> Result<(Option<CurveUpdate>, bool), StorageError> {
        // What is needed is read first; the snapshot goes before the decoding.
        let reader = self.store.read()?;
        let stored = reader.activity_curve(embryo_id)?;
        let (focal_plane, through) = match &stored {
            Some(curve) if curve.row.points.len() >= ACTIVITY_POINTS_PER_EMBRYO_MAX => {
                return Ok((None, false));
            }
            Some(curve) => (curve.row.focal_plane, curve.row.through_ms),
            None => (central_plane(&reader, embryo_id)?, i64::MIN),
        };
        let analysed = (through != i64::MIN).then_some(through);
        // The frame the next is compared with: decoded in the cache, or read again.
        let previous = cache.take(embryo_id, through);
        let reference = match (&previous, analysed) {
            (None, Some(through)) => reader
                .frames(embryo_id, focal_plane, through, through, 1)?
                .and_then(|chunk| chunk.frames.into_iter().next()),
            _ => None,
        };
        let from_ms = analysed.map_or(i64::MIN, |through| through.saturating_add(1));
        let Some(mut chunk) = reader.frames(
            embryo_id,
            focal_plane,
            from_ms,
            INSTANT_MS_MAX,
            FRAMES_PER_UPDATE,
        )?
        else {
            return Ok((None, false));
        };
        let damaged_at = match chunk.damaged.take() {
            Some(error @ StorageError::ArchiveUnavailable { .. }) => return Err(error),
            Some(_) => {
                let after = chunk.frames.last().map(|f| f.acquired_at_ms).or(analysed);
                next_frame_at(&reader, embryo_id, focal_plane, after)?
            }
            None => None,
        };
        drop(reader);

        let mut analysis = Analysis::starting_from(previous);
        if let Some(frame) = reference {
            // Decoded again (it counts as work) but not as a frame of its own: it gave its
            // point, or was skipped, when it was analysed.
            analysis.decoded += 1;
            analysis.previous = decode_grey(&frame.jpeg)
                .ok()
                .map(|decoded| (frame.acquired_at_ms, decoded));
        }
        let mut last = through;
        let mut more = chunk.frames.len() >= FRAMES_PER_UPDATE as usize;
        for frame in &chunk.frames {
            if self.stopping() {
                more = true;
                break;
            }
            analysis.frame(embryo_id, frame.acquired_at_ms, &frame.jpeg);
            last = frame.acquired_at_ms;
        }
        if let (Some(at), false) = (damaged_at, more) {
            tracing::warn!(%embryo_id, acquired_at_ms = at, "a damaged frame is passed over by the activity curve");
            last = at;
            analysis.skipped += 1;
            analysis.previous = None;
            more = true;
        }
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
