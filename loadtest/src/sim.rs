//! Simulated incubators: which dishes an instrument of a model holds, which images one
//! acquisition cycle makes, and the upload loop that sends them over the real protocol,
//! open-loop (each image has an intended send time, and its ack latency is measured from
//! that time, so a slow server cannot hide behind a slow sender) or as fast as the
//! server's in-flight window allows.

use crate::client::{ClientError, IncubatorClient};
use bytes::Bytes;
use es_perf::catalog::DeviceModel;
use es_perf::latency::LatencyRecorder;
use es_proto::incubator::{pb, Message};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The images of one simulated instrument: `cycles` acquisition cycles over every well of
/// every dish, at every focal plane of the model.
#[derive(Debug, Clone)]
pub struct Workload {
    pub serial: String,
    pub model: DeviceModel,
    pub dishes: u32,
    pub wells_per_dish: u32,
    pub planes: Vec<i32>,
    pub cycles: u32,
    /// Acquisition time of cycle 0 (Unix ms).
    pub start_ms: i64,
    pub interval_ms: i64,
}

/// One image's identity (its idempotency key on the server, with the instrument).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageSpec {
    pub dish_id: String,
    pub well: u32,
    pub focal_plane: i32,
    pub acquired_at_ms: i64,
}

impl Workload {
    /// A fully loaded instrument of `model`, as the device catalog describes it.
    pub fn full(serial: &str, model: DeviceModel, cycles: u32, start_ms: i64) -> Workload {
        let spec = model.spec();
        Workload {
            serial: serial.to_string(),
            model,
            dishes: spec.dishes,
            wells_per_dish: spec.wells_per_dish,
            planes: spec.focal_planes.to_vec(),
            cycles,
            start_ms,
            interval_ms: spec.interval_s as i64 * 1000,
        }
    }

    pub fn images_per_cycle(&self) -> u64 {
        self.dishes as u64 * self.wells_per_dish as u64 * self.planes.len() as u64
    }

    pub fn len(&self) -> u64 {
        self.images_per_cycle() * self.cycles as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dish_id(&self, dish: u32) -> String {
        format!("{}-D{}", self.serial, dish + 1)
    }

    /// The `index`-th image in capture order: cycle, then dish, well, focal plane (each
    /// well's focal stack back to back, as instruments capture them).
    pub fn image(&self, index: u64) -> ImageSpec {
        assert!(index < self.len(), "image index out of the workload");
        let planes = self.planes.len() as u64;
        let per_dish = self.wells_per_dish as u64 * planes;
        let cycle = index / self.images_per_cycle();
        let within = index % self.images_per_cycle();
        let dish = (within / per_dish) as u32;
        let well = ((within % per_dish) / planes) as u32 + 1;
        let plane = self.planes[(within % planes) as usize];
        // Wells of a cycle are captured a few seconds apart; their times differ.
        let acquired_at_ms = self.start_ms
            + cycle as i64 * self.interval_ms
            + (dish * self.wells_per_dish + well) as i64 * 1000;
        ImageSpec {
            dish_id: self.dish_id(dish),
            well,
            focal_plane: plane,
            acquired_at_ms,
        }
    }

    /// The REGISTER_DISH messages of every dish (a patient and treatment per dish).
    pub fn dish_registrations(&self) -> Vec<pb::RegisterDish> {
        (0..self.dishes)
            .map(|dish| pb::RegisterDish {
                seq: 0,
                dish_id: self.dish_id(dish),
                slot: dish + 1,
                patient: Some(pb::Patient {
                    patient_id: format!("MRN-{}-{}", self.serial, dish + 1),
                    first_name: format!("Test{}", dish + 1),
                    last_name: format!("Patient{}", self.serial),
                    date_of_birth: "1988-04-12".into(),
                }),
                treatment_name: format!("2026-{}", 1000 + dish),
                insemination_time_ms: self.start_ms - 3_600_000,
                wells: (1..=self.wells_per_dish)
                    .map(|well| pb::DishWell {
                        well,
                        embryo_id: format!("{}_S{}_P-{}", self.serial, dish + 1, well),
                        label: String::new(),
                    })
                    .collect(),
                fertilization_method: "ICSI".into(),
            })
            .collect()
    }
}

/// Registers every dish of the workload, waiting for each ACK.
pub fn register_dishes(
    client: &mut IncubatorClient,
    workload: &Workload,
    timeout: Duration,
) -> Result<(), ClientError> {
    for dish in workload.dish_registrations() {
        match client.request(Message::RegisterDish(dish), timeout)? {
            Message::Ack(_) => {}
            other => return Err(crate::client::server_error(0, other)),
        }
    }
    Ok(())
}

/// How sends are paced.
#[derive(Debug, Clone, Copy)]
pub enum Pacing {
    /// Image `i` is due at `start + i * interval`; latency counts from that time.
    OpenLoop { start: Instant, interval: Duration },
    /// As fast as the server's in-flight window allows; latency counts from the send.
    Window,
}

/// What one upload run did.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub sent: u64,
    pub acked: u64,
    pub duplicates: u64,
    pub bytes_acked: u64,
    /// ERROR answers by error name.
    pub errors: BTreeMap<String, u64>,
    pub latency: LatencyRecorder,
    /// Workload indexes acknowledged, in ack order.
    pub acked_indexes: Vec<u64>,
    pub elapsed: Duration,
    /// TELEMETRY messages sent and acknowledged, and alarms raised in them.
    pub telemetry_sent: u64,
    pub telemetry_acked: u64,
    pub alarms_sent: u64,
}

