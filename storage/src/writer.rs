//! The one writer thread: group commit.
//!
//! Requests arrive on a bounded queue. The thread blocks for the first one, drains more without
//! blocking until `batch_requests_max` or `batch_bytes_max` is reached or the queue is empty,
//! applies them all in ONE write transaction with `Durability::Immediate`, commits once, and
//! only then calls every completion. A refused op writes nothing and gets its own error; a
//! failed commit fails every op of the batch.

use crate::apply::Batch;
use crate::error::{Fault, StorageError, SubmitError};
use crate::limits;
use crate::ops::{Lane, OpResult, Operation};
use crate::store::Store;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use parking_lot::{Mutex, RwLock};
use redb::Durability;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Called once with the operation's result, on the writer thread, after the commit reached the
/// disk. It must not block: hand the result to the connection's loop (queue + waker) and
/// return. Calling the blocking [`Writer::submit`] from a completion can deadlock; use
/// `try_submit`.
pub type Completion<O> = Box<dyn FnOnce(OpResult<O>) + Send + 'static>;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterOptions {
    /// Capacity of the bounded request queue; when full, `try_submit` answers `Full`.
    pub queue_requests_max: usize,
    /// Most requests applied in one write transaction.
    pub batch_requests_max: usize,
    /// A batch stops taking requests once their payload (JPEG bytes) reaches this.
    pub batch_bytes_max: u64,
}

impl Default for WriterOptions {
    fn default() -> WriterOptions {
        WriterOptions {
            queue_requests_max: 8192,
            batch_requests_max: 4096,
            batch_bytes_max: 64 * MIB,
        }
    }
}

/// Counters of the writer since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriterStats {
    /// Successful commits (one per batch).
    pub commits: u64,
    /// Batches whose transaction failed (every op got an error).
    pub commit_failures: u64,
    /// Requests taken from the queue (completed or failed).
    pub requests: u64,
    /// Payload bytes of the requests taken.
    pub bytes: u64,
    /// Requests in the most recent batch.
    pub last_batch_requests: u64,
    /// Payload bytes of the most recent batch.
    pub last_batch_bytes: u64,
    /// Time spent applying requests inside write transactions, in microseconds.
    pub apply_us: u64,
    /// Time spent writing and `fdatasync`ing image records into volumes, in microseconds
    /// (included in neither `apply_us` nor `commit_us`).
    pub volume_sync_us: u64,
    /// Time spent in `commit()` (writing pages and fsync), in microseconds.
    pub commit_us: u64,
}

#[derive(Default)]
struct StatsCounters {
    commits: AtomicU64,
    commit_failures: AtomicU64,
    requests: AtomicU64,
    bytes: AtomicU64,
    last_batch_requests: AtomicU64,
    last_batch_bytes: AtomicU64,
    apply_us: AtomicU64,
    volume_sync_us: AtomicU64,
    commit_us: AtomicU64,
}

/// An operation with its completion, its type erased so that operations of every type share
/// one queue and one batch. Made by [`Submission::new`]; handed back by a refused submit.
pub struct Submission {
    job: Box<dyn Job>,
}

impl Submission {
    pub fn new<O: Operation>(op: O, done: impl FnOnce(OpResult<O>) + Send + 'static) -> Submission {
        Submission {
            job: Box::new(Typed {
                op,
                done: Box::new(done),
                result: None,
            }),
        }
    }
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.job.debug(f)
    }
}

