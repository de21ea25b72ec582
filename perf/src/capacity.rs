//! The capacity model: from a list of devices to the load they put on the server.
//!
//! Every figure is derived from the device catalog, so correcting the catalog corrects the
//! model. Rates are means over a full cycle of fully loaded devices; arrivals are bursty
//! (each well's focal stack is captured back to back), so size queues and disks for
//! [`BURST_FACTOR`] times the mean (DOMAIN.md: "size for 3-5 x the mean").

use serde::Serialize;

use crate::catalog::{DeviceModel, TELEMETRY_INTERVAL_S};

/// How much higher than the mean image rate short-term peaks are (DOMAIN.md: 3-5 x).
pub const BURST_FACTOR: f64 = 5.0;

/// The load a set of fully loaded devices puts on the server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LoadEstimate {
    /// Mean images per second.
    pub images_per_s: f64,
    /// Mean image bytes per second.
    pub bytes_per_s: f64,
    /// Images per day.
    pub images_per_day: u64,
    /// Image bytes per day.
    pub bytes_per_day: u64,
    /// Telemetry samples per second (every channel of every device).
    pub telemetry_samples_per_s: f64,
}

impl LoadEstimate {
    /// The image rate to size for short-term peaks: the mean times [`BURST_FACTOR`].
    pub fn images_per_s_peak(&self) -> f64 {
        self.images_per_s * BURST_FACTOR
    }

    /// Seconds to ingest `backlog_images` at `ingest_images_per_s` while the devices keep
    /// producing their normal load; `None` when ingestion cannot outrun production.
    pub fn catch_up_s(&self, backlog_images: u64, ingest_images_per_s: f64) -> Option<f64> {
        let spare_per_s = ingest_images_per_s - self.images_per_s;
        (spare_per_s > 0.0).then(|| backlog_images as f64 / spare_per_s)
    }
}

/// The load of a device list: pairs of (model, number of devices of that model).
pub fn estimate(devices: &[(DeviceModel, u32)]) -> LoadEstimate {
    let channels = crate::catalog::telemetry_channels().len() as f64;
    let telemetry_per_device_s = channels / f64::from(TELEMETRY_INTERVAL_S);
    devices
        .iter()
        .fold(LoadEstimate::default(), |mut load, (model, count)| {
            let spec = model.spec();
            let n = u64::from(*count);
            load.images_per_s += spec.images_per_second() * f64::from(*count);
            load.bytes_per_s += spec.bytes_per_second() * f64::from(*count);
            load.images_per_day += spec.images_per_day() * n;
            load.bytes_per_day += spec.bytes_per_day() * n;
            load.telemetry_samples_per_s += telemetry_per_device_s * f64::from(*count);
            load
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use DeviceModel::*;

    #[test]
    fn one_es_plus_matches_domain_figures() {
        let load = estimate(&[(EmbryoScopePlus, 1)]);
        assert!((load.images_per_s - 4.4).abs() < 1e-9);
        assert!((load.bytes_per_s - 132_000.0).abs() < 1.0);
        assert_eq!(load.images_per_day, 380_160);
    }

    #[test]
    fn full_high_capacity_matches_domain_figures() {
        // DOMAIN.md: about 35-38 images/s, 1.1 MB/s, 3.2 million images and 90-100 GB a day.
        for devices in [[(EmbryoScopePlus, 8)], [(EmbryoScope8, 16)]] {
            let load = estimate(&devices);
            assert!((30.0..40.0).contains(&load.images_per_s), "{load:?}");
            assert!((0.9e6..1.2e6).contains(&load.bytes_per_s), "{load:?}");
            assert!(
                (2_700_000..3_400_000).contains(&load.images_per_day),
                "{load:?}"
            );
            assert!(
                (80e9..105e9).contains(&(load.bytes_per_day as f64)),
                "{load:?}"
            );
        }
    }

    #[test]
    fn telemetry_counts_every_device_including_culturepro() {
        let load = estimate(&[(CulturePro, 2), (EmbryoScopeD, 1)]);
        assert!((load.telemetry_samples_per_s - 0.5).abs() < 1e-9);
        assert!((load.images_per_s - 504.0 / 600.0).abs() < 1e-9);
    }

    #[test]
    fn a_day_of_backlog_catches_up_in_minutes_at_10000_per_s() {
        let load = estimate(&[(EmbryoScopePlus, 8)]);
        let seconds = load.catch_up_s(load.images_per_day, 10_000.0).unwrap();
        assert!((300.0..310.0).contains(&seconds), "{seconds}");
        assert_eq!(load.catch_up_s(1, load.images_per_s), None);
    }
}
