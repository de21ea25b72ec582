//! Backups as the server and the command line run them: naming, progress output and the
//! control answer. What a backup is and how it is made, verified and restored is
//! `es_storage::backup`; docs/operations.md says how to use it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use es_storage::backup::{self, BackupError, Progress};
use es_storage::Store;
use parking_lot::Mutex;
use serde::Serialize;

use crate::archive::backups::S3Backups;
use crate::archive::S3Target;
use crate::config::ArchiveSection;
use crate::control::{ProgressSink, Response};

/// Where backups go: a directory (another disk, a mounted share) or an object store
/// (`s3://bucket/prefix`, reached with `[Archive]`'s endpoint and credentials or `AWS_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Dir(PathBuf),
    S3(S3Target),
}

impl Target {
    /// `s3://bucket/prefix`, or a directory path (absolute).
    pub fn parse(text: &str) -> Result<Target, String> {
        if text.contains("://") {
            return S3Target::parse(text).map(Target::S3);
        }
        let path = PathBuf::from(text);
        if !path.is_absolute() {
            return Err(format!(
                "the backup target {text} must be an absolute path or s3://bucket/prefix"
            ));
        }
        Ok(Target::Dir(path))
    }

    /// Reads the backups of this target.
    pub fn source<'a>(
        &'a self,
        archive: &ArchiveSection,
    ) -> Result<Box<dyn backup::Source + 'a>, String> {
        Ok(match self {
            Target::Dir(path) => Box::new(backup::DirSink { target: path }),
            Target::S3(target) => Box::new(s3_backups(archive, target)?),
        })
    }
}