/// When a simulated device sends TELEMETRY: message `n` is due at `start + n * interval`
/// and carries the samples of simulated minute `n` (from `start_ms`).
#[derive(Debug, Clone, Copy)]
pub struct TelemetryPacing {
    pub start: Instant,
    pub interval: Duration,
    pub start_ms: i64,
}

/// The `n`-th TELEMETRY message of a device: one sample of each of the catalog's telemetry
/// channels, and every [`es_perf::catalog::ALARM_INTERVAL_S`] an alarm, raised in one
/// message and cleared in the next.
pub fn telemetry_message(n: u64, start_ms: i64) -> pb::Telemetry {
    use es_perf::catalog::{telemetry_channels, ALARM_CODE_SIMULATED, ALARM_INTERVAL_S};
    let interval_ms = i64::from(es_perf::catalog::TELEMETRY_INTERVAL_S) * 1000;
    let at_ms = start_ms + n as i64 * interval_ms;
    let samples = telemetry_channels()
        .iter()
        .enumerate()
        .map(|(c, channel)| pb::TelemetrySample {
            channel: channel.to_string(),
            value: 37.0 + ((n + c as u64) % 7) as f64 / 10.0,
            at_ms,
        })
        .collect();
    let per_alarm = u64::from(ALARM_INTERVAL_S / es_perf::catalog::TELEMETRY_INTERVAL_S).max(2);
    let alarms = match n % per_alarm {
        0 => vec![(at_ms, 0)],
        1 => vec![(at_ms - interval_ms, at_ms)],
        _ => vec![],
    }
    .into_iter()
    .map(|(raised_at_ms, cleared_at_ms)| pb::Alarm {
        code: ALARM_CODE_SIMULATED.into(),
        severity: pb::AlarmSeverity::Warning.into(),
        raised_at_ms,
        cleared_at_ms,
        text: "door opened".into(),
    })
    .collect();
    pb::Telemetry {
        seq: 0,
        samples,
        alarms,
    }
}

/// Uploads workload images `from..to` (frames chosen by index), stopping early at
/// `deadline`; returns what was acknowledged. A connection error ends the run with the
/// stats so far and the error.
pub fn upload(
    client: &mut IncubatorClient,
    workload: &Workload,
    range: std::ops::Range<u64>,
    frames: &[Bytes],
    pacing: Pacing,
    deadline: Instant,
) -> (UploadStats, Option<ClientError>) {
    upload_with_progress(
        client, workload, range, frames, pacing, deadline, None, None,
    )
}

/// Live figures shared by the upload threads of a run, read by its progress display.
#[derive(Debug, Default)]
pub struct Progress {
    /// Images sent and acknowledged so far.
    pub sent: std::sync::atomic::AtomicU64,
    pub acked: std::sync::atomic::AtomicU64,
    /// ERROR answers so far.
    pub errors: std::sync::atomic::AtomicU64,
    /// Ack latencies since the display last took them.
    pub window: parking_lot::Mutex<LatencyRecorder>,
    /// Set to end the uploads before their deadline (what is in flight is still awaited).
    pub stop: std::sync::atomic::AtomicBool,
}

