//! Instrument monitoring (IMS): the receiving half queues incubator telemetry and alarms in
//! the database's monitoring queue (same transaction as the telemetry, so an acknowledged
//! TELEMETRY is queued durably); the uploading half, one thread, posts the queue in gzip'd
//! JSON batches to `[IMS] endpoint` and removes records only after a 2xx answer.
//!
//! Either half can be switched off in the configuration or paused at run time
//! (`esserver ims pause|resume`, the web interface); the queue survives restarts. What a
//! queue record may hold, and why no patient data can reach it, is in `es_storage::ims`.
//!
//! The uploader connects only to the configured endpoint and never follows a redirect: a
//! 3xx answer is a failed attempt like any other.

use crate::config::ImsConfig;
use es_storage::ims::{ImsQueueStats, ImsRecord};
use es_storage::{ImsQueueing, ImsRemove, Store, Writer};
use flate2::write::GzEncoder;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Seconds of its budget an incubator may send at once (the token bucket's depth): small, so
/// that no second carries much more than the budget.
const BUDGET_BURST_S: f64 = 0.1;
/// Reads of up to `batch_records_max` records each, at most, to choose one batch: the front
/// of the queue, then on from the floors of up to 16 incubators with budget left.
const SCAN_WINDOWS_MAX: u32 = 24;
/// Contiguous reads from the front of the queue, at most, before reading from floors.
const FRONT_READS_MAX: u32 = 2;
/// Wire bytes per record assumed before the first batch is measured.
const WIRE_BYTES_PER_RECORD_INITIAL: f64 = 200.0;
/// Shortest and longest wait for an instrument's budget to refill.
const BUDGET_WAIT_MIN: Duration = Duration::from_millis(5);
const BUDGET_WAIT_MAX: Duration = Duration::from_secs(1);
/// Uncompressed JSON of one batch at most (after its first record).
const BATCH_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Response head read from the endpoint at most.
const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;
/// Minutes of per-instrument upload figures kept (the status shows the last hour).
const MINUTES_KEPT: usize = 60;
/// The upload document's format name; a receiving end checks it.
pub const FORMAT: &str = "esserver-ims/1";

/// Where the uploader posts: an `http://` or `https://` URL, port 80 or 443 unless it says
/// otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Endpoint {
    /// Parses `http://host[:port][/path]` or `https://...`; anything else is refused with a
    /// reason.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!(
                "expected an http:// or https:// URL, e.g. `http://ims.example.com/upload`; got `{url}`"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err("the endpoint URL may not carry a user name or password".into());
        }
        let default_port = if https { 443 } else { 80 };
        let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
            // [IPv6]:port
            let Some((host, after)) = inner.split_once(']') else {
                return Err(format!("`{authority}` is not a valid host"));
            };
            let port = match after.strip_prefix(':') {
                Some(port) => parse_port(port)?,
                None if after.is_empty() => default_port,
                None => return Err(format!("`{authority}` is not a valid host")),
            };
            (host.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_owned(), parse_port(port)?),
                None => (authority.to_owned(), default_port),
            }
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
        if !host_ok {
            return Err(format!("`{host}` is not a valid host name or address"));
        }
        let path_ok = path.len() <= 2048 && path.bytes().all(|b| b.is_ascii_graphic());
        if !path_ok {
            return Err("the endpoint path must be printable ASCII without spaces".into());
        }
        Ok(Endpoint {
            https,
            host,
            port,
            path: path.to_owned(),
        })
    }

    /// The URL again, for logs and status.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!("{scheme}://{host}:{}{}", self.port, self.path)
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("`{text}` is not a port number (1-65535)")),
    }
}

/// Which half a run-time switch addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Receive,
    Upload,
    All,
}

impl Part {
    pub fn parse(text: &str) -> Option<Part> {
        match text {
            "receive" => Some(Part::Receive),
            "upload" => Some(Part::Upload),
            "all" => Some(Part::All),
            _ => None,
        }
    }
}

/// What the uploader has done, for the status.
#[derive(Debug, Default)]
struct UploadState {
    last_success_ms: i64,
    last_error: Option<(i64, String)>,
    /// The current back-off after failures (zero after a success).
    backoff: Duration,
    /// serial -> (minute, bytes sent) for the last hour.
    per_instrument: BTreeMap<String, VecDeque<(i64, u64)>>,
}

/// The state both halves share with the status, the control socket and the web interface.
pub struct ImsShared {
    receive: AtomicBool,
    upload: AtomicBool,
    endpoint: Option<Endpoint>,
    queue_bytes_max: u64,
    /// `[IMS] incubator_budget_bits_per_s`.
    budget_bits_per_s: u64,
    state: Mutex<UploadState>,
    records_sent: AtomicU64,
    bytes_sent: AtomicU64,
    batches_sent: AtomicU64,
    failures: AtomicU64,
    wake: crossbeam_channel::Sender<()>,
    stop: AtomicBool,
}

