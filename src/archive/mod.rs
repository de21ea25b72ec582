//! The archive tier: sealed volumes older than `[Archive] after_days` move to S3-compatible
//! object storage (AWS S3, MinIO, Ceph RGW).
//!
//! # The archiver (one thread, `es-archiver`)
//!
//! Every `check_interval_ms`, or when `esserver archive` asks, one pass:
//! 1. Local files of volumes already recorded as archived are removed (a crash may have left
//!    one between the record and the removal).
//! 2. Each sealed, whole volume older than `after_days` (oldest first): uploaded with one PUT
//!    (the object appears whole or not at all), read back whole, its size and SHA-256 compared
//!    with what was sent from the local file; only then recorded (`es_storage::archive::
//!    VolumeArchived`, through the writer) and only after that commit is the local file
//!    removed. The first failure ends the pass (the reason is in `status`); the next pass
//!    starts again from the first volume not recorded, so uploads resume where they stopped,
//!    a volume at a time. An upload cut off leaves at most an object no row names, which the
//!    next upload of that volume replaces.
//!
//! # Reads
//!
//! [`Fetcher`] is the store's `ArchiveFetch`: a record of an archived volume whose local file
//! is gone is read with an HTTP range request (on a worker), kept in the bounded local cache
//! ([`cache`]), and checked by storage like any record. An unreachable object store is a clear
//! `archive_unavailable` error for those images only.
//!
//! Credentials come from `[Archive]` or the `AWS_*` environment variables and are never logged
//! or shown (`status` names the endpoint's host and the bucket).

pub mod backups;
pub mod cache;
pub mod s3;

use crate::config::ArchiveSection;
use crate::control::{ProgressSink, Response};
use es_storage::archive::{ArchiveFetch, VolumeArchived, VolumeState};
use es_storage::{Store, Writer};
use parking_lot::{Condvar, Mutex};
use s3::{ObjectError, ObjectStore};
use serde::Serialize;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

const DAY_MS: i64 = 86_400_000;
/// After a range request finds the object store unreachable, reads of archived records fail
/// at once for this long (with that reason) instead of each holding a worker for the
/// request timeout.
const UNREACHABLE_HOLD_MS: i64 = 5_000;
/// The largest object one PUT stores (the S3 limit); larger volumes are not archived.
pub const OBJECT_BYTES_MAX: u64 = 5 * 1024 * 1024 * 1024;
/// Longest wait for the writer to record an archived volume.
const RECORD_WAIT: Duration = Duration::from_secs(60);