/// [`upload`], also counting into `progress`, and sending TELEMETRY as `telemetry` paces it
/// while images are sent (a device with no images to send: until `deadline`).
#[allow(clippy::too_many_arguments)]
pub fn upload_with_progress(
    client: &mut IncubatorClient,
    workload: &Workload,
    range: std::ops::Range<u64>,
    frames: &[Bytes],
    pacing: Pacing,
    deadline: Instant,
    progress: Option<&Progress>,
    telemetry: Option<TelemetryPacing>,
) -> (UploadStats, Option<ClientError>) {
    use std::sync::atomic::Ordering::Relaxed;
    let started = Instant::now();
    let mut stats = UploadStats::default();
    let mut in_flight: HashMap<u64, (u64, Instant, usize)> = HashMap::new();
    let mut telemetry_in_flight: std::collections::HashSet<u64> = Default::default();
    let mut telemetry_next = 0u64;
    let mut telemetry = telemetry;
    let mut next = range.start;
    let error = loop {
        let now = Instant::now();
        let idle = in_flight.is_empty() && telemetry_in_flight.is_empty();
        // A device with images is done when they are; one without (CulturePro) sends
        // telemetry until the deadline.
        let images_done = next >= range.end && (!range.is_empty() || telemetry.is_none());
        if now >= deadline || (images_done && idle) {
            break None;
        }
        if progress.is_some_and(|p| p.stop.load(Relaxed)) {
            if idle {
                break None;
            }
            next = range.end;
            telemetry = None;
        }
        // TELEMETRY that is due goes first: it is small.
        while let Some(pacing) = telemetry {
            if pacing.start + pacing.interval * telemetry_next as u32 > Instant::now()
                || !client.can_send()
            {
                break;
            }
            let message = telemetry_message(telemetry_next, pacing.start_ms);
            stats.alarms_sent += message.alarms.len() as u64;
            let seq = client.send(Message::Telemetry(message));
            telemetry_in_flight.insert(seq);
            stats.telemetry_sent += 1;
            telemetry_next += 1;
        }
        // Send everything that is due, within the server's window.
        while next < range.end && client.can_send() {
            let due = match pacing {
                Pacing::OpenLoop { start, interval } => {
                    start + interval * (next - range.start) as u32
                }
                Pacing::Window => now,
            };
            if due > Instant::now() {
                break;
            }
            let spec = workload.image(next);
            let frame = frames[(next % frames.len() as u64) as usize].clone();
            let size = frame.len();
            let seq = client.send(Message::Image(pb::Image {
                seq: 0,
                dish_id: spec.dish_id,
                well: spec.well,
                focal_plane: spec.focal_plane,
                acquired_at_ms: spec.acquired_at_ms,
                jpeg: frame,
            }));
            let measured_from = match pacing {
                Pacing::OpenLoop { .. } => due,
                Pacing::Window => Instant::now(),
            };
            in_flight.insert(seq, (next, measured_from, size));
            stats.sent += 1;
            if let Some(progress) = progress {
                progress.sent.fetch_add(1, Relaxed);
            }
            next += 1;
        }
        let wait_until = match pacing {
            Pacing::OpenLoop { start, interval } if next < range.end && client.can_send() => {
                (start + interval * (next - range.start) as u32).min(deadline)
            }
            _ => (Instant::now() + Duration::from_millis(50)).min(deadline),
        };
        let wait_until = match telemetry {
            Some(pacing) if client.can_send() => {
                wait_until.min(pacing.start + pacing.interval * telemetry_next as u32)
            }
            _ => wait_until,
        };
        match client.next_response(wait_until) {
            Ok(None) => {}
            Ok(Some((seq, message))) => {
                if telemetry_in_flight.remove(&seq) {
                    match message {
                        Message::Ack(_) => stats.telemetry_acked += 1,
                        Message::Error(error) => {
                            *stats
                                .errors
                                .entry(format!("telemetry {}", error.name))
                                .or_default() += 1
                        }
                        _ => {
                            *stats
                                .errors
                                .entry("telemetry unexpected_response".into())
                                .or_default() += 1
                        }
                    }
                    continue;
                }
                let Some((index, from, size)) = in_flight.remove(&seq) else {
                    continue;
                };
                match message {
                    Message::Ack(ack) => {
                        let latency = Instant::now().saturating_duration_since(from);
                        stats.latency.record(latency);
                        if let Some(progress) = progress {
                            progress.acked.fetch_add(1, Relaxed);
                            progress.window.lock().record(latency);
                        }
                        stats.acked += 1;
                        stats.bytes_acked += size as u64;
                        stats.duplicates += ack.duplicate as u64;
                        stats.acked_indexes.push(index);
                    }
                    Message::Error(error) => {
                        if let Some(progress) = progress {
                            progress.errors.fetch_add(1, Relaxed);
                        }
                        *stats.errors.entry(error.name).or_default() += 1
                    }
                    _ => {
                        *stats
                            .errors
                            .entry("unexpected_response".into())
                            .or_default() += 1
                    }
                }
            }
            Err(error) => break Some(error),
        }
    };
    stats.elapsed = started.elapsed();
    (stats, error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_carries_the_catalog_channels_and_an_hourly_alarm_raised_then_cleared() {
        let start_ms = 1_770_000_000_000;
        let first = telemetry_message(0, start_ms);
        let channels: Vec<&str> = first.samples.iter().map(|s| s.channel.as_str()).collect();
        assert_eq!(channels, es_perf::catalog::telemetry_channels());
        assert!(first.samples.iter().all(|s| s.at_ms == start_ms));
        assert_eq!(first.alarms.len(), 1);
        assert_eq!(first.alarms[0].code, es_perf::catalog::ALARM_CODE_SIMULATED);
        assert_eq!(first.alarms[0].cleared_at_ms, 0);
        // The next minute clears it: same code and raise time.
        let second = telemetry_message(1, start_ms);
        assert_eq!(second.alarms.len(), 1);
        assert_eq!(second.alarms[0].raised_at_ms, start_ms);
        assert_eq!(second.alarms[0].cleared_at_ms, start_ms + 60_000);
        // One alarm an hour: none in the other minutes.
        let raised: usize = (0..120)
            .map(|n| {
                telemetry_message(n, start_ms)
                    .alarms
                    .iter()
                    .filter(|a| a.cleared_at_ms == 0)
                    .count()
            })
            .sum();
        assert_eq!(raised, 2);
        // The code is one the monitoring upload accepts for every model.
        for model in es_perf::catalog::DeviceModel::ALL {
            assert!(model
                .spec()
                .alarm_codes
                .contains(&es_perf::catalog::ALARM_CODE_SIMULATED));
        }
    }
}