fn s3_backups(archive: &ArchiveSection, target: &S3Target) -> Result<S3Backups, String> {
    if let Some(archived) = archive.target.as_ref().filter(|a| a.overlaps(target)) {
        return Err(format!(
            "the backup target {target} and the archive {archived} overlap: a backup's \
             removal of old volumes could remove archived ones; use another prefix"
        ));
    }
    let objects = crate::archive::connect_to(archive, target)?;
    Ok(S3Backups::new(objects, target.clone()))
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Dir(path) => write!(f, "{}", path.display()),
            Target::S3(target) => write!(f, "{target}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A backup older than this (or none) is a warning on the dashboard, in `status` and in
/// `/metrics`: a daily backup missed more than once, with two hours of slack.
pub const STALE_AFTER_MS: i64 = 26 * 3600 * 1000;
/// A scheduled backup that was missed runs this long after the start.
const CATCH_UP_DELAY_MS: i64 = 2_000;

/// The last backup that succeeded.
#[derive(Debug, Clone, Serialize)]
pub struct Succeeded {
    pub name: String,
    pub target: Target,
    pub at_ms: i64,
    pub bytes: u64,
    pub bytes_copied: u64,
    pub images: u64,
    pub seconds: f64,
    /// Volumes the data directory lacked: their images are not in the backup.
    #[serde(default)]
    pub missing_volumes: Vec<u32>,
}

/// The last backup that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failed {
    pub target: Target,
    pub at_ms: i64,
    pub reason: String,
}

/// What status pages show of the backups.
#[derive(Debug, Clone, Serialize)]
pub struct BackupStatus {
    /// `[Backup] target`, when backups are scheduled.
    pub scheduled_target: Option<Target>,
    /// The next scheduled backup (Unix ms).
    pub next_at_ms: Option<i64>,
    pub last_success: Option<Succeeded>,
    /// Seconds since the last success.
    pub last_success_age_s: Option<u64>,
    /// The last attempt failed: when and why.
    pub last_failure: Option<Failed>,
    pub running: bool,
    /// Why the backups need attention, if they do.
    pub warning: Option<String>,
}

/// The server's backups: one at a time, the last outcome of each kind, the schedule.
#[derive(Default)]
pub struct Backups {
    running: Mutex<()>,
    busy: AtomicBool,
    /// The scheduler has run a backup since the start.
    tried: AtomicBool,
    /// The server shuts down: a running backup stops, none starts.
    stopping: AtomicBool,
    /// How object-store targets are reached.
    archive: ArchiveSection,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    scheduled_target: Option<Target>,
    next_at_ms: Option<i64>,
    last_success: Option<Succeeded>,
    last_failure: Option<Failed>,
    /// The last removal of old backups failed (why).
    prune_error: Option<String>,
}

fn busy() -> Response {
    Response::error(
        "busy",
        "a backup is running already; try again once it has finished",
    )
}

impl Backups {
    /// Knows `[Backup] target` and the newest complete backup in it (so a restart does not
    /// forget the last success).
    /// An object-store target is looked at by the scheduler's thread ([`Backups::recall`]),
    /// not here: a start never waits on the network.
    pub fn new(scheduled_target: Option<Target>, archive: ArchiveSection) -> Backups {
        let backups = Backups {
            archive,
            state: Mutex::new(State {
                scheduled_target: scheduled_target.clone(),
                ..State::default()
            }),
            ..Backups::default()
        };
        if let Some(target @ Target::Dir(_)) = &scheduled_target {
            backups.recall(target);
        }
        backups
    }

    /// Takes the newest complete backup in `target` as the last success.
    pub fn recall(&self, target: &Target) {
        let newest = target
            .source(&self.archive)
            .and_then(|source| backup::list_from(source.as_ref()).map_err(|e| e.to_string()));
        let newest = match newest {
            Ok(mut list) => list.pop(),
            Err(error) => {
                tracing::warn!(%target, %error, "cannot list the backups of the target");
                None
            }
        };
        let Some(newest) = newest else {
            return;
        };
        let mut state = self.state.lock();
        if state.last_success.is_none() {
            state.last_success = Some(Succeeded {
                name: newest.name.clone(),
                target: target.clone(),
                at_ms: newest.created_at_ms,
                bytes: newest.bytes(),
                bytes_copied: 0,
                images: newest.images,
                seconds: 0.0,
                missing_volumes: newest.missing_volumes.clone(),
            });
        }
    }

    /// Runs a backup of `store` into `target` unless one is running (then `busy`), and
    /// records its outcome.
    pub fn run(
        &self,
        store: &Store,
        target: &Target,
        data_dir: &Path,
        progress: ProgressSink<'_>,
    ) -> Response {
        let Some(_running) = self.running.try_lock() else {
            return busy();
        };
        self.run_holding_lock(store, target, data_dir, progress)
    }

    /// A scheduled backup and then the removal of the oldest beyond `keep`, both under the
    /// one-at-a-time lock (a backup taken meanwhile could otherwise lose a shared volume the
    /// removal found unlisted).
    pub fn run_and_prune(
        &self,
        store: &Store,
        target: &Target,
        data_dir: &Path,
        keep: u32,
    ) -> Response {
        let Some(_running) = self.running.try_lock() else {
            tracing::info!("the scheduled backup is skipped: another backup is running");
            return busy();
        };
        let response = self.run_holding_lock(store, target, data_dir, &mut |_| {});
        if response.ok {
            let pruned = match target {
                Target::Dir(path) => backup::prune(path, keep as usize),
                Target::S3(s3) => s3_backups(&self.archive, s3)
                    .map_err(BackupError::Refused)
                    .and_then(|sink| backup::prune_in(&sink, keep as usize)),
            };
            let mut state = self.state.lock();
            match pruned {
                Ok(pruned) => {
                    state.prune_error = None;
                    if !pruned.removed.is_empty() {
                        tracing::info!(
                            removed = ?pruned.removed,
                            files = pruned.files_removed,
                            bytes = pruned.bytes_freed,
                            keep,
                            "old backups removed"
                        );
                    }
                }
                Err(error) => {
                    tracing::error!(code = error.code(), "cannot remove old backups: {error}");
                    state.prune_error = Some(error.to_string());
                }
            }
        }
        response
    }

    fn run_holding_lock(
        &self,
        store: &Store,
        target: &Target,
        data_dir: &Path,
        progress: ProgressSink<'_>,
    ) -> Response {
        if self.stopping.load(Ordering::Acquire) {
            return Response::error("shutting_down", "the server is shutting down");
        }
        self.busy.store(true, Ordering::Release);
        let response = run(
            store,
            target,
            data_dir,
            &self.archive,
            progress,
            &self.stopping,
        );
        self.busy.store(false, Ordering::Release);
        let now_ms = crate::now_ms();
        let mut state = self.state.lock();
        if response.ok {
            let body = &response.body;
            let number = |key: &str| body[key].as_u64().unwrap_or(0);
            state.last_success = Some(Succeeded {
                name: body["name"].as_str().unwrap_or_default().to_string(),
                target: target.clone(),
                at_ms: now_ms,
                bytes: number("bytes"),
                bytes_copied: number("bytes_copied"),
                images: number("images"),
                seconds: body["seconds"].as_f64().unwrap_or(0.0),
                missing_volumes: body["missing_volumes"]
                    .as_array()
                    .map(|ids| {
                        ids.iter()
                            .filter_map(|v| v.as_u64())
                            .map(|v| v as u32)
                            .collect()
                    })
                    .unwrap_or_default(),
            });
            state.last_failure = None;
        } else {
            state.last_failure = Some(Failed {
                target: target.clone(),
                at_ms: now_ms,
                reason: response.message.clone().unwrap_or_default(),
            });
        }
        response
    }

    /// The backups as status pages show them, at `now_ms`.
    pub fn status(&self, now_ms: i64) -> BackupStatus {
        let state = self.state.lock();
        let age_s = state
            .last_success
            .as_ref()
            .map(|s| ((now_ms - s.at_ms).max(0) / 1000) as u64);
        let warning = if let Some(failed) = &state.last_failure {
            Some(format!(
                "the last backup failed ({}): {}",
                crate::times::time_text(failed.at_ms),
                failed.reason
            ))
        } else if let Some(last) = state
            .last_success
            .as_ref()
            .filter(|last| !last.missing_volumes.is_empty())
        {
            Some(format!(
                "the last backup lacks volume(s) {:?}: their files are missing from the data \
                 directory (run esserver verify; restore them from an earlier backup)",
                last.missing_volumes
            ))
        } else if let Some(error) = &state.prune_error {
            Some(format!(
                "old backups could not be removed (the target fills up): {error}"
            ))
        } else if state.scheduled_target.is_none() && state.last_success.is_none() {
            Some("no backup is configured ([Backup] target) and none was taken".to_string())
        } else {
            match &state.last_success {
                None => Some("no backup has been taken yet".to_string()),
                Some(last) if now_ms - last.at_ms > STALE_AFTER_MS => Some(format!(
                    "the last successful backup is {} hours old",
                    (now_ms - last.at_ms) / 3_600_000
                )),
                Some(_) => None,
            }
        };
        BackupStatus {
            scheduled_target: state.scheduled_target.clone(),
            next_at_ms: state.next_at_ms,
            last_success: state.last_success.clone(),
            last_success_age_s: age_s,
            last_failure: state.last_failure.clone(),
            running: self.busy.load(Ordering::Acquire),
            warning,
        }
    }

    /// Stops a running backup soon (at its next chunk) and refuses new ones: the server is
    /// shutting down.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn tried_since_start(&self) -> bool {
        self.tried.load(Ordering::Acquire)
    }

    fn set_next(&self, next_at_ms: Option<i64>) {
        self.state.lock().next_at_ms = next_at_ms;
    }
}