/// What the writer needs of a queued operation, whatever its type.
trait Job: Send {
    fn payload_bytes(&self) -> u64;
    fn lane(&self) -> Lane;
    fn at_ms(&self) -> Option<i64>;
    /// Applies the operation in the batch and keeps its result. The error aborts the batch.
    fn apply(&mut self, batch: &mut Batch<'_>) -> Result<(), StorageError>;
    /// Forgets a kept result: the batch it was applied in did not commit.
    fn forget(&mut self);
    /// After the commit: lets the operation complete its answer from the committed state.
    fn after_commit(&mut self, reader: &crate::Reader);
    /// True when `after_commit` has something to do.
    fn wants_after_commit(&self) -> bool;
    /// Calls the completion with the kept result, or with `fault` when the batch failed.
    fn complete(self: Box<Self>, fault: Option<Fault>);
    fn debug(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result;
}

struct Typed<O: Operation> {
    op: O,
    done: Completion<O>,
    result: Option<OpResult<O>>,
}

impl<O: Operation> Job for Typed<O> {
    fn payload_bytes(&self) -> u64 {
        self.op.payload_bytes()
    }

    fn lane(&self) -> Lane {
        self.op.lane()
    }

    fn at_ms(&self) -> Option<i64> {
        self.op.at_ms()
    }

    fn apply(&mut self, batch: &mut Batch<'_>) -> Result<(), StorageError> {
        assert!(
            self.result.is_none(),
            "an operation is applied once per batch"
        );
        self.result = Some(batch.run(&self.op)?);
        Ok(())
    }

    fn forget(&mut self) {
        self.result = None;
    }

    fn after_commit(&mut self, reader: &crate::Reader) {
        if let Some(result) = self.result.as_mut() {
            O::after_commit(result, reader);
        }
    }

    fn wants_after_commit(&self) -> bool {
        self.result.as_ref().is_some_and(O::wants_after_commit)
    }

    fn complete(self: Box<Self>, fault: Option<Fault>) {
        let Typed { op, done, result } = *self;
        let result = match (fault, result) {
            (Some(fault), _) => Err(fault.into()),
            (None, Some(result)) => result,
            (None, None) => {
                tracing::error!(?op, "a committed batch left an operation without a result");
                Err(Fault::Storage("internal error: the operation was not applied".into()).into())
            }
        };
        if catch_unwind(AssertUnwindSafe(move || done(result))).is_err() {
            tracing::error!("a storage write completion panicked");
        }
    }

    fn debug(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.op.fmt(f)
    }
}

struct Request {
    job: Box<dyn Job>,
}

/// Handle to the writer thread. Cheap to clone; all clones share one queue.
#[derive(Clone)]
pub struct Writer {
    shared: Arc<Shared>,
}

struct Shared {
    /// None once shutdown began. Dropping the last sender lets the thread drain and exit.
    sender: RwLock<Option<Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<StatsCounters>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Writer {
    pub(crate) fn start(store: Store, options: WriterOptions) -> Writer {
        assert!(options.queue_requests_max > 0);
        assert!(options.batch_requests_max > 0);
        assert!(options.batch_bytes_max > 0);
        let (sender, receiver) = crossbeam_channel::bounded(options.queue_requests_max);
        let stats = Arc::new(StatsCounters::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("es-storage-writer".into())
            .spawn(move || run(&store, &receiver, &options, &thread_stats))
            .expect("spawning the storage writer thread");
        Writer {
            shared: Arc::new(Shared {
                sender: RwLock::new(Some(sender)),
                thread: Mutex::new(Some(thread)),
                stats,
            }),
        }
    }

    /// Non-blocking. `Full` when the queue is full (stop reading the socket, retry later with
    /// [`Writer::try_resubmit`]); `Closed` after shutdown began. Both hand the submission back.
    pub fn try_submit<O: Operation>(
        &self,
        op: O,
        done: impl FnOnce(OpResult<O>) + Send + 'static,
    ) -> Result<(), SubmitError> {
        self.try_resubmit(Submission::new(op, done))
    }

    /// `try_submit` of a submission made before (one a full queue handed back).
    pub fn try_resubmit(&self, submission: Submission) -> Result<(), SubmitError> {
        let guard = self.shared.sender.read();
        let Some(sender) = guard.as_ref() else {
            return Err(SubmitError::Closed(submission));
        };
        let request = Request {
            job: submission.job,
        };
        match sender.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(request)) => {
                Err(SubmitError::Full(Submission { job: request.job }))
            }
            Err(TrySendError::Disconnected(request)) => {
                Err(SubmitError::Closed(Submission { job: request.job }))
            }
        }
    }

    /// Blocks while the queue is full (for admin tools). `Closed` after shutdown began.
    pub fn submit<O: Operation>(
        &self,
        op: O,
        done: impl FnOnce(OpResult<O>) + Send + 'static,
    ) -> Result<(), SubmitError> {
        let submission = Submission::new(op, done);
        let sender = self.shared.sender.read().clone();
        let Some(sender) = sender else {
            return Err(SubmitError::Closed(submission));
        };
        sender
            .send(Request {
                job: submission.job,
            })
            .map_err(|error| SubmitError::Closed(Submission { job: error.0.job }))
    }

    /// Submits `op`, blocking while the queue is full, and waits for its result (for admin
    /// tools and tests; never from an event loop or a completion).
    pub fn write<O: Operation>(&self, op: O) -> OpResult<O> {
        let (sender, receiver) = crossbeam_channel::bounded(1);
        if self
            .submit(op, move |result| {
                let _ = sender.send(result);
            })
            .is_err()
        {
            return Err(Fault::ShuttingDown.into());
        }
        receiver
            .recv()
            .unwrap_or_else(|_| Err(Fault::ShuttingDown.into()))
    }

    /// Requests waiting in the queue (not counting the batch being applied).
    pub fn queue_len(&self) -> usize {
        self.shared.sender.read().as_ref().map_or(0, Sender::len)
    }

    /// Stops accepting, applies and commits everything already queued, completes it, and joins
    /// the thread. Idempotent. Called from a completion (the writer thread), it does not join.
    pub fn shutdown(&self) {
        let sender = self.shared.sender.write().take();
        drop(sender);
        let Some(handle) = self.shared.thread.lock().take() else {
            return;
        };
        if handle.thread().id() == std::thread::current().id() {
            return;
        }
        if handle.join().is_err() {
            tracing::error!("storage writer thread panicked");
        }
    }

    pub fn stats(&self) -> WriterStats {
        let stats = &self.shared.stats;
        WriterStats {
            commits: stats.commits.load(Ordering::Relaxed),
            commit_failures: stats.commit_failures.load(Ordering::Relaxed),
            requests: stats.requests.load(Ordering::Relaxed),
            bytes: stats.bytes.load(Ordering::Relaxed),
            last_batch_requests: stats.last_batch_requests.load(Ordering::Relaxed),
            last_batch_bytes: stats.last_batch_bytes.load(Ordering::Relaxed),
            apply_us: stats.apply_us.load(Ordering::Relaxed),
            volume_sync_us: stats.volume_sync_us.load(Ordering::Relaxed),
            commit_us: stats.commit_us.load(Ordering::Relaxed),
        }
    }
}

/// Clears the store's "writer running" flag when the thread ends, even by panic.
struct RunningGuard<'a>(&'a Store);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.inner.writer_running.store(false, Ordering::Release);
    }
}