impl std::fmt::Debug for ImsShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImsShared")
            .field("receive", &self.receive)
            .field("upload", &self.upload)
            .finish_non_exhaustive()
    }
}

/// One instrument's upload figures over the last hour.
#[derive(Debug, Clone, Serialize)]
pub struct InstrumentUpload {
    pub serial: String,
    pub bytes_last_hour: u64,
    /// Mean over the last hour.
    pub bits_per_s: f64,
    pub budget_bits_per_s: u64,
    /// `bits_per_s / budget_bits_per_s`.
    pub budget_used: f64,
}

/// Everything `esserver ims status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ImsStatus {
    pub receive: bool,
    pub upload: bool,
    pub endpoint: Option<String>,
    pub queue: ImsQueueStats,
    pub queue_bytes_max: u64,
    /// Seconds since the oldest queued record was received (0 when empty).
    pub oldest_age_s: f64,
    pub last_success_ms: i64,
    pub last_error_ms: i64,
    pub last_error: Option<String>,
    pub backoff_ms: u64,
    pub batches_sent: u64,
    pub records_sent: u64,
    pub bytes_sent: u64,
    pub failures: u64,
    pub per_instrument: Vec<InstrumentUpload>,
}

impl ImsShared {
    /// The state of `config`, and the receiving end of the uploader's wake-up signal (a
    /// state nobody uploads from, for the simulation, drops it).
    pub fn new(config: &ImsConfig) -> (ImsShared, crossbeam_channel::Receiver<()>) {
        let (wake, woken) = crossbeam_channel::bounded(1);
        let shared = ImsShared {
            receive: AtomicBool::new(config.receive),
            upload: AtomicBool::new(config.upload),
            endpoint: config.endpoint.clone(),
            queue_bytes_max: config.queue_bytes_max,
            budget_bits_per_s: config.incubator_budget_bits_per_s,
            state: Mutex::new(UploadState::default()),
            records_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            batches_sent: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            wake,
            stop: AtomicBool::new(false),
        };
        (shared, woken)
    }

    /// How the incubator service queues the telemetry of an instrument of `model` now:
    /// `None` while receiving is off. Only the device catalog's channels and the model's
    /// alarm codes are queued (a model the catalog does not know: the codes every model has).
    pub fn queueing(&self, model: &str) -> Option<ImsQueueing> {
        let alarm_codes = match model.parse::<es_perf::catalog::DeviceModel>() {
            Ok(model) => model.spec().alarm_codes,
            Err(_) => es_perf::catalog::alarm_codes_of_unknown_model(),
        };
        self.receive.load(Ordering::Relaxed).then_some(ImsQueueing {
            queue_bytes_max: self.queue_bytes_max,
            channels: es_perf::catalog::MONITORING_CHANNELS,
            alarm_codes,
        })
    }

    pub fn receiving(&self) -> bool {
        self.receive.load(Ordering::Relaxed)
    }

    pub fn uploading(&self) -> bool {
        self.upload.load(Ordering::Relaxed)
    }

    /// Run-time switch (until the next start; the configuration file sets the default).
    pub fn set(&self, part: Part, on: bool, by: &str) {
        if matches!(part, Part::Receive | Part::All) {
            self.receive.store(on, Ordering::Relaxed);
        }
        if matches!(part, Part::Upload | Part::All) {
            self.upload.store(on, Ordering::Relaxed);
        }
        tracing::info!(part = ?part, on, by, receive = self.receiving(), upload = self.uploading(),
            "monitoring (IMS) switched at run time; [IMS] in the configuration file sets it at the next start");
        let _ = self.wake.try_send(());
    }

    pub fn status(
        &self,
        store: &Store,
        now_ms: i64,
    ) -> Result<ImsStatus, es_storage::StorageError> {
        let queue = store.read()?.ims_stats()?;
        let oldest_age_s = if queue.records == 0 {
            0.0
        } else {
            (now_ms - queue.oldest_received_at_ms).max(0) as f64 / 1000.0
        };
        let state = self.state.lock();
        let minute_now = now_ms / 60_000;
        let per_instrument = state
            .per_instrument
            .iter()
            .map(|(serial, minutes)| {
                let bytes: u64 = minutes
                    .iter()
                    .filter(|(minute, _)| minute_now - minute < MINUTES_KEPT as i64)
                    .map(|(_, bytes)| bytes)
                    .sum();
                let bits_per_s = bytes as f64 * 8.0 / 3600.0;
                InstrumentUpload {
                    serial: serial.clone(),
                    bytes_last_hour: bytes,
                    bits_per_s,
                    budget_bits_per_s: self.budget_bits_per_s,
                    budget_used: bits_per_s / self.budget_bits_per_s as f64,
                }
            })
            .collect();
        Ok(ImsStatus {
            receive: self.receiving(),
            upload: self.uploading(),
            endpoint: self.endpoint.as_ref().map(Endpoint::url),
            queue,
            queue_bytes_max: self.queue_bytes_max,
            oldest_age_s,
            last_success_ms: state.last_success_ms,
            last_error_ms: state.last_error.as_ref().map_or(0, |(at, _)| *at),
            last_error: state.last_error.as_ref().map(|(_, m)| m.clone()),
            backoff_ms: state.backoff.as_millis() as u64,
            batches_sent: self.batches_sent.load(Ordering::Relaxed),
            records_sent: self.records_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            per_instrument,
        })
    }

