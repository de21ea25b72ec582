//! Latency histograms: HdrHistogram in microseconds, from 1 µs to 60 s, 3 significant
//! digits (a recorded value is within 0.1 % of the true one).

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Smallest value told apart from zero, in µs.
const LATENCY_US_MIN: u64 = 1;
/// Largest value recorded, in µs; larger ones are recorded as this (60 s).
pub const LATENCY_US_MAX: u64 = 60_000_000;
/// Significant decimal digits kept.
const SIGNIFICANT_DIGITS: u8 = 3;
/// Steps per halving of the distance to 100 % in [`LatencyRecorder::percentile_curve`].
const CURVE_TICKS_PER_HALF_DISTANCE: u32 = 5;

/// A latency histogram shared between threads.
pub type SharedLatency = parking_lot::Mutex<LatencyRecorder>;

/// Records latencies in microseconds.
#[derive(Clone, Debug)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
}

/// The usual figures of a latency distribution, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value.
    pub max_us: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        let histogram =
            Histogram::new_with_bounds(LATENCY_US_MIN, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid");
        Self { histogram }
    }

    /// Records one latency in µs; values above [`LATENCY_US_MAX`] are recorded as the maximum.
    pub fn record_us(&mut self, latency_us: u64) {
        self.histogram
            .saturating_record(latency_us.min(LATENCY_US_MAX));
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.record_us(latency_us);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &LatencyRecorder) {
        self.histogram
            .add(&other.histogram)
            .expect("recorders share their bounds, so adding cannot overflow them");
    }

    /// Forgets every value.
    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at quantile `quantile` (0.0..=1.0) in µs; 0 when empty.
    pub fn value_at_quantile(&self, quantile: f64) -> u64 {
        if self.histogram.is_empty() {
            return 0;
        }
        self.histogram.value_at_quantile(quantile.clamp(0.0, 1.0))
    }

    /// The largest value in µs; 0 when empty.
    pub fn max_us(&self) -> u64 {
        self.histogram.max()
    }

    /// The mean in µs; 0 when empty.
    pub fn mean_us(&self) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.mean()
    }

    /// Count, percentiles, maximum and mean.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50_us: self.value_at_quantile(0.5),
            p90_us: self.value_at_quantile(0.9),
            p99_us: self.value_at_quantile(0.99),
            p999_us: self.value_at_quantile(0.999),
            max_us: self.max_us(),
            mean_us: self.mean_us(),
        }
    }

    /// (percentile 0..=100, value in µs) points for a percentile plot, denser towards
    /// 100 % (HdrHistogram's usual log-scale steps); empty when nothing was recorded.
    pub fn percentile_curve(&self) -> Vec<(f64, u64)> {
        if self.histogram.is_empty() {
            return Vec::new();
        }
        self.histogram
            .iter_quantiles(CURVE_TICKS_PER_HALF_DISTANCE)
            .map(|step| (step.percentile(), step.value_iterated_to()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_to(n: u64) -> LatencyRecorder {
        let mut recorder = LatencyRecorder::new();
        for value in 1..=n {
            recorder.record_us(value);
        }
        recorder
    }

    #[test]
    fn quantiles_of_1_to_1000() {
        let summary = one_to(1000).summary();
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p90_us, 900);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
        assert!((summary.mean_us - 500.5).abs() < 0.5);
    }

    #[test]
    fn large_values_keep_three_digits() {
        let mut recorder = LatencyRecorder::new();
        recorder.record(Duration::from_millis(1234));
        let value = recorder.value_at_quantile(1.0);
        assert!(value.abs_diff(1_234_000) <= 1_234, "{value}");
    }

    #[test]
    fn values_above_60_s_saturate() {
        let mut recorder = LatencyRecorder::new();
        recorder.record(Duration::from_secs(3600));
        recorder.record_us(u64::MAX);
        assert_eq!(recorder.count(), 2);
        assert!(recorder.max_us() >= LATENCY_US_MAX);
        assert!(recorder.max_us() <= LATENCY_US_MAX + LATENCY_US_MAX / 1000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = one_to(100);
        a.merge(&one_to(100));
        assert_eq!(a.count(), 200);
        assert_eq!(a.value_at_quantile(0.5), 50);
    }

    #[test]
    fn empty_recorder_reports_zeros() {
        let recorder = LatencyRecorder::new();
        assert_eq!(recorder.summary(), LatencySummary::default());
        assert!(recorder.percentile_curve().is_empty());
    }

    #[test]
    fn percentile_curve_rises_to_the_maximum() {
        let curve = one_to(1000).percentile_curve();
        assert!(curve.len() > 10);
        assert!(curve
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = curve.last().unwrap();
        assert_eq!(*last, (100.0, 1000));
    }

    #[test]
    fn shared_latency_records_from_a_reference() {
        let shared = SharedLatency::default();
        shared.lock().record_us(7);
        assert_eq!(shared.lock().count(), 1);
    }
}