fn run(
    store: &Store,
    receiver: &Receiver<Request>,
    options: &WriterOptions,
    stats: &StatsCounters,
) {
    let _running = RunningGuard(store);
    let mut batch: Vec<Request> = Vec::with_capacity(options.batch_requests_max.min(4096));
    let mut last_change_seq = store
        .read()
        .and_then(|reader| reader.last_change_seq())
        .unwrap_or(0);
    // recv() returns queued requests even after every sender is gone, then Err: drain, exit.
    while let Ok(first) = receiver.recv() {
        assert!(batch.is_empty());
        let mut batch_bytes = first.job.payload_bytes();
        batch.push(first);
        while batch.len() < options.batch_requests_max && batch_bytes < options.batch_bytes_max {
            let Ok(request) = receiver.try_recv() else {
                break;
            };
            batch_bytes = batch_bytes.saturating_add(request.job.payload_bytes());
            batch.push(request);
        }
        let image_bytes: u64 = batch
            .iter()
            .filter(|r| r.job.lane() == Lane::Image)
            .map(|r| r.job.payload_bytes())
            .sum();
        let small = batch.iter().filter(|r| r.job.lane() == Lane::Small).count();
        if small > 0 && small < batch.len() && image_bytes >= PRIORITY_SPLIT_IMAGE_BYTES {
            // Small writes (annotation saves, API writes, dish registrations, telemetry) do
            // not wait for megabytes of images to be written: they commit first, on their
            // own, and are answered; then the images. Nothing a small write does depends on
            // an image of the same batch.
            let (mut first, mut images): (Vec<Request>, Vec<Request>) =
                batch.drain(..).partition(|r| r.job.lane() == Lane::Small);
            commit_and_complete(store, &mut first, stats, &mut last_change_seq);
            commit_and_complete(store, &mut images, stats, &mut last_change_seq);
        } else {
            commit_and_complete(store, &mut batch, stats, &mut last_change_seq);
        }
    }
    tracing::info!("storage writer stopped");
}