    fn note_sent(&self, batch: &[ImsRecord], wire_bytes: u64, now_ms: i64) {
        self.batches_sent.fetch_add(1, Ordering::Relaxed);
        self.records_sent
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.bytes_sent.fetch_add(wire_bytes, Ordering::Relaxed);
        // The request's bytes are shared among instruments by their number of records.
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for record in batch {
            *counts.entry(record.serial.as_str()).or_default() += 1;
        }
        let minute = now_ms / 60_000;
        let mut state = self.state.lock();
        state.last_success_ms = now_ms;
        state.backoff = Duration::ZERO;
        for (serial, count) in counts {
            let share = wire_bytes * count / batch.len().max(1) as u64;
            let minutes = state.per_instrument.entry(serial.to_owned()).or_default();
            match minutes.back_mut() {
                Some((last, bytes)) if *last == minute => *bytes += share,
                _ => minutes.push_back((minute, share)),
            }
            while minutes
                .front()
                .is_some_and(|(m, _)| minute - m >= MINUTES_KEPT as i64)
            {
                minutes.pop_front();
            }
        }
    }

    fn note_failure(&self, message: String, backoff: Duration, now_ms: i64) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        state.last_error = Some((now_ms, message));
        state.backoff = backoff;
    }
}

/// The running uploader thread and the shared state.
pub struct Ims {
    shared: Arc<ImsShared>,
    thread: Option<JoinHandle<()>>,
}

impl Ims {
    /// Starts the uploader thread (it idles while upload is off or no endpoint is set).
    pub fn start(config: &ImsConfig, store: Store, writer: Writer) -> Result<Ims, std::io::Error> {
        let (shared, woken) = ImsShared::new(config);
        let shared = Arc::new(shared);
        let endpoint = config.endpoint.clone();
        match (&endpoint, config.upload) {
            (Some(endpoint), true) => {
                tracing::info!(endpoint = %endpoint.url(), receive = config.receive, "monitoring (IMS) upload is on");
            }
            (None, _) => tracing::info!(
                receive = config.receive,
                "monitoring (IMS) upload is off: no [IMS] endpoint is configured"
            ),
            (Some(endpoint), false) => {
                tracing::info!(endpoint = %endpoint.url(), "monitoring (IMS) upload is off ([IMS] upload = off)");
            }
        }
        let tls = match &endpoint {
            Some(endpoint) if endpoint.https => Some(client_tls(config.ca_file.as_ref())?),
            _ => None,
        };
        let uploader = Uploader {
            shared: shared.clone(),
            store,
            writer,
            woken,
            tls,
            batch_records_max: config.batch_records_max,
            budget: UploadBudget::new(config.incubator_budget_bits_per_s),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            retry_initial: Duration::from_millis(config.retry_initial_ms),
            retry_max: Duration::from_millis(config.retry_max_ms),
            upload_interval: Duration::from_millis(config.upload_interval_ms),
        };
        let thread = std::thread::Builder::new()
            .name("es-ims-upload".into())
            .spawn(move || uploader.run())?;
        Ok(Ims {
            shared,
            thread: Some(thread),
        })
    }

    pub fn shared(&self) -> Arc<ImsShared> {
        self.shared.clone()
    }