/// `s3://bucket/prefix`: where archived volumes (and, later, backups) go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Target {
    pub fn parse(text: &str) -> Result<S3Target, String> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(format!(
                "expected s3://bucket/prefix (an S3 bucket and an optional key prefix), got {text:?}"
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !bucket.starts_with(['.', '-'])
            && !bucket.ends_with(['.', '-']);
        if !valid_bucket {
            return Err(format!(
                "{bucket:?} is not an S3 bucket name (3 to 63 lower-case letters, digits, . and -)"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.len() > 256
            || prefix
                .split('/')
                .any(|part| part == "." || part == ".." || (part.is_empty() && !prefix.is_empty()))
            || prefix.chars().any(|c| c.is_control())
        {
            return Err(format!(
                "the key prefix {prefix:?} must be at most 256 characters, without control \
                 characters, empty segments, . or .."
            ));
        }
        Ok(S3Target {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    /// True when one target's keys can fall under the other's (same bucket, one prefix at
    /// or under the other): a backup target there could remove archived volumes.
    pub fn overlaps(&self, other: &S3Target) -> bool {
        let under = |a: &str, b: &str| a.is_empty() || b == a || b.starts_with(&format!("{a}/"));
        self.bucket == other.bucket
            && (under(&self.prefix, &other.prefix) || under(&other.prefix, &self.prefix))
    }

    /// The object key of `name` under the prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }
}

impl std::fmt::Display for S3Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            write!(f, "s3://{}", self.bucket)
        } else {
            write!(f, "s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Checks an `[Archive] endpoint`: an http or https URL with a host.
pub fn check_endpoint(text: &str) -> Result<(), String> {
    let url: url::Url = text.parse().map_err(|error| {
        format!("expected an http(s) URL such as https://minio.local:9000: {error}")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "expected an http(s) URL with a host such as https://minio.local:9000, got {text:?}"
        ));
    }
    Ok(())
}

/// The object store of `[Archive]`, with the endpoint, region and credentials taken from the
/// section or else from the standard `AWS_*` environment variables.
pub fn connect(section: &ArchiveSection) -> Result<ObjectStore, String> {
    let target = section
        .target
        .as_ref()
        .ok_or("no [Archive] target is configured")?;
    connect_to(section, target)
}

/// The object store holding `target`'s bucket (a backup target, say), reached with the
/// endpoint, region and credentials of `[Archive]` or the `AWS_*` environment variables.
pub fn connect_to(section: &ArchiveSection, target: &S3Target) -> Result<ObjectStore, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let region = section
        .region
        .clone()
        .or_else(|| env("AWS_REGION"))
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|| "us-east-1".to_owned());
    let endpoint = section
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL_S3"))
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let credentials = match (&section.access_key_id, &section.secret_access_key) {
        (Some(key), Some(secret)) => rusty_s3::Credentials::new(key.clone(), secret.clone()),
        (Some(_), None) | (None, Some(_)) => {
            return Err(
                "[Archive] sets only one of access_key_id and secret_access_key; set both, or \
                 neither to use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                    .into(),
            )
        }
        (None, None) => rusty_s3::Credentials::from_env().ok_or(
            "no credentials for the object store: set access_key_id and secret_access_key in \
             [Archive], or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment",
        )?,
    };
    ObjectStore::new(
        &endpoint,
        section.virtual_host_style,
        &target.bucket,
        &region,
        credentials,
        Duration::from_millis(section.request_timeout_ms),
    )
}

/// The object key of a volume: per server (two servers may share a bucket) and per sealing
/// (a volume id reused after a restore from an old backup never overwrites another's copy).
pub fn volume_key(target: &S3Target, server_id: &str, state: &VolumeState) -> String {
    target.key(&format!(
        "{server_id}/volumes/{:08}-{}.vol",
        state.id, state.row.sealed_at_ms
    ))
}

// ------------------------------------------------------------------------------ reads

/// Reads records of archived volumes: the cache, else a range request.
pub struct Fetcher {
    objects: ObjectStore,
    cache: cache::RecordCache,
    reads: AtomicU64,
    failures: AtomicU64,
    cache_hits: AtomicU64,
    /// Until when reads fail at once, and why (the store was unreachable).
    unreachable: Mutex<Option<(i64, String)>>,
}

impl ArchiveFetch for Fetcher {
    fn read_range(
        &self,
        volume: u32,
        object: &str,
        offset: u64,
        length: u32,
    ) -> Result<bytes::Bytes, String> {
        if let Some(bytes) = self.cache.get(volume, offset, length) {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(bytes);
        }
        let now_ms = crate::now_ms();
        if let Some((until, reason)) = self.unreachable.lock().as_ref() {
            if now_ms < *until {
                self.failures.fetch_add(1, Ordering::Relaxed);
                return Err(format!("{reason} (tried again shortly)"));
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        match self.objects.get_range(object, offset, length) {
            Ok(bytes) => {
                *self.unreachable.lock() = None;
                self.cache.put(volume, offset, &bytes);
                Ok(bytes::Bytes::from(bytes))
            }
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(volume, offset, %object, %error, "an archived record could not be read");
                let reason = format!(
                    "{error} (bucket {}, object {object})",
                    self.objects.bucket_name()
                );
                if matches!(error, ObjectError::Unreachable(_)) {
                    *self.unreachable.lock() = Some((now_ms + UNREACHABLE_HOLD_MS, reason.clone()));
                }
                Err(reason)
            }
        }
    }

    fn discard(&self, volume: u32, offset: u64) {
        self.cache.discard(volume, offset);
    }
}

// ------------------------------------------------------------------------------ the archiver

/// What the archive tier did and where it stands, for `status`, `/metrics` and the dashboard.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveStatus {
    pub target: String,
    /// The endpoint's host and port.
    pub endpoint: String,
    pub after_days: u64,
    pub volumes_archived: u64,
    pub bytes_archived: u64,
    /// Sealed volumes old enough but not archived yet.
    pub volumes_due: u64,
    pub bytes_due: u64,
    /// Archived volumes whose local file is still there (removed by the next pass).
    pub volumes_local_left: u64,
    pub passes: u64,
    pub last_pass_at_ms: Option<i64>,
    /// The last pass's failure, None after a pass without one.
    pub last_error: Option<String>,
    pub last_error_at_ms: Option<i64>,
    /// The volume being uploaded now.
    pub uploading: Option<u32>,
    /// Range requests made, failed, and answered from the cache.
    pub remote_reads: u64,
    pub remote_read_failures: u64,
    pub cache_hits: u64,
    pub cache: cache::CacheStats,
}

/// What one pass did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PassReport {
    pub volumes_archived: u64,
    pub bytes_archived: u64,
    pub local_files_removed: u64,
    pub volumes_due_left: u64,
    pub error: Option<String>,
}

pub struct Archive {
    shared: Arc<Shared>,
    thread: Mutex<Option<(JoinHandle<()>, crossbeam_channel::Receiver<()>)>>,
}

/// How long a stop waits for an upload in progress to notice it (an upload blocked on a
/// stalled store notices only at its timeout; the stop does not wait for that).
const STOP_WAIT: Duration = Duration::from_secs(5);

struct Shared {
    store: Store,
    writer: Writer,
    objects: ObjectStore,
    target: S3Target,
    after_days: u64,
    interval: Duration,
    fetcher: Arc<Fetcher>,
    status: Mutex<ArchiveStatus>,
    /// One pass at a time (the thread's, or one `esserver archive` asked for).
    pass: Mutex<()>,
    stop: AtomicBool,
    wake: (Mutex<bool>, Condvar),
}

impl Archive {
    /// Installs the fetcher on `store` and starts the archiver thread.
    pub fn start(
        section: &ArchiveSection,
        store: &Store,
        writer: &Writer,
        data_dir: &Path,
    ) -> Result<Archive, String> {
        let archive = Archive::new(section, store, writer, data_dir)?;
        let shared = archive.shared.clone();
        tracing::info!(target = %shared.target, endpoint = %shared.objects.host(), after_days = section.after_days,
            "archive tier on: sealed volumes older than after_days go to the object store");
        let (done, finished) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("es-archiver".into())
            .spawn(move || {
                shared.run();
                let _ = done.send(());
            })
            .map_err(|error| format!("cannot start the archiver thread: {error}"))?;
        *archive.thread.lock() = Some((thread, finished));
        Ok(archive)
    }

    /// The archive without its thread (an offline `esserver archive`): passes run on
    /// [`Archive::run_now`] only.
    pub fn new(
        section: &ArchiveSection,
        store: &Store,
        writer: &Writer,
        data_dir: &Path,
    ) -> Result<Archive, String> {
        let target = section
            .target
            .clone()
            .ok_or("no [Archive] target is configured")?;
        if store.options().volume_bytes_max > OBJECT_BYTES_MAX {
            return Err(format!(
                "[Storage] volume_bytes_max is {} bytes; archived volumes are stored with one \
                 PUT of at most {OBJECT_BYTES_MAX} (5 GiB): lower it",
                store.options().volume_bytes_max
            ));
        }
        let objects = connect(section)?;
        let cache =
            cache::RecordCache::open(data_dir, section.cache_bytes_max).map_err(|error| {
                format!(
                    "cannot prepare the archive cache in {}: {error}",
                    data_dir.join(cache::CACHE_DIR_NAME).display()
                )
            })?;
        let fetcher = Arc::new(Fetcher {
            objects: objects.clone(),
            cache,
            reads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            unreachable: Mutex::new(None),
        });
        store.set_archive_fetch(fetcher.clone());
        let status = ArchiveStatus {
            target: target.to_string(),
            endpoint: objects.host().to_owned(),
            after_days: section.after_days,
            ..ArchiveStatus::default()
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            writer: writer.clone(),
            objects,
            target,
            after_days: section.after_days,
            interval: Duration::from_millis(section.check_interval_ms),
            fetcher,
            status: Mutex::new(status),
            pass: Mutex::new(()),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
        });
        // What is archived and due is known from the start, not only after the first pass.
        if let Err(error) = shared.count() {
            tracing::warn!(%error, "cannot count the archived volumes");
        }
        Ok(Archive {
            shared,
            thread: Mutex::new(None),
        })
    }

    /// One pass now, on the caller's thread (`esserver archive`), with progress lines.
    pub fn run_now(&self, progress: ProgressSink<'_>) -> Response {
        let report = self.shared.pass(progress);
        let body = serde_json::to_value(&report).unwrap_or_default();
        match &report.error {
            None => Response::ok(body),
            Some(error) => Response::error("archive_failed", error.clone()),
        }
    }

    pub fn status(&self) -> ArchiveStatus {
        self.shared.status()
    }

    /// Checks that every archived volume's object is in the store with its recorded size (a
    /// HEAD request each; `full`: read back whole and its SHA-256 compared too). Problems are
    /// listed; the answer is an error when there is one.
    pub fn check(&self, full: bool, progress: ProgressSink<'_>) -> Response {
        let states = match self.shared.store.volume_states() {
            Ok(states) => states,
            Err(error) => return Response::error(error.code(), error.to_string()),
        };
        let archived: Vec<_> = states
            .iter()
            .filter_map(|s| s.archived.as_ref().map(|a| (s.id, a)))
            .collect();
        let mut problems = Vec::new();
        let (mut checked, mut bytes) = (0u64, 0u64);
        for (number, (id, row)) in archived.iter().enumerate() {
            progress(serde_json::json!({
                "volume": id, "bytes": row.bytes, "number": number + 1, "of": archived.len(),
            }));
            let found = if full {
                self.shared
                    .objects
                    .read_back(&row.object, row.bytes, &self.shared.stop)
                    .map(|(size, sha)| (Some(size), Some(sha)))
            } else {
                self.shared
                    .objects
                    .size(&row.object)
                    .map(|size| (size, None))
            };
            match found {
                Ok((None, _)) | Err(ObjectError::NotFound) => {
                    problems.push(format!("volume {id}: {} is missing", row.object));
                }
                Ok((Some(size), _)) if size != row.bytes => problems.push(format!(
                    "volume {id}: {} is {size} bytes, the record says {}",
                    row.object, row.bytes
                )),
                Ok((_, Some(sha))) if sha != row.sha256 => problems.push(format!(
                    "volume {id}: {}'s SHA-256 is not the recorded one (the copy is damaged)",
                    row.object
                )),
                Ok(_) => {
                    checked += 1;
                    bytes += row.bytes;
                }
                Err(error) => {
                    return Response::error(
                        "archive_unavailable",
                        format!("volume {id}: {}: {error}", row.object),
                    )
                }
            }
        }
        if problems.is_empty() {
            Response::ok(serde_json::json!({
                "volumes_checked": checked,
                "bytes": bytes,
                "full": full,
            }))
        } else {
            tracing::error!(problems = ?problems, "archived volumes are missing or damaged in the object store");
            Response::error(
                "archive_damaged",
                format!(
                    "{} of {} archived volumes are missing or damaged in the object store: {}",
                    problems.len(),
                    archived.len(),
                    problems.join("; ")
                ),
            )
        }
    }

    /// Stops the thread: an upload in progress is cut off at its next read of the file. An
    /// upload blocked on a stalled store is left to end at its timeout (an upload that ends
    /// after the stop is not recorded), so a shutdown waits at most [`STOP_WAIT`] for it.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let (lock, condvar) = &self.shared.wake;
            *lock.lock() = true;
            condvar.notify_all();
        }
        if let Some((thread, finished)) = self.thread.lock().take() {
            if finished.recv_timeout(STOP_WAIT).is_ok() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    "the archiver is blocked on the object store; stopping without it (its \
                     upload is repeated by the next pass)"
                );
            }
        }
    }
}

