//! Response-time and throughput targets, written once. The load generator measures each
//! operation, evaluates it here, and reports pass or fail per limit.
//!
//! Latencies are measured open-loop from the intended send time (no coordinated omission),
//! on the reference hardware of MISSION.md §2 (3 GHz quad-core, 8 GB RAM).

use std::fmt;

use serde::Serialize;

use crate::latency::LatencySummary;

/// The limits one operation must meet; `None` where the operation has no such limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// The operation's stable name, as the load generator reports it.
    pub operation: &'static str,
    /// Largest allowed median latency, ms.
    pub p50_ms_max: Option<f64>,
    /// Largest allowed 99th-percentile latency, ms.
    pub p99_ms_max: Option<f64>,
    /// Largest allowed 99.9th-percentile latency, ms.
    pub p999_ms_max: Option<f64>,
    /// Smallest allowed throughput, operations per second.
    pub throughput_per_s_min: Option<f64>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    // An incubator's image upload until its acknowledgement, which is sent only once the
    // image is durable (DESIGN.md, rule 1: group commit and fsync included), with devices
    // sending at their real rates (a full high-capacity site: about 35-38 images/s, bursts
    // 3-5 x that; DOMAIN.md). Figures set by the project owner for this server: the median
    // leaves room for one fsync of a group commit, the tail for occasional disk stalls.
    Target {
        operation: "image_ack",
        p50_ms_max: Some(5.0),
        p99_ms_max: Some(10.0),
        p999_ms_max: Some(50.0),
        throughput_per_s_min: None,
    },
    // Images made durable per second while incubators upload as fast as they can (the
    // backlog after an outage). Set by the project owner; it turns a day's backlog of a full
    // high-capacity site (about 3 million images, DOMAIN.md) into about 5 minutes of
    // catch-up, and is about 270 x the mean rate of that site.
    Target {
        operation: "image_ingest_sustained",
        p50_ms_max: None,
        p99_ms_max: None,
        p999_ms_max: None,
        throughput_per_s_min: Some(10_000.0),
    },
    // A viewer's request (a page of embryo data or one image) until its answer, with four
    // viewer computers (high-capacity) working while images arrive. Our engineering choice,
    // not from the manual: 100 ms keeps an interactive viewer feeling immediate.
    Target {
        operation: "viewer_request",
        p50_ms_max: Some(20.0),
        p99_ms_max: Some(100.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // The viewer targets of the viewer issue, with 4 viewers and the high-capacity incubators
    // at 100 x nominal: one image fetched (GetImage) until its bytes arrive.
    Target {
        operation: "viewer_frame_fetch",
        p50_ms_max: None,
        p99_ms_max: Some(10.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // An annotation save until Saved, which is sent once the save is durable.
    Target {
        operation: "viewer_annotation_save",
        p50_ms_max: None,
        p99_ms_max: Some(20.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // A change from the save request to its notice arriving at the other viewers (an upper
    // bound of commit to arrival: it includes the commit).
    Target {
        operation: "viewer_change_push",
        p50_ms_max: None,
        p99_ms_max: Some(50.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // Time-lapse playback to one viewer, frames per second.
    Target {
        operation: "viewer_playback",
        p50_ms_max: None,
        p99_ms_max: None,
        p999_ms_max: None,
        throughput_per_s_min: Some(1000.0),
    },
    // The browser viewer issue's targets, with 8 EmbryoScope+ at 10 x nominal: an embryo
    // opened (its data, then its latest frame) until that frame's bytes are in, over TLS ...
    Target {
        operation: "browser_first_frame",
        p50_ms_max: None,
        p99_ms_max: Some(300.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // ... and every playback at 15 frames/s with the page's prefetch window holds that rate
    // (the lowest playback's frames per second).
    Target {
        operation: "browser_playback",
        p50_ms_max: None,
        p99_ms_max: None,
        p999_ms_max: None,
        throughput_per_s_min: Some(15.0),
    },
    // A Public API request (JSON answers; not the ZIP of all images) with EMR clients at
    // their usual 10 requests/s each (DOMAIN.md). Our engineering choice, not from the
    // manual: such clients are batch integrations that retry, so only the tail is bounded.
    Target {
        operation: "public_api_request",
        p50_ms_max: Some(50.0),
        p99_ms_max: Some(500.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // The public API issue's targets, with the high-capacity incubators at 100 x nominal: a
    // JSON GET (patient list, embryo data, change feed) until its whole answer arrives ...
    Target {
        operation: "api_get",
        p50_ms_max: None,
        p99_ms_max: Some(20.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
    // ... and one image (JPEG) until its bytes arrive.
    Target {
        operation: "api_image",
        p50_ms_max: None,
        p99_ms_max: Some(20.0),
        p999_ms_max: None,
        throughput_per_s_min: None,
    },
];

/// The target of `operation`, if there is one.
pub fn target(operation: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.operation == operation)
}

/// One limit of a target checked against a measurement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TargetResult {
    /// `<operation>.<figure>_<unit>_<max|min>`, e.g. `image_ack.p99_ms_max`.
    pub name: String,
    /// The limit.
    pub limit: f64,
    /// The measured value.
    pub measured: f64,
    /// True when the measurement meets the limit.
    pub pass: bool,
}

impl fmt::Display for TargetResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass { "pass" } else { "FAIL" };
        write!(
            f,
            "{}: measured {:.3}, limit {:.3}: {verdict}",
            self.name, self.measured, self.limit
        )
    }
}

/// Checks every limit of `target`. Latency limits fail when nothing was measured
/// (`latency.count == 0`), so a run that recorded nothing cannot pass.
pub fn evaluate(
    target: &Target,
    latency: &LatencySummary,
    throughput_per_s: f64,
) -> Vec<TargetResult> {
    let latency_limits = [
        ("p50_ms_max", target.p50_ms_max, latency.p50_us),
        ("p99_ms_max", target.p99_ms_max, latency.p99_us),
        ("p999_ms_max", target.p999_ms_max, latency.p999_us),
    ];
    let mut results: Vec<TargetResult> = latency_limits
        .into_iter()
        .filter_map(|(figure, limit, measured_us)| {
            let limit = limit?;
            let measured = measured_us as f64 / 1000.0;
            let pass = latency.count > 0 && measured <= limit;
            Some(result(target, figure, limit, measured, pass))
        })
        .collect();
    if let Some(limit) = target.throughput_per_s_min {
        let pass = throughput_per_s >= limit;
        results.push(result(
            target,
            "throughput_per_s_min",
            limit,
            throughput_per_s,
            pass,
        ));
    }
    results
}

fn result(target: &Target, figure: &str, limit: f64, measured: f64, pass: bool) -> TargetResult {
    TargetResult {
        name: format!("{}.{figure}", target.operation),
        limit,
        measured,
        pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(p50_us: u64, p99_us: u64, p999_us: u64) -> LatencySummary {
        LatencySummary {
            count: 1000,
            p50_us,
            p90_us: p50_us,
            p99_us,
            p999_us,
            max_us: p999_us,
            mean_us: p50_us as f64,
        }
    }

    #[test]
    fn image_ack_and_ingest_targets_are_written_down() {
        let ack = target("image_ack").unwrap();
        assert_eq!(
            (ack.p50_ms_max, ack.p99_ms_max, ack.p999_ms_max),
            (Some(5.0), Some(10.0), Some(50.0))
        );
        let ingest = target("image_ingest_sustained").unwrap();
        assert_eq!(ingest.throughput_per_s_min, Some(10_000.0));
        assert_eq!(target("no_such_operation"), None);
    }

    #[test]
    fn operation_names_are_unique() {
        for (i, a) in TARGETS.iter().enumerate() {
            assert!(TARGETS[i + 1..].iter().all(|b| b.operation != a.operation));
        }
    }

    #[test]
    fn fast_acks_pass() {
        let results = evaluate(
            target("image_ack").unwrap(),
            &summary(2_000, 8_000, 40_000),
            0.0,
        );
        assert_eq!(results.len(), 3);
        assert!(results.iter().all(|r| r.pass), "{results:?}");
        assert_eq!(results[1].name, "image_ack.p99_ms_max");
        assert_eq!(results[1].measured, 8.0);
    }

    #[test]
    fn slow_tail_fails_only_its_limit() {
        let results = evaluate(
            target("image_ack").unwrap(),
            &summary(2_000, 12_000, 40_000),
            0.0,
        );
        let failed: Vec<&str> = results
            .iter()
            .filter(|r| !r.pass)
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(failed, ["image_ack.p99_ms_max"]);
        assert!(results[1].to_string().ends_with("FAIL"), "{}", results[1]);
    }

    #[test]
    fn throughput_passes_at_and_fails_below_the_minimum() {
        let ingest = target("image_ingest_sustained").unwrap();
        let at = evaluate(ingest, &LatencySummary::default(), 10_000.0);
        assert_eq!(at.len(), 1);
        assert!(at[0].pass);
        assert!(!evaluate(ingest, &LatencySummary::default(), 9_999.0)[0].pass);
    }

    #[test]
    fn nothing_measured_fails_latency_limits() {
        let results = evaluate(
            target("image_ack").unwrap(),
            &LatencySummary::default(),
            0.0,
        );
        assert!(results.iter().all(|r| !r.pass));
    }
}