/// When a batch carries at least this many image bytes and also small writes, the small
/// writes are committed first in a transaction of their own.
const PRIORITY_SPLIT_IMAGE_BYTES: u64 = 256 * 1024;

/// Commits `batch` (each request on its own if the batch fails for one of them), completes
/// every request, and tells the commit listeners. Empties `batch`.
fn commit_and_complete(
    store: &Store,
    batch: &mut Vec<Request>,
    stats: &StatsCounters,
    last_change_seq: &mut u64,
) {
    let requests = batch.len() as u64;
    let batch_bytes: u64 = batch.iter().map(|r| r.job.payload_bytes()).sum();
    let result = commit_batch_guarded(store, batch, stats);
    let mut faults: Vec<Option<Fault>> = vec![None; batch.len()];
    if let Err(failure) = result {
        for request in batch.iter_mut() {
            request.job.forget();
        }
        if failure.disk {
            // The disk failed (full, or an I/O error): redb refuses everything until the
            // database is reopened. The batch fails as a whole (nothing of it was
            // acknowledged; clients resend), and the writer carries on.
            if let Err(reopen) = store.reopen(std::time::Duration::from_secs(30)) {
                tracing::error!(%reopen, "cannot reopen the database; writes keep failing");
            }
        }
        if batch.len() > 1 && !failure.disk {
            // One bad request (a corrupt record it touches, say) must not fail the others,
            // and a client that resends it must not fail every batch it lands in: retry
            // each request in a transaction of its own, so only the culprit fails.
            for (request, fault) in batch.iter_mut().zip(faults.iter_mut()) {
                if let Err(failure) =
                    commit_batch_guarded(store, std::slice::from_mut(request), stats)
                {
                    request.job.forget();
                    *fault = Some(failure.fault);
                }
            }
        } else {
            faults.fill(Some(failure.fault));
        }
    }
    let committed = faults.iter().any(Option::is_none);
    record(stats, requests, batch_bytes, committed);
    let wanting = |request: &Request, fault: &Option<Fault>| {
        fault.is_none() && request.job.wants_after_commit()
    };
    if batch.iter().zip(&faults).any(|(r, f)| wanting(r, f)) {
        match store.read() {
            Ok(reader) => {
                for (request, fault) in batch.iter_mut().zip(&faults) {
                    if wanting(request, fault) {
                        request.job.after_commit(&reader);
                    }
                }
            }
            Err(error) => {
                tracing::error!(code = error.code(), %error, "no reader after a commit; answers lack the committed state");
            }
        }
    }
    for (request, fault) in batch.drain(..).zip(faults) {
        request.job.complete(fault);
    }
    notify_commit(store, last_change_seq);
}

/// Tells the commit listeners when the change log grew.
fn notify_commit(store: &Store, last_change_seq: &mut u64) {
    let listeners = store.inner.commit_listeners.lock();
    if listeners.is_empty() {
        return;
    }
    let Ok(seq) = store.read().and_then(|reader| reader.last_change_seq()) else {
        return;
    };
    if seq == *last_change_seq {
        return;
    }
    *last_change_seq = seq;
    for listener in listeners.iter() {
        if catch_unwind(AssertUnwindSafe(|| listener(seq))).is_err() {
            tracing::error!("a commit listener panicked");
        }
    }
}