impl Shared {
    fn run(&self) {
        loop {
            {
                let (lock, condvar) = &self.wake;
                let mut woken = lock.lock();
                if !*woken {
                    condvar.wait_for(&mut woken, self.interval);
                }
                *woken = false;
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.pass(&mut |_| {});
        }
    }

    fn status(&self) -> ArchiveStatus {
        let mut status = self.status.lock().clone();
        status.remote_reads = self.fetcher.reads.load(Ordering::Relaxed);
        status.remote_read_failures = self.fetcher.failures.load(Ordering::Relaxed);
        status.cache_hits = self.fetcher.cache_hits.load(Ordering::Relaxed);
        status.cache = self.fetcher.cache.stats();
        status
    }

    fn pass(&self, progress: ProgressSink<'_>) -> PassReport {
        let _one = self.pass.lock();
        let mut report = PassReport::default();
        let result = self.pass_holding_lock(&mut report, progress);
        let now_ms = crate::now_ms();
        let mut status = self.status.lock();
        status.passes += 1;
        status.last_pass_at_ms = Some(now_ms);
        status.uploading = None;
        if let Err(error) = result {
            tracing::warn!(%error, "archive pass stopped; the next pass resumes with the same volume");
            status.last_error = Some(error.clone());
            status.last_error_at_ms = Some(now_ms);
            report.error = Some(error);
        } else {
            status.last_error = None;
        }
        drop(status);
        if let Err(error) = self.count() {
            tracing::warn!(%error, "cannot count the archived volumes");
        }
        report
    }

    fn pass_holding_lock(
        &self,
        report: &mut PassReport,
        progress: ProgressSink<'_>,
    ) -> Result<(), String> {
        let states = self
            .store
            .volume_states()
            .map_err(|error| format!("cannot read the volume index: {error}"))?;
        for state in states.iter().filter(|s| s.archived.is_some()) {
            if state.local_bytes.is_some() {
                match self.store.remove_archived_local(state.id) {
                    Ok(true) => report.local_files_removed += 1,
                    Ok(false) => {}
                    Err(error) => {
                        return Err(format!(
                            "cannot remove volume {}'s local file: {error}",
                            state.id
                        ))
                    }
                }
            }
        }
        let due = self.due(&states);
        let mut volume_errors = Vec::new();
        let total = due.len();
        report.volumes_due_left = total as u64;
        for (index, state) in due.into_iter().enumerate() {
            if self.stop.load(Ordering::SeqCst) {
                return Err("the server is stopping".into());
            }
            self.status.lock().uploading = Some(state.id);
            progress(serde_json::json!({
                "volume": state.id,
                "bytes": state.row.end,
                "number": index + 1,
                "of": total,
            }));
            match self.archive_one(state) {
                Ok(()) => {
                    report.volumes_archived += 1;
                    report.bytes_archived += state.row.end;
                    report.volumes_due_left -= 1;
                }
                // The object store or the writer failed: the next pass resumes here.
                Err(Failure::Pass(error)) => return Err(error),
                // This volume cannot go (damaged, say): the others still do.
                Err(Failure::Volume(error)) => {
                    tracing::error!(volume = state.id, %error, "volume not archived");
                    volume_errors.push(error);
                }
            }
        }
        match volume_errors.len() {
            0 => Ok(()),
            1 => Err(volume_errors.remove(0)),
            n => Err(format!(
                "{n} volumes were not archived; the first: {}",
                volume_errors[0]
            )),
        }
    }

    /// Sealed, whole volumes older than `after_days`, not archived: oldest first.
    fn due<'s>(&self, states: &'s [VolumeState]) -> Vec<&'s VolumeState> {
        let cutoff = crate::now_ms().saturating_sub(self.after_days as i64 * DAY_MS);
        states
            .iter()
            .filter(|s| s.ready_to_archive() && s.row.sealed_at_ms <= cutoff)
            .collect()
    }

    fn archive_one(&self, state: &VolumeState) -> Result<(), Failure> {
        let id = state.id;
        let end = state.row.end;
        let key = volume_key(&self.target, &self.store.server_id(), state);
        let path = self.store.volume_path(id);
        if end > OBJECT_BYTES_MAX {
            return Err(Failure::Volume(format!(
                "volume {id} is {end} bytes, more than one PUT stores ({OBJECT_BYTES_MAX})"
            )));
        }
        // Every live record checks before the only local copy can go.
        self.store
            .check_volume_records(id)
            .map_err(Failure::Volume)?;
        let file = std::fs::File::open(&path).map_err(|error| {
            Failure::Volume(format!(
                "cannot open volume {id} ({}): {error}",
                path.display()
            ))
        })?;
        let started = std::time::Instant::now();
        let mut body = Stoppable {
            inner: file,
            stop: &self.stop,
        };
        let sent = self
            .objects
            .put(&key, &mut body, end)
            .map_err(|error| Failure::Pass(upload_error(id, &key, &error)))?;
        let (bytes, sha256) = self
            .objects
            .read_back(&key, end, &self.stop)
            .map_err(|error| {
                Failure::Pass(format!("volume {id}: reading {key} back failed: {error}"))
            })?;
        if bytes != end || sha256 != sent {
            return Err(Failure::Pass(format!(
                "volume {id}: the copy read back from {key} is {bytes} bytes with SHA-256 {}, \
                 the local file {end} bytes with {}; the local file is kept",
                hex::encode(sha256),
                hex::encode(sent)
            )));
        }
        if self.stop.load(Ordering::SeqCst) {
            // Checked but not recorded: the next pass (after the restart) does it again.
            return Err(Failure::Pass("the server is stopping".into()));
        }
        let (done, answer) = crossbeam_channel::bounded(1);
        self.writer
            .submit(
                VolumeArchived {
                    volume: id,
                    object: key.clone(),
                    bytes,
                    sha256,
                    at_ms: crate::now_ms(),
                },
                move |result| {
                    let _ = done.send(result);
                },
            )
            .map_err(|error| {
                Failure::Pass(format!("volume {id}: the storage writer refused: {error}"))
            })?;
        match answer.recv_timeout(RECORD_WAIT) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(Failure::Volume(format!(
                    "volume {id}: not recorded: {error}"
                )))
            }
            Err(_) => {
                return Err(Failure::Pass(format!(
                    "volume {id}: the storage writer did not answer within {} s",
                    RECORD_WAIT.as_secs()
                )))
            }
        }
        self.store.remove_archived_local(id).map_err(|error| {
            Failure::Volume(format!(
                "volume {id}: archived, but the local file stays: {error}"
            ))
        })?;
        tracing::info!(volume = id, bytes, object = %key, seconds = started.elapsed().as_secs_f64(),
            "volume archived: uploaded, read back and checked; local file removed");
        Ok(())
    }

    /// Counts what is archived and what is due, for the status.
    fn count(&self) -> Result<(), String> {
        let states = self.store.volume_states().map_err(|e| e.to_string())?;
        let due = self.due(&states);
        let mut status = self.status.lock();
        status.volumes_archived = 0;
        status.bytes_archived = 0;
        status.volumes_local_left = 0;
        for state in &states {
            if let Some(archived) = &state.archived {
                status.volumes_archived += 1;
                status.bytes_archived += archived.bytes;
                if state.local_bytes.is_some() {
                    status.volumes_local_left += 1;
                }
            }
        }
        status.volumes_due = due.len() as u64;
        status.bytes_due = due.iter().map(|s| s.row.end).sum();
        Ok(())
    }
}

