//! The instrument-monitoring (IMS) queue: what may enter it and how it is read.
//!
//! # No patient data
//!
//! A queue record ([`ImsRecord`]) is built in one place, `Batch::put_telemetry`, from three
//! things only: the instrument's serial number and model, one telemetry sample, or one alarm's
//! code, severity and times. It has no field for anything else, and the builder has no access
//! to a patient, treatment, dish or embryo row. Two strings come from the instrument and could
//! carry anything, so they enter the queue only when they are on an allowlist the caller
//! passes with [`crate::ImsQueueing`] (the device catalog's lists for the instrument's model):
//!
//! - a sample's channel must be one of the model's monitoring channels;
//! - an alarm's code must be one of the model's alarm codes.
//!
//! A sample or alarm that is not on the list is still stored on the server (the `telemetry`
//! and `ims_alarms` tables) but is *withheld* from the queue and counted. An alarm's free text
//! is never queued.

use serde::Serialize;

/// One queued monitoring record, as read back for upload.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImsRecord {
    /// Unique and increasing within this database. Not serialised: the uploader writes its
    /// own `id`, this number prefixed with the server id.
    #[serde(skip)]
    pub id: u64,
    pub serial: String,
    pub model: String,
    pub received_at_ms: i64,
    #[serde(flatten)]
    pub body: ImsRecordBody,
}

/// What a record carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImsRecordBody {
    Sample {
        channel: String,
        value: f64,
        at_ms: i64,
    },
    Alarm {
        code: String,
        severity: &'static str,
        raised_at_ms: i64,
        /// 0 while the alarm is active.
        cleared_at_ms: i64,
    },
}

/// The queue's state, from its counters row and its oldest record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImsQueueStats {
    pub records: u64,
    pub bytes: u64,
    /// When the oldest queued record was received (0: the queue is empty).
    pub oldest_received_at_ms: i64,
    pub dropped_records: u64,
    pub dropped_bytes: u64,
    pub uploaded_records: u64,
    pub withheld: u64,
    pub alarms: u64,
}

/// One alarm from the instrument as the server keeps it (text included: it stays here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlarmRecord {
    pub serial: String,
    pub code: String,
    pub severity: &'static str,
    pub raised_at_ms: i64,
    pub cleared_at_ms: i64,
    pub text: String,
}

/// The protocol's severity number as a word.
pub fn severity_name(severity: u8) -> &'static str {
    match severity {
        1 => "info",
        2 => "warning",
        3 => "critical",
        _ => "unknown",
    }
}