/// The thread that takes the daily backups of `[Backup]`.
pub struct Scheduler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scheduler {
    /// Starts the daily backups into `target` at `time_of_day_min` in `zone`, keeping `keep`.
    pub fn start(
        backups: Arc<Backups>,
        store: Store,
        data_dir: PathBuf,
        target: Target,
        time_of_day_min: u32,
        keep: u32,
        zone: jiff::tz::TimeZone,
    ) -> std::io::Result<Scheduler> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("es-backup".into())
            .spawn(move || {
                if matches!(target, Target::S3(_)) {
                    backups.recall(&target);
                }
                loop {
                // A backup missed (the server was down at its time, or none was ever taken)
                // is caught up shortly after the start.
                let now_ms = crate::now_ms();
                let previous = next_run_ms(now_ms, time_of_day_min, &zone) - 24 * 3_600_000;
                let missed = backups
                    .status(now_ms)
                    .last_success
                    .is_none_or(|last| last.at_ms < previous);
                let next = if missed && !backups.tried_since_start() {
                    crate::now_ms() + CATCH_UP_DELAY_MS
                } else {
                    next_run_ms(crate::now_ms(), time_of_day_min, &zone)
                };
                backups.set_next(Some(next));
                tracing::info!(%target, next = %crate::times::time_text(next), "next scheduled backup");
                while crate::now_ms() < next {
                    if thread_stop.load(Ordering::Acquire) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                backups.tried.store(true, Ordering::Release);
                backups.run_and_prune(&store, &target, &data_dir, keep);
                }
            })?;
        Ok(Scheduler {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops waiting for the next backup (a backup in progress finishes first).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The next `time_of_day_min` (minutes after midnight in `zone`) strictly after `now_ms`.
pub fn next_run_ms(now_ms: i64, time_of_day_min: u32, zone: &jiff::tz::TimeZone) -> i64 {
    let now = jiff::Timestamp::from_millisecond(now_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let local = now.to_zoned(zone.clone());
    let at = |date: jiff::civil::Date| {
        let time = jiff::civil::Time::new(
            (time_of_day_min / 60) as i8,
            (time_of_day_min % 60) as i8,
            0,
            0,
        )
        .unwrap_or(jiff::civil::Time::midnight());
        date.to_datetime(time)
            .to_zoned(zone.clone())
            .map(|zoned| zoned.timestamp().as_millisecond())
            .unwrap_or(i64::MAX)
    };
    let today = at(local.date());
    if today > now_ms {
        today
    } else {
        local
            .date()
            .tomorrow()
            .map(at)
            .unwrap_or(now_ms + 24 * 3_600_000)
    }
}

/// A backup's name: the UTC time it was taken, to the second (`2026-12-06T23-59-01Z`), so
/// names sort by time and need no escaping on any filesystem.
pub fn name_at(now_ms: i64) -> String {
    let time = jiff::Timestamp::from_millisecond(now_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    time.strftime("%Y-%m-%dT%H-%M-%SZ").to_string()
}

/// The control answer of a backup of `store` into `target`, progress going to `progress`
/// as JSON (the server's and the offline command's path).
pub fn run(
    store: &Store,
    target: &Target,
    data_dir: &Path,
    archive: &ArchiveSection,
    progress: ProgressSink<'_>,
    stop: &AtomicBool,
) -> Response {
    let now_ms = crate::now_ms();
    let mut report_progress = |p: &Progress| {
        progress(serde_json::to_value(p).unwrap_or_default());
    };
    let result = match target {
        Target::Dir(path) if !path.is_absolute() => {
            return Response::error(
                "invalid_input",
                format!(
                    "the backup target {} must be an absolute path",
                    path.display()
                ),
            );
        }
        Target::Dir(path) => {
            let name = free_name(&backup::DirSink { target: path }, &name_at(now_ms));
            tracing::info!(%target, %name, "backup started");
            store.backup_until(path, &name, data_dir, now_ms, &mut report_progress, stop)
        }
        Target::S3(s3) => match s3_backups(archive, s3) {
            Ok(sink) => {
                let name = free_name(&sink, &name_at(now_ms));
                tracing::info!(%target, %name, "backup started");
                store.backup_to(&sink, &name, data_dir, now_ms, &mut report_progress, stop)
            }
            Err(detail) => Err(BackupError::Refused(detail)),
        },
    };
    match result {
        Ok(report) => {
            tracing::info!(
                %target,
                name = %report.name,
                files = report.files,
                bytes = report.bytes,
                bytes_copied = report.bytes_copied,
                seconds = report.seconds,
                "backup complete"
            );
            Response::ok(serde_json::to_value(&report).unwrap_or_default())
        }
        Err(error) => {
            tracing::error!(%target, code = error.code(), "backup failed: {error}");
            Response::error(error.code(), format!("backup failed: {error}"))
        }
    }
}

/// `name`, or `name-2`, `name-3`, ... when a backup of that name exists in `source` (two
/// backups in one second).
fn free_name(source: &dyn backup::Source, name: &str) -> String {
    let names = source.backup_names().unwrap_or_default();
    let taken = |candidate: &str| names.iter().any(|n| n == candidate);
    if !taken(name) {
        return name.to_string();
    }
    (2..)
        .map(|n| format!("{name}-{n}"))
        .find(|candidate| !taken(candidate))
        .unwrap_or_else(|| name.to_string())
}

/// Prints progress to stderr, at most about once a second: phase, files, bytes, rate and
/// time left.
pub struct ProgressPrinter {
    started: Instant,
    printed: Option<Instant>,
    label: &'static str,
}

impl ProgressPrinter {
    pub fn new(label: &'static str) -> ProgressPrinter {
        ProgressPrinter {
            started: Instant::now(),
            printed: None,
            label,
        }
    }

    /// Prints `progress` unless a line was printed less than a second ago (the last file
    /// always prints).
    pub fn show(&mut self, progress: &Progress) {
        let done = progress.files_total > 0 && progress.files_done >= progress.files_total;
        if !done
            && self
                .printed
                .is_some_and(|at| at.elapsed().as_millis() < 1000)
        {
            return;
        }
        self.printed = Some(Instant::now());
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = progress.bytes_done as f64 / seconds;
        let left = progress.bytes_total.saturating_sub(progress.bytes_done) as f64;
        let eta = if rate > 0.0 {
            format!("{:.0} s left", left / rate)
        } else {
            "time left unknown".into()
        };
        eprintln!(
            "{}: {} {}/{} files, {} of {}, {}/s, {eta}",
            self.label,
            progress.phase,
            progress.files_done,
            progress.files_total,
            bytes_text(progress.bytes_done),
            bytes_text(progress.bytes_total),
            bytes_text(rate as u64),
        );
    }

    /// [`ProgressPrinter::show`] of a progress line a server sent as JSON.
    pub fn show_json(&mut self, value: &serde_json::Value) {
        let number = |key: &str| value.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
        let phase = match value.get("phase").and_then(|v| v.as_str()) {
            Some("index") => "index",
            Some("volumes") => "volumes",
            Some("files") => "files",
            _ => "",
        };
        self.show(&Progress {
            phase,
            files_done: number("files_done"),
            files_total: number("files_total"),
            bytes_done: number("bytes_done"),
            bytes_total: number("bytes_total"),
        });
    }
}

/// Bytes in binary units, as the configuration sets sizes.
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The stable code and message of a backup error, for the command line.
pub fn error_text(error: &BackupError) -> String {
    format!("{error} ({})", error.code())
}

/// Re-exported for the command line.
pub use backup::{list, restore, verify};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_run_is_the_next_time_of_day_in_the_clinics_zone() {
        let zone = jiff::tz::TimeZone::get("Europe/Copenhagen").unwrap();
        // 2025-12-06 23:59:01 UTC is 00:59:01 on the 7th in Copenhagen (UTC+1).
        let now = 1_765_065_541_000;
        let next = next_run_ms(now, 2 * 60, &zone);
        assert_eq!(name_at(next), "2025-12-07T01-00-00Z");
        let later = next_run_ms(next, 2 * 60, &zone);
        assert_eq!(later - next, 24 * 3_600_000);
    }

    #[test]
    fn status_warns_when_nothing_succeeded_or_the_last_failed_or_is_old() {
        let backups = Backups::new(
            Some(Target::Dir(PathBuf::from("/nonexistent/backups"))),
            ArchiveSection::default(),
        );
        let status = backups.status(1_765_065_541_000);
        assert!(status.warning.unwrap().contains("no backup"));
        backups.state.lock().last_success = Some(Succeeded {
            name: "x".into(),
            target: Target::Dir(PathBuf::from("/t")),
            at_ms: 1_765_065_541_000,
            bytes: 1,
            bytes_copied: 1,
            images: 1,
            seconds: 0.1,
            missing_volumes: Vec::new(),
        });
        assert!(backups
            .status(1_765_065_541_000 + 3_600_000)
            .warning
            .is_none());
        let old = backups.status(1_765_065_541_000 + STALE_AFTER_MS + 3_600_000);
        assert!(old.warning.unwrap().contains("hours old"));
        backups.state.lock().last_failure = Some(Failed {
            target: Target::Dir(PathBuf::from("/t")),
            at_ms: 1_765_065_541_000,
            reason: "disk full".into(),
        });
        let failed = backups.status(1_765_065_541_000 + 1000);
        assert!(failed.warning.unwrap().contains("disk full"));
    }

    #[test]
    fn targets_are_absolute_directories_or_s3_urls() {
        assert_eq!(
            Target::parse("/mnt/backup").unwrap(),
            Target::Dir(PathBuf::from("/mnt/backup"))
        );
        let s3 = Target::parse("s3://clinic-backups/site1").unwrap();
        assert_eq!(s3.to_string(), "s3://clinic-backups/site1");
        assert_eq!(
            serde_json::to_value(&s3).unwrap(),
            serde_json::json!("s3://clinic-backups/site1")
        );
        assert!(Target::parse("relative/dir").is_err());
        assert!(Target::parse("s3://Bad_Bucket").is_err());
        assert!(Target::parse("ftp://host/x").is_err());
    }

    #[test]
    fn names_are_the_utc_time_and_sort_by_it() {
        assert_eq!(name_at(1_765_065_541_000), "2025-12-06T23-59-01Z");
        assert!(name_at(1_765_065_541_000) < name_at(1_765_065_542_000));
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
