//! es-perf: the numbers of esserver, in one place.
//!
//! Owns the latency histograms ([`LatencyRecorder`], HdrHistogram in µs), counters and
//! rates, the device catalog (what each incubator model produces), the licence
//! configuration rules (capacity units, computers), the capacity model (devices -> load)
//! and the response-time targets the load generator checks.
//!
//! It does not depend on the server: the server, the load generator and capacity planning
//! all read the same figures from here.

pub mod capacity;
pub mod catalog;
pub mod config_rules;
pub mod counters;
pub mod latency;
pub mod targets;

pub use capacity::{estimate, LoadEstimate};
pub use catalog::{telemetry_channels, DeviceModel, ModelSpec, TELEMETRY_INTERVAL_S};
pub use config_rules::{check_devices, smallest_fitting, ConfigViolation, Configuration, Usage};
pub use counters::{Counter, Rate, Snapshot};
pub use latency::{LatencyRecorder, LatencySummary, SharedLatency};
pub use targets::{evaluate, target, Target, TargetResult, TARGETS};