    /// Stops the uploader; an upload in progress ends within its request timeout. What was
    /// not acknowledged stays queued for the next start.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.shared.wake.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the uploader does next.
#[derive(Debug)]
enum Choice {
    Batch(Vec<ImsRecord>),
    /// Records are queued, but every instrument they belong to has spent its budget: wait
    /// this long.
    Spent(Duration),
    /// The queue is empty.
    Empty,
}

/// A batch being chosen: its records, and the instruments whose budget ran out (none of
/// their later records may join, so each instrument's records leave in order).
#[derive(Debug, Default)]
struct Selection {
    batch: Vec<ImsRecord>,
    spent: HashSet<String>,
}

/// Per-incubator token buckets over the upload's bytes on the wire (request head and gzip'd
/// body), so that no incubator's records take more than `[IMS] incubator_budget_bits_per_s`,
/// a backlog after an outage included. Sans-I/O: it takes the time, a way to read the queue
/// and the bytes each batch cost.
///
/// A record joins a batch while its instrument's bucket holds the estimated wire bytes of one
/// record (a running mean of what batches really cost); after the endpoint accepted the batch
/// each instrument is charged its share of the real bytes, by its number of records (the same
/// share the status reports). A bucket holds at most [`BUDGET_BURST_S`] of budget and may go
/// below zero by one batch's estimation error, which the next waits out.
///
/// The queue is one sequence by id across all instruments. An instrument that sends far more
/// than the others would put its backlog in front of their records; so each bucket also
/// remembers the instrument's *floor*, an id at or below which none of its records is queued
/// (the highest id of it sent), and the chooser reads on from there. A record is taken only
/// from a run of contiguous ids starting at or below its instrument's floor, which is what
/// keeps every instrument's records in order.
#[derive(Debug)]
struct UploadBudget {
    bytes_per_s: f64,
    depth_bytes: f64,
    wire_bytes_per_record: f64,
    buckets: HashMap<String, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// No record of this instrument with an id at or below this is queued.
    floor_id: u64,
}

/// Buckets not touched for this long are forgotten: they would be full again, and a floor
/// of 0 is always true.
const BUCKET_IDLE_S: f64 = 60.0;

impl UploadBudget {
    fn new(bits_per_s: u64) -> UploadBudget {
        assert!(
            bits_per_s > 0,
            "the configuration bounds the budget from below"
        );
        let bytes_per_s = bits_per_s as f64 / 8.0;
        UploadBudget {
            bytes_per_s,
            depth_bytes: bytes_per_s * BUDGET_BURST_S,
            wire_bytes_per_record: WIRE_BYTES_PER_RECORD_INITIAL,
            buckets: HashMap::new(),
        }
    }

    /// The tokens a record needs to join a batch: its estimated wire bytes, or a full bucket
    /// when one record costs more (a very small budget: the bucket then goes below zero and
    /// the instrument waits its debt out).
    fn record_cost(&self) -> f64 {
        self.wire_bytes_per_record.min(self.depth_bytes)
    }

