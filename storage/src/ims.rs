//! The instrument-monitoring (IMS) queue: what may enter it and how it is read.
//!
//! # No patient data
//!
//! A queue record ([`ImsRecord`]) is built in one place, `Batch::put_telemetry`, from three
//! things only: the instrument's serial number and model, one telemetry sample, or one alarm's
//! code, severity and times. It has no field for anything else, and the builder has no access
//! to a patient, treatment, dish or embryo row. Two strings come from the instrument and could
//! carry anything, so they are checked before they are queued:
//!
//! - a sample's channel must be one of the monitoring channels, [`IMS_CHANNELS`], a closed
//!   list of names;
//! - an alarm code must look like one ([`alarm_code_shape_ok`]: an upper-case letter, then
//!   upper-case letters, digits, `-` or `_`, at most 32 bytes) and must not equal any stored
//!   patient id, patient name, treatment name, dish id or embryo id.
//!
//! A sample or alarm that fails is still stored on the server (the `telemetry` and
//! `ims_alarms` tables) but is *withheld* from the queue and counted. An alarm's free text is
//! never queued.

use serde::Serialize;

/// The monitoring channels: the only telemetry channels whose samples enter the queue.
/// Documented in `docs/ims.md`; append only.
pub const IMS_CHANNELS: &[&str] = &[
    "temperature_c",
    "temperature_set_c",
    "co2_percent",
    "co2_set_percent",
    "o2_percent",
    "o2_set_percent",
    "humidity_percent",
    "gas_pressure_kpa",
    "co2_pressure_kpa",
    "n2_pressure_kpa",
    "gas_consumption_l",
    "co2_flow_l_per_h",
    "n2_flow_l_per_h",
    "co2_consumption_l",
    "n2_consumption_l",
    "dishes_loaded",
    "load_events",
    "unload_events",
    "door_open",
    "camera_ok",
    "imaging_ok",
    "power_ok",
    "ups_battery_percent",
    "disk_used_percent",
    "disk_free_bytes",
    "last_sync_age_s",
    "cpu_temperature_c",
    "fan_rpm",
    "uptime_s",
];

/// Longest alarm code that may be queued, bytes.
pub const ALARM_CODE_QUEUED_BYTES_MAX: usize = 32;

/// True when `channel` is a monitoring channel.
pub fn channel_allowed(channel: &str) -> bool {
    IMS_CHANNELS.contains(&channel)
}

/// True when `code` has the shape of an alarm code: an upper-case ASCII letter, then
/// upper-case letters, digits, `-` or `_`; at most [`ALARM_CODE_QUEUED_BYTES_MAX`] bytes.
pub fn alarm_code_shape_ok(code: &str) -> bool {
    let bytes = code.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= ALARM_CODE_QUEUED_BYTES_MAX
        && bytes[0].is_ascii_uppercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_')
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_code_shapes() {
        for good in ["T1", "CO2-LOW", "E102", "DOOR_OPEN", "A"] {
            assert!(alarm_code_shape_ok(good), "{good}");
        }
        for bad in [
            "",
            "t1",
            "1E",
            "-A",
            "Smith",
            "CO2 LOW",
            "É1",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456",
        ] {
            assert!(!alarm_code_shape_ok(bad), "{bad}");
        }
    }

    #[test]
    fn channels_are_snake_case_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for channel in IMS_CHANNELS {
            assert!(channel
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!(seen.insert(*channel), "{channel} twice");
        }
        assert!(channel_allowed("temperature_c"));
        assert!(!channel_allowed("patient_name"));
    }
}
