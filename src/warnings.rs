//! The server's recent warnings and errors, kept in memory for the web interface's
//! Warnings page: a `tracing` layer copies every WARN and ERROR event (its message and
//! fields, as the log prints them) into a bounded ring, oldest dropped first. The log on
//! stderr stays the record; this is the administrator's view of it without a shell.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write as _;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// Warnings kept; past it the oldest is dropped (the count of all stays).
pub const WARNINGS_KEPT_MAX: usize = 2000;
/// Bytes of one warning's text kept; the rest is cut (the log has it whole).
pub const WARNING_TEXT_BYTES_MAX: usize = 1000;

/// One WARN or ERROR event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Numbered from 1 in the order logged since the start.
    pub seq: u64,
    pub at_ms: i64,
    /// `WARN` or `ERROR`.
    pub level: &'static str,
    /// The message followed by its fields, `key=value`.
    pub text: String,
}

/// The ring of recent warnings.
#[derive(Default)]
pub struct WarningLog {
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    kept: VecDeque<Warning>,
    total: u64,
}

impl WarningLog {
    pub const fn new() -> WarningLog {
        WarningLog {
            inner: Mutex::new(Ring {
                kept: VecDeque::new(),
                total: 0,
            }),
        }
    }

    fn push(&self, at_ms: i64, level: &'static str, mut text: String) {
        if text.len() > WARNING_TEXT_BYTES_MAX {
            let mut end = WARNING_TEXT_BYTES_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str(" [...]");
        }
        let mut ring = self.inner.lock();
        ring.total += 1;
        let seq = ring.total;
        if ring.kept.len() == WARNINGS_KEPT_MAX {
            ring.kept.pop_front();
        }
        ring.kept.push_back(Warning {
            seq,
            at_ms,
            level,
            text,
        });
    }

    /// How many were logged since the start (kept or not).
    pub fn total(&self) -> u64 {
        self.inner.lock().total
    }

    /// Up to `limit` warnings, newest first, skipping the `skip` newest.
    pub fn newest(&self, skip: usize, limit: usize) -> Vec<Warning> {
        let ring = self.inner.lock();
        ring.kept
            .iter()
            .rev()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many are kept now.
    pub fn kept(&self) -> usize {
        self.inner.lock().kept.len()
    }
}

/// The process's warning log, filled by [`layer`].
pub static LOG: WarningLog = WarningLog::new();

/// The layer that copies WARN and ERROR events into [`LOG`].
pub fn layer() -> WarningLayer {
    WarningLayer { log: &LOG }
}

pub struct WarningLayer {
    log: &'static WarningLog,
}

impl<S: Subscriber> Layer<S> for WarningLayer {
    fn on_event(&self, event: &Event<'_>, _context: Context<'_, S>) {
        let level = *event.metadata().level();
        if level > Level::WARN {
            return;
        }
        let mut text = Text::default();
        event.record(&mut text);
        let name = if level == Level::ERROR {
            "ERROR"
        } else {
            "WARN"
        };
        self.log.push(crate::now_ms(), name, text.finish());
    }
}

/// The message first, then the fields as the log prints them.
#[derive(Default)]
struct Text {
    message: String,
    fields: String,
}

impl Text {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }
}

impl Visit for Text {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            self.field(field, format_args!("{value}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }
}

impl Text {
    fn field(&mut self, field: &Field, value: std::fmt::Arguments<'_>) {
        if !self.fields.is_empty() {
            self.fields.push(' ');
        }
        let _ = write!(self.fields, "{}={value}", field.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn warnings_and_errors_are_kept_newest_first_and_bounded() {
        static TEST_LOG: WarningLog = WarningLog::new();
        let subscriber = tracing_subscriber::registry().with(WarningLayer { log: &TEST_LOG });
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("not kept");
            tracing::warn!(serial = "ES-1", code = "auth_failed", "HELLO refused");
            tracing::error!("disk failing");
            for n in 0..WARNINGS_KEPT_MAX {
                tracing::warn!(n, "flood");
            }
            tracing::warn!("{}", "x".repeat(5000));
        });
        assert_eq!(TEST_LOG.total(), 3 + WARNINGS_KEPT_MAX as u64);
        assert_eq!(TEST_LOG.kept(), WARNINGS_KEPT_MAX);
        let newest = TEST_LOG.newest(0, 2);
        assert_eq!(newest[0].seq, 3 + WARNINGS_KEPT_MAX as u64);
        assert!(newest[0].text.len() <= WARNING_TEXT_BYTES_MAX + 6);
        assert!(newest[0].text.ends_with(" [...]"));
        assert_eq!(newest[1].text, format!("flood n={}", WARNINGS_KEPT_MAX - 1));
        // The first two were dropped, oldest first; the last kept is the oldest flood entry
        // but one.
        let oldest = TEST_LOG.newest(WARNINGS_KEPT_MAX - 1, 10);
        assert_eq!(oldest.len(), 1);
        assert_eq!(oldest[0].seq, 4);
        assert_eq!(oldest[0].text, "flood n=1");
        assert_eq!(oldest[0].level, "WARN");
    }

    #[test]
    fn fields_follow_the_message() {
        static TEST_LOG: WarningLog = WarningLog::new();
        let subscriber = tracing_subscriber::registry().with(WarningLayer { log: &TEST_LOG });
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(serial = "ES-1", code = "auth_failed", "HELLO refused");
            tracing::error!(peer = %"10.0.0.5:4455", "disk failing");
        });
        let newest = TEST_LOG.newest(0, 10);
        assert_eq!(newest[0].text, "disk failing peer=10.0.0.5:4455");
        assert_eq!(newest[0].level, "ERROR");
        assert_eq!(newest[1].text, "HELLO refused serial=ES-1 code=auth_failed");
    }
}