    /// The bucket of `serial`, refilled up to `now`.
    fn bucket(&mut self, serial: &str, now: Instant) -> &mut Bucket {
        let (rate, depth) = (self.bytes_per_s, self.depth_bytes);
        let bucket = self.buckets.entry(serial.to_owned()).or_insert(Bucket {
            tokens: depth,
            at: now,
            floor_id: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(depth);
        bucket.at = bucket.at.max(now);
        bucket
    }

    /// Chooses the next batch of at most `records_max` records. `read(after_id, limit)` gives
    /// the queued records with ids above `after_id`, oldest first, at most `limit`.
    ///
    /// Reads the front of the queue ([`FRONT_READS_MAX`] contiguous reads), then one read
    /// from the floor of each instrument that still has budget and whose floor lies beyond
    /// what was read, lowest first; at most [`SCAN_WINDOWS_MAX`] reads in all.
    fn choose<E>(
        &mut self,
        mut read: impl FnMut(u64, u32) -> Result<Vec<ImsRecord>, E>,
        records_max: u32,
        now: Instant,
    ) -> Result<Choice, E> {
        let mut selection = Selection::default();
        let limit = records_max as usize;
        let mut reads = 0;
        let mut seen_any = false;
        // The front: a run from id 0, which is below every floor.
        let mut covered = 0u64;
        let mut queue_end = false;
        while reads < FRONT_READS_MAX && selection.batch.len() < limit {
            let window = read(covered, records_max)?;
            reads += 1;
            let Some(last) = window.last() else {
                queue_end = true;
                break;
            };
            seen_any = true;
            queue_end = window.len() < limit;
            let end = last.id;
            self.take(window, 0, end, &mut selection, limit, now);
            covered = end;
            if queue_end {
                break;
            }
        }
        // Hops: from the floors of instruments with budget left that lie beyond.
        while !queue_end && reads < SCAN_WINDOWS_MAX && selection.batch.len() < limit {
            let next = self
                .buckets
                .iter()
                .filter(|(serial, bucket)| {
                    bucket.floor_id >= covered && !selection.spent.contains(*serial)
                })
                .map(|(_, bucket)| bucket.floor_id)
                .min();
            let Some(run_start) = next else { break };
            let window = read(run_start, records_max)?;
            reads += 1;
            let Some(last) = window.last() else { break };
            seen_any = true;
            let end = last.id;
            self.take(window, run_start, end, &mut selection, limit, now);
            // The next hop starts beyond this read (each instrument gets at most one).
            covered = end.max(covered) + 1;
        }
        Ok(if !selection.batch.is_empty() {
            Choice::Batch(selection.batch)
        } else if seen_any && !selection.spent.is_empty() {
            Choice::Spent(self.refill_wait(&selection.spent, now))
        } else if seen_any {
            // Records are queued but none could be taken in order this time (instruments
            // behind a read's run): the next choice starts from the front again.
            Choice::Spent(BUDGET_WAIT_MIN)
        } else {
            Choice::Empty
        })
    }

    /// Moves from `window` (oldest first, the contiguous ids above `run_start` up to `end`)
    /// into the selection every record whose instrument can afford it, up to `records_max`.
    /// An instrument that cannot is spent for the rest of this selection; one whose floor
    /// lies below the run may have records before it and takes nothing from it. Instruments
    /// the run was valid for that have nothing in it and nothing selected have no records up
    /// to `end`: their floor moves there.
    fn take(
        &mut self,
        window: Vec<ImsRecord>,
        run_start: u64,
        end: u64,
        selection: &mut Selection,
        records_max: usize,
        now: Instant,
    ) {
        let cost = self.record_cost();
        let mut present: HashSet<String> = HashSet::new();
        for record in window {
            if !present.contains(&record.serial) {
                present.insert(record.serial.clone());
            }
            if selection.batch.len() >= records_max || selection.spent.contains(&record.serial) {
                continue;
            }
            let bucket = self.bucket(&record.serial, now);
            if bucket.floor_id < run_start {
                continue;
            }
            if bucket.tokens >= cost {
                bucket.tokens -= cost;
                selection.batch.push(record);
            } else {
                selection.spent.insert(record.serial);
            }
        }
        for (serial, bucket) in self.buckets.iter_mut() {
            if bucket.floor_id >= run_start
                && bucket.floor_id < end
                && !present.contains(serial)
                && !selection.batch.iter().any(|r| &r.serial == serial)
            {
                bucket.floor_id = end;
            }
        }
    }

    /// After the endpoint accepted `batch` (`wire_bytes` on the wire) and it left the queue:
    /// each instrument pays its share of the real bytes instead of the estimate, its floor
    /// moves up to its last record sent, and the estimate learns.
    fn charge(&mut self, batch: &[ImsRecord], wire_bytes: u64) {
        if batch.is_empty() {
            return;
        }
        // What `take` deducted per record.
        let deducted = self.record_cost();
        let real = wire_bytes as f64 / batch.len() as f64;
        for record in batch {
            if let Some(bucket) = self.buckets.get_mut(&record.serial) {
                bucket.tokens -= real - deducted;
                bucket.floor_id = bucket.floor_id.max(record.id);
            }
        }
        // A running mean, weighted towards recent batches.
        self.wire_bytes_per_record = 0.7 * self.wire_bytes_per_record + 0.3 * real;
        if let Some(newest) = self.buckets.values().map(|b| b.at).max() {
            self.buckets.retain(|_, b| {
                newest.saturating_duration_since(b.at).as_secs_f64() < BUCKET_IDLE_S
            });
        }
    }

    /// How long until the first of the `spent` instruments has a full bucket again. Waiting
    /// for a full bucket rather than for one record's worth keeps batches large, so that the
    /// request head is a small part of what the budget pays for.
    fn refill_wait(&mut self, spent: &HashSet<String>, now: Instant) -> Duration {
        let depth = self.depth_bytes;
        let rate = self.bytes_per_s;
        let wait_s = spent
            .iter()
            .map(|serial| (depth - self.bucket(serial, now).tokens).max(0.0) / rate)
            .fold(f64::INFINITY, f64::min);
        if wait_s.is_finite() {
            Duration::from_secs_f64(wait_s).clamp(BUDGET_WAIT_MIN, BUDGET_WAIT_MAX)
        } else {
            BUDGET_WAIT_MIN
        }
    }
}

struct Uploader {
    shared: Arc<ImsShared>,
    store: Store,
    writer: Writer,
    woken: crossbeam_channel::Receiver<()>,
    tls: Option<Arc<rustls::ClientConfig>>,
    batch_records_max: u32,
    budget: UploadBudget,
    request_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    upload_interval: Duration,
}

impl Uploader {
    fn run(mut self) {
        let mut backoff = Duration::ZERO;
        while !self.stopping() {
            let Some(endpoint) = self.shared.endpoint.clone() else {
                self.wait(self.upload_interval);
                continue;
            };
            if !self.shared.uploading() {
                self.wait(self.upload_interval);
                continue;
            }
            let batch = match self.next_batch(Instant::now()) {
                Ok(Choice::Batch(batch)) => batch,
                Ok(Choice::Empty) => {
                    self.wait(self.upload_interval);
                    continue;
                }
                Ok(Choice::Spent(refill)) => {
                    self.wait(refill);
                    continue;
                }
                Err(error) => {
                    tracing::error!(%error, "monitoring (IMS): cannot read the queue");
                    self.wait(self.upload_interval);
                    continue;
                }
            };
            let endpoint = &endpoint;
            let result = self.send(endpoint, &batch);
            let now = crate::now_ms();
            match result {
                Ok(wire_bytes) => {
                    let ids: Vec<u64> = batch.iter().map(|r| r.id).collect();
                    if let Err(error) = self.remove(ids) {
                        // The endpoint has them; they may be sent again (it drops duplicates
                        // by id).
                        tracing::error!(%error, "monitoring (IMS): sent but cannot remove from the queue");
                        self.wait(self.upload_interval);
                        continue;
                    }
                    self.shared.note_sent(&batch, wire_bytes, now);
                    self.budget.charge(&batch, wire_bytes);
                    if !backoff.is_zero() {
                        tracing::info!(endpoint = %endpoint.url(), "monitoring (IMS) upload works again");
                    }
                    backoff = Duration::ZERO;
                    tracing::debug!(
                        records = batch.len(),
                        wire_bytes,
                        "monitoring (IMS) batch accepted"
                    );
                }
                Err(message) => {
                    backoff = next_backoff(backoff, self.retry_initial, self.retry_max);
                    let delay = with_jitter(backoff);
                    tracing::warn!(endpoint = %endpoint.url(), error = %message, retry_in_ms = delay.as_millis() as u64,
                        queued = batch.len(), "monitoring (IMS) upload failed; the records stay queued");
                    self.shared.note_failure(message, delay, now);
                    self.wait(delay);
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// The next batch within every instrument's budget ([`UploadBudget::choose`]).
    fn next_batch(&mut self, now: Instant) -> Result<Choice, es_storage::StorageError> {
        let reader = self.store.read()?;
        self.budget.choose(
            |after_id, limit| reader.ims_batch_after(after_id, limit, BATCH_BYTES_MAX),
            self.batch_records_max,
            now,
        )
    }

    /// Sleeps up to `delay`; a switch or stop wakes it early.
    fn wait(&self, delay: Duration) {
        let _ = self.woken.recv_timeout(delay);
    }

    /// Posts one batch; returns the bytes put on the wire (head and body).
    fn send(&self, endpoint: &Endpoint, batch: &[ImsRecord]) -> Result<u64, String> {
        let body = encode_batch(&self.store.server_id(), batch, crate::now_ms())?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: esserver/{}\r\nContent-Type: application/json\r\n\
             Content-Encoding: gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            endpoint.path,
            host_header(endpoint),
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        let status = post(
            endpoint,
            self.tls.as_ref(),
            head.as_bytes(),
            &body,
            self.request_timeout,
        )?;
        match status {
            200..=299 => Ok((head.len() + body.len()) as u64),
            300..=399 => Err(format!(
                "the endpoint answered {status} (a redirect); the uploader never follows redirects: configure the final URL"
            )),
            _ => Err(format!("the endpoint answered {status}")),
        }
    }

    fn remove(&self, ids: Vec<u64>) -> Result<(), String> {
        let (done, result) = crossbeam_channel::bounded(1);
        self.writer
            .submit(ImsRemove { ids }, move |outcome| {
                let _ = done.send(outcome);
            })
            .map_err(|error| format!("the storage writer refused the request: {error}"))?;
        match result.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(_removed)) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err("the storage writer did not answer within 60 s".into()),
        }
    }
}

fn host_header(endpoint: &Endpoint) -> String {
    let default = if endpoint.https { 443 } else { 80 };
    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.clone()
    };
    if endpoint.port == default {
        host
    } else {
        format!("{host}:{}", endpoint.port)
    }
}

/// The upload document, gzip'd. Each record's `id` is `<server id>-<queue id>`: unique, so the
/// receiving end can drop a batch it already has (sent again after a lost answer).
pub fn encode_batch(
    server_id: &str,
    batch: &[ImsRecord],
    sent_at_ms: i64,
) -> Result<Vec<u8>, String> {
    #[derive(Serialize)]
    struct Record<'a> {
        id: String,
        #[serde(flatten)]
        record: &'a ImsRecord,
    }
    #[derive(Serialize)]
    struct Document<'a> {
        format: &'static str,
        server_id: &'a str,
        sent_at_ms: i64,
        records: Vec<Record<'a>>,
    }
    let document = Document {
        format: FORMAT,
        server_id,
        sent_at_ms,
        records: batch
            .iter()
            .map(|record| Record {
                id: format!("{server_id}-{}", record.id),
                record,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&document).map_err(|e| format!("cannot encode a batch: {e}"))?;
    let mut gzip = GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&json)
        .and_then(|()| gzip.finish())
        .map_err(|e| format!("cannot compress a batch: {e}"))
}

fn next_backoff(current: Duration, initial: Duration, max: Duration) -> Duration {
    if current.is_zero() {
        initial.min(max)
    } else {
        current.saturating_mul(2).min(max)
    }
}

/// Full jitter on the upper half: a delay in [d/2, d], so clinics restarted together do not
/// retry together.
fn with_jitter(delay: Duration) -> Duration {
    let mut bytes = [0u8; 4];
    let fraction = if getrandom::fill(&mut bytes).is_ok() {
        f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
    } else {
        0.5
    };
    delay.mul_f64(0.5 + 0.5 * fraction)
}

/// One POST with `Connection: close`: connect (to the configured host only), send, read the
/// status line. Every step is bounded by `timeout`.
fn post(
    endpoint: &Endpoint,
    tls: Option<&Arc<rustls::ClientConfig>>,
    head: &[u8],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, String> {
    let started = Instant::now();
    let addresses: Vec<_> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", endpoint.host))?
        .collect();
    let mut last_error = format!("{} has no address", endpoint.host);
    let mut socket = None;
    for address in addresses {
        match TcpStream::connect_timeout(&address, timeout) {
            Ok(stream) => {
                socket = Some(stream);
                break;
            }
            Err(e) => last_error = format!("cannot connect to {address}: {e}"),
        }
    }
    let socket = socket.ok_or(last_error)?;
    let remaining = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(10));
    socket
        .set_read_timeout(Some(remaining))
        .and_then(|()| socket.set_write_timeout(Some(remaining)))
        .map_err(|e| format!("socket: {e}"))?;
    let _ = socket.set_nodelay(true);
    match tls {
        None => exchange(socket, head, body, started, timeout),
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| format!("`{}` is not a TLS server name: {e}", endpoint.host))?;
            let connection = rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| format!("TLS: {e}"))?;
            exchange(
                rustls::StreamOwned::new(connection, socket),
                head,
                body,
                started,
                timeout,
            )
        }
    }
}