/// Why a volume was not archived.
enum Failure {
    /// The object store, the writer or a stop: the pass ends and the next resumes here.
    Pass(String),
    /// This volume only: the pass goes on with the next.
    Volume(String),
}

fn upload_error(id: u32, key: &str, error: &ObjectError) -> String {
    format!("volume {id}: uploading {key} failed: {error}; the local file is kept")
}

/// A file reader that fails once the server is stopping, cutting an upload off.
struct Stoppable<'a> {
    inner: std::fs::File,
    stop: &'a AtomicBool,
}

impl Read for Stoppable<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(
                "the upload was stopped: the server is stopping",
            ));
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_ones_say_why() {
        let target = S3Target::parse("s3://clinic-archive/esserver/site1/").unwrap();
        assert_eq!(target.bucket, "clinic-archive");
        assert_eq!(target.prefix, "esserver/site1");
        assert_eq!(target.key("a.vol"), "esserver/site1/a.vol");
        assert_eq!(target.to_string(), "s3://clinic-archive/esserver/site1");
        let bare = S3Target::parse("s3://bucket").unwrap();
        assert_eq!(bare.key("a.vol"), "a.vol");
        assert_eq!(bare.to_string(), "s3://bucket");
        for bad in [
            "/mnt/archive",
            "s3://",
            "s3://Upper",
            "s3://ab",
            "s3://-bucket",
            "s3://bucket/a//b",
            "s3://bucket/../x",
        ] {
            assert!(S3Target::parse(bad).is_err(), "{bad}");
        }
        let archive = S3Target::parse("s3://clinic/archive").unwrap();
        assert!(archive.overlaps(&S3Target::parse("s3://clinic/archive/x").unwrap()));
        assert!(archive.overlaps(&S3Target::parse("s3://clinic").unwrap()));
        assert!(!archive.overlaps(&S3Target::parse("s3://clinic/archive-backups").unwrap()));
        assert!(!archive.overlaps(&S3Target::parse("s3://other/archive").unwrap()));
        assert!(check_endpoint("http://127.0.0.1:9000").is_ok());
        assert!(check_endpoint("ftp://host").is_err());
        assert!(check_endpoint("minio:9000/x").is_err());
    }
}