fn record(stats: &StatsCounters, requests: u64, bytes: u64, committed: bool) {
    let counter = if committed {
        &stats.commits
    } else {
        &stats.commit_failures
    };
    counter.fetch_add(1, Ordering::Relaxed);
    stats.requests.fetch_add(requests, Ordering::Relaxed);
    stats.bytes.fetch_add(bytes, Ordering::Relaxed);
    stats.last_batch_requests.store(requests, Ordering::Relaxed);
    stats.last_batch_bytes.store(bytes, Ordering::Relaxed);
}

/// Why a batch failed as a whole.
struct BatchFailure {
    fault: Fault,
    /// The disk failed (full, or an I/O error): the database must be reopened.
    disk: bool,
}

/// Commits the batch; a panic while applying it aborts the transaction and fails the batch
/// instead of killing the thread (which would leave every later request without an answer).
fn commit_batch_guarded(
    store: &Store,
    batch: &mut [Request],
    stats: &StatsCounters,
) -> Result<(), BatchFailure> {
    let requests = batch.len();
    match catch_unwind(AssertUnwindSafe(|| commit_batch(store, batch, stats))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            tracing::error!(code = error.code(), %error, requests, "group commit failed");
            let disk = matches!(error, StorageError::DiskFull | StorageError::Io(_));
            Err(BatchFailure {
                fault: Fault::from(error),
                disk,
            })
        }
        Err(_) => {
            tracing::error!(requests, "group commit panicked; batch aborted");
            // The panic unwound past commit_batch's own abort.
            if let Some(appender) = store.inner.appender.lock().as_mut() {
                appender.abort();
            }
            Err(BatchFailure {
                fault: Fault::Storage("internal error while applying the batch".into()),
                disk: false,
            })
        }
    }
}

fn commit_batch(
    store: &Store,
    batch: &mut [Request],
    stats: &StatsCounters,
) -> Result<(), StorageError> {
    let mut guard = store.inner.appender.lock();
    let appender = guard
        .as_mut()
        .expect("a writer runs only on a store opened for writing");
    let result = commit_batch_with(store, appender, batch, stats);
    if result.is_err() {
        // Nothing of the batch is committed: its image records are cut off again.
        appender.abort();
    }
    result
}

fn commit_batch_with(
    store: &Store,
    appender: &mut crate::volume::Appender,
    batch: &mut [Request],
    stats: &StatsCounters,
) -> Result<(), StorageError> {
    let started = std::time::Instant::now();
    let mut txn = store.inner.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(store.inner.options.quick_repair);
    let now_ms = batch.iter().filter_map(|r| r.job.at_ms()).max();
    let volume_changes = {
        let mut tables = Batch::open(&txn, appender, &store.inner.volumes)?;
        for request in batch.iter_mut() {
            request.job.apply(&mut tables)?;
        }
        if let Some(now_ms) = now_ms {
            let retention_ms = store.inner.options.change_log_retention_ms;
            let cutoff_ms = now_ms.saturating_sub(retention_ms);
            tables.prune_changes(cutoff_ms, limits::PRUNE_CHANGES_PER_BATCH_MAX)?;
            tables.prune_idempotency(cutoff_ms, limits::PRUNE_IDEMPOTENCY_PER_BATCH_MAX)?;
        }
        let applied = std::time::Instant::now();
        stats
            .apply_us
            .fetch_add(micros(applied - started), Ordering::Relaxed);
        // The image records are written and fdatasync'd here, before the index commit.
        let changes = tables.finish(now_ms.unwrap_or(0))?;
        stats
            .volume_sync_us
            .fetch_add(micros(applied.elapsed()), Ordering::Relaxed);
        changes
    };
    let applied = std::time::Instant::now();
    txn.commit()?;
    appender.committed(&volume_changes);
    stats
        .commit_us
        .fetch_add(micros(applied.elapsed()), Ordering::Relaxed);
    Ok(())
}

fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