fn exchange(
    mut stream: impl Read + Write,
    head: &[u8],
    body: &[u8],
    started: Instant,
    timeout: Duration,
) -> Result<u16, String> {
    stream
        .write_all(head)
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush())
        .map_err(|e| format!("sending: {e}"))?;
    let mut response = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if started.elapsed() > timeout {
            return Err(format!("no answer within {} ms", timeout.as_millis()));
        }
        if let Some(status) = status_code(&response)? {
            return Ok(status);
        }
        if response.len() >= RESPONSE_HEAD_BYTES_MAX {
            return Err("the answer's status line is too long".into());
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("the endpoint closed the connection without an answer".into()),
            Ok(n) => response.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
}

/// The status code once the status line is complete.
fn status_code(response: &[u8]) -> Result<Option<u16>, String> {
    let Some(end) = response.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&response[..end]);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!(
            "the endpoint did not answer HTTP: `{}`",
            line.chars().take(80).collect::<String>()
        ));
    }
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..=599).contains(c))
        .map(Some)
        .ok_or_else(|| format!("the endpoint answered a bad status line: `{line}`"))
}

/// TLS to the endpoint: the CA file when configured, else the system's CA bundle.
fn client_tls(ca_file: Option<&PathBuf>) -> Result<Arc<rustls::ClientConfig>, std::io::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    const SYSTEM_BUNDLES: [&str; 2] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    let path = match ca_file {
        Some(path) => path.clone(),
        None => SYSTEM_BUNDLES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                std::io::Error::other("no CA bundle for the https endpoint: set [IMS] ca_file")
            })?,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(&path)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
    for certificate in certificates {
        let certificate =
            certificate.map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
        let _ = roots.add(certificate);
    }
    if roots.is_empty() {
        return Err(std::io::Error::other(format!(
            "{} holds no usable CA certificate",
            path.display()
        )));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .map_err(|e| std::io::Error::other(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_default_ports() {
        let e = Endpoint::parse("http://ims.example.com/upload").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port, e.path.as_str()),
            (false, "ims.example.com", 80, "/upload")
        );
        let e = Endpoint::parse("https://10.0.0.5:8443").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port, e.path.as_str()),
            (true, "10.0.0.5", 8443, "/")
        );
        let e = Endpoint::parse("http://[::1]:9000/x?y=1").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.path.as_str()),
            ("::1", 9000, "/x?y=1")
        );
        assert_eq!(e.url(), "http://[::1]:9000/x?y=1");
        for bad in [
            "ftp://x/",
            "ims.example.com",
            "http://user:pw@host/",
            "http://host:0/",
            "http://host:99999/",
            "http:///path",
            "http://ho st/",
            "http://host/a b",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_maximum_with_jitter_in_the_upper_half() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_millis(1000));
        let mut d = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..6 {
            d = next_backoff(d, initial, max);
            seen.push(d.as_millis());
        }
        assert_eq!(seen, vec![100, 200, 400, 800, 1000, 1000]);
        for _ in 0..100 {
            let j = with_jitter(Duration::from_millis(1000));
            assert!(
                j >= Duration::from_millis(500) && j <= Duration::from_millis(1000),
                "{j:?}"
            );
        }
    }

    fn record(id: u64, serial: &str) -> ImsRecord {
        ImsRecord {
            id,
            serial: serial.into(),
            model: "es-8".into(),
            received_at_ms: 0,
            body: es_storage::ims::ImsRecordBody::Sample {
                channel: "temperature_c".into(),
                value: 37.0,
                at_ms: id as i64,
            },
        }
    }

    /// The real budget against a simulated clock and endpoint: a backlog of two instruments
    /// (one three times the other's) drains at each one's budget, never much above it in any
    /// second, every record once and each instrument's in order.
    #[test]
    fn a_backlog_drains_at_each_instruments_budget_and_in_order() {
        let bits_per_s = 500_000u64;
        let bytes_per_s = bits_per_s as f64 / 8.0;
        let mut budget = UploadBudget::new(bits_per_s);
        let mut queue: Vec<ImsRecord> = (1..=40_000u64)
            .map(|id| record(id, if id % 4 == 0 { "B" } else { "A" }))
            .collect();
        let start = Instant::now();
        let mut now = start;
        // serial -> (second -> bytes), and the ids in the order they left.
        let mut per_second: HashMap<String, BTreeMap<u64, f64>> = HashMap::new();
        let mut sent: HashMap<String, Vec<u64>> = HashMap::new();
        let mut rounds = 0;
        while !queue.is_empty() {
            rounds += 1;
            assert!(rounds < 1_000_000, "the simulation does not end");
            let choice = budget
                .choose(
                    |after, limit| -> Result<Vec<ImsRecord>, ()> {
                        let from = queue.partition_point(|r| r.id <= after);
                        Ok(queue[from..].iter().take(limit as usize).cloned().collect())
                    },
                    1000,
                    now,
                )
                .unwrap();
            let batch = match choice {
                Choice::Batch(batch) => batch,
                Choice::Spent(wait) => {
                    now += wait;
                    continue;
                }
                Choice::Empty => unreachable!("records are queued"),
            };
            let selection = Selection {
                batch,
                spent: HashSet::new(),
            };
            // The endpoint: a 230-byte head, 25 to 35 bytes a record gzip'd, 3 ms a request.
            let n = selection.batch.len() as u64;
            let wire = 230 + n * 25 + (rounds % 11) * n;
            let share = wire as f64 / n as f64;
            let second = now.duration_since(start).as_secs();
            for r in &selection.batch {
                *per_second
                    .entry(r.serial.clone())
                    .or_default()
                    .entry(second)
                    .or_default() += share;
                sent.entry(r.serial.clone()).or_default().push(r.id);
            }
            budget.charge(&selection.batch, wire);
            let ids: HashSet<u64> = selection.batch.iter().map(|r| r.id).collect();
            queue.retain(|r| !ids.contains(&r.id));
            now += Duration::from_millis(3);
        }
        for (serial, ids) in &sent {
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{serial} out of order");
        }
        assert_eq!(sent["A"].len() + sent["B"].len(), 40_000);
        for (serial, seconds) in &per_second {
            let full: Vec<f64> = seconds.values().copied().collect();
            // Every whole second but the last: at most 20 % above the budget (the bucket's
            // depth and one batch's estimation error), and on average close to it.
            let whole = &full[..full.len() - 1];
            assert!(whole.len() >= 2, "{serial}: {full:?}");
            for (second, bytes) in whole.iter().enumerate() {
                assert!(
                    *bytes <= 1.2 * bytes_per_s,
                    "{serial} second {second}: {bytes} B"
                );
            }
            let mean = whole.iter().sum::<f64>() / whole.len() as f64;
            assert!(
                mean >= 0.9 * bytes_per_s,
                "{serial}: mean {mean} B/s {full:?}"
            );
        }
    }

    #[test]
    fn a_tiny_budget_still_sends_one_record_at_a_time() {
        // 8 kbit/s: one record (about 200 bytes) costs more than the bucket holds.
        let mut budget = UploadBudget::new(8_000);
        let now = Instant::now();
        let mut selection = Selection::default();
        budget.take(
            vec![record(1, "A"), record(2, "A")],
            0,
            2,
            &mut selection,
            10,
            now,
        );
        assert_eq!(selection.batch.len(), 1);
        budget.charge(&selection.batch, 400);
        let wait = budget.refill_wait(&selection.spent, now);
        // 400 bytes at 1000 B/s: about 0.4 s of debt and refill.
        assert!(wait >= Duration::from_millis(300), "{wait:?}");
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n"), Ok(Some(204)));
        assert_eq!(
            status_code(b"HTTP/1.0 302 Found\r\nLocation: x"),
            Ok(Some(302))
        );
        assert_eq!(status_code(b"HTTP/1.1 200"), Ok(None));
        assert!(status_code(b"SSH-2.0-x\r\n").is_err());
        assert!(status_code(b"HTTP/1.1 abc\r\n").is_err());
    }
}
