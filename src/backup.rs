//! Backups as the server and the command line run them: naming, progress output and the
//! control answer. What a backup is and how it is made, verified and restored is
//! `es_storage::backup`; docs/operations.md says how to use it.

use std::path::Path;
use std::time::Instant;

use es_storage::backup::{self, BackupError, Progress};
use es_storage::Store;

use crate::control::{ProgressSink, Response};

/// A backup's name: the UTC time it was taken, to the second (`2026-12-06T23-59-01Z`), so
/// names sort by time and need no escaping on any filesystem.
pub fn name_at(now_ms: i64) -> String {
    let time = jiff::Timestamp::from_millisecond(now_ms).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    time.strftime("%Y-%m-%dT%H-%M-%SZ").to_string()
}

/// The control answer of a backup of `store` into `target`, progress going to `progress`
/// as JSON (the server's and the offline command's path).
pub fn run(store: &Store, target: &Path, data_dir: &Path, progress: ProgressSink<'_>) -> Response {
    if !target.is_absolute() {
        return Response::error(
            "invalid_input",
            format!(
                "the backup target {} must be an absolute path",
                target.display()
            ),
        );
    }
    let now_ms = crate::now_ms();
    let name = free_name(target, &name_at(now_ms));
    tracing::info!(target = %target.display(), %name, "backup started");
    let mut report_progress = |p: &Progress| {
        progress(serde_json::to_value(p).unwrap_or_default());
    };
    match store.backup(target, &name, data_dir, now_ms, &mut report_progress) {
        Ok(report) => {
            tracing::info!(
                target = %target.display(),
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
            tracing::error!(target = %target.display(), code = error.code(), "backup failed: {error}");
            Response::error(error.code(), format!("backup failed: {error}"))
        }
    }
}

/// `name`, or `name-2`, `name-3`, ... when a backup of that name exists in `target` (two
/// backups in one second).
fn free_name(target: &Path, name: &str) -> String {
    let taken = |candidate: &str| target.join("backups").join(candidate).exists();
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
    fn names_are_the_utc_time_and_sort_by_it() {
        assert_eq!(name_at(1_765_065_541_000), "2025-12-06T23-59-01Z");
        assert!(name_at(1_765_065_541_000) < name_at(1_765_065_542_000));
        assert_eq!(bytes_text(512), "512 B");
        assert_eq!(bytes_text(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
