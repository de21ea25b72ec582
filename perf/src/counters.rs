//! Counters and per-second rates between two snapshots of a counter.
//!
//! Time is passed in: a snapshot takes the instant it is taken at, so tests control it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A monotonically increasing count, shared between threads without a lock.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero (usable in a `static`).
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Adds `amount`; wraps at `u64::MAX`, which [`rate_per_s`] tolerates.
    pub fn add(&self, amount: u64) {
        self.0.fetch_add(amount, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn increment(&self) {
        self.add(1);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The current count, stamped with `now`.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        Snapshot {
            value: self.get(),
            at: now,
        }
    }
}

/// A counter's value at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The count.
    pub value: u64,
    /// When it was read.
    pub at: Instant,
}

/// Events per second between two snapshots; 0 when no time passed.
pub fn rate_per_s(earlier: Snapshot, later: Snapshot) -> f64 {
    let elapsed_s = later.at.saturating_duration_since(earlier.at).as_secs_f64();
    if elapsed_s == 0.0 {
        return 0.0;
    }
    later.value.wrapping_sub(earlier.value) as f64 / elapsed_s
}

/// Turns a series of snapshots into rates over each interval between them.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    previous: Option<Snapshot>,
}

impl Rate {
    /// A rate with no snapshot yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a snapshot; returns the rate since the previous one (`None` for the first).
    pub fn observe(&mut self, snapshot: Snapshot) -> Option<f64> {
        let rate = self.previous.map(|previous| rate_per_s(previous, snapshot));
        self.previous = Some(snapshot);
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counter_adds() {
        static COUNTER: Counter = Counter::new();
        COUNTER.add(5);
        COUNTER.increment();
        assert_eq!(COUNTER.get(), 6);
    }

    #[test]
    fn rate_between_snapshots() {
        let counter = Counter::new();
        let start = Instant::now();
        let mut rate = Rate::new();
        assert_eq!(rate.observe(counter.snapshot(start)), None);
        counter.add(500);
        let later = start + Duration::from_millis(250);
        assert_eq!(rate.observe(counter.snapshot(later)), Some(2000.0));
        assert_eq!(rate.observe(counter.snapshot(later)), Some(0.0));
    }

    #[test]
    fn rate_survives_wrap_around() {
        let start = Instant::now();
        let earlier = Snapshot {
            value: u64::MAX - 1,
            at: start,
        };
        let later = Snapshot {
            value: 8,
            at: start + Duration::from_secs(1),
        };
        assert_eq!(rate_per_s(earlier, later), 10.0);
    }
}
