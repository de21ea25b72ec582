//! Write requests (`WriteOp`), their outcomes, and input validation against `limits`.

use crate::error::WriteError;
use crate::limits;
use std::collections::BTreeSet;
use std::fmt;

/// An image's bytes with their SHA-256, computed when the value is made: on the thread that
/// received the image (the event loops, in parallel), not on the single storage writer.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageBytes {
    jpeg: bytes::Bytes,
    sha256: [u8; 32],
}

impl ImageBytes {
    pub fn new(jpeg: bytes::Bytes) -> ImageBytes {
        let sha256 = crate::tables::sha256(&jpeg);
        ImageBytes { jpeg, sha256 }
    }

    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    pub fn bytes(&self) -> &bytes::Bytes {
        &self.jpeg
    }
}

impl std::ops::Deref for ImageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.jpeg
    }
}

impl std::fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageBytes({} bytes, sha256 {})",
            self.jpeg.len(),
            hex::encode(self.sha256)
        )
    }
}

/// One write request for the writer thread. See the crate documentation for each op's rules.
pub enum WriteOp {
    /// First message of every incubator connection. Unknown serial: record the instrument, store
    /// the SHA-256 of `new_secret` and issue it. Known serial: `presented_secret` must hash to the
    /// stored hash, else `AuthFailed`; model, firmware and last-seen are updated.
    InstrumentHello {
        serial: String,
        model: String,
        firmware: String,
        presented_secret: Option<String>,
        new_secret: String,
        at_ms: i64,
    },
    /// Admin: forget the secret; the next HELLO of that serial is issued a new one.
    ResetInstrumentSecret { serial: String },
    /// Create or update a culture dish (key: instrument_id + dish_id), creating its patient and
    /// treatment when missing. An embryo id, once assigned to (dish, well), never changes.
    RegisterDish {
        instrument_id: u64,
        dish: DishRegistration,
        at_ms: i64,
    },
    /// Idempotent by (instrument, dish, well, focal_plane, acquired_at_ms).
    PutImage {
        instrument_id: u64,
        dish_id: String,
        well: u32,
        focal_plane: i32,
        acquired_at_ms: i64,
        jpeg: ImageBytes,
        at_ms: i64,
    },
    PutTelemetry {
        instrument_id: u64,
        samples: Vec<TelemetrySample>,
        at_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DishRegistration {
    pub dish_id: String,
    pub slot: u32,
    pub patient: PatientRef,
    pub treatment_name: String,
    pub insemination_at_ms: i64,
    pub wells: Vec<WellRegistration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRef {
    /// The clinic's medical record number.
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    /// `yyyy-mm-dd` or empty.
    pub date_of_birth: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellRegistration {
    pub well: u32,
    pub embryo_id: String,
}

/// One telemetry reading, e.g. channel `temperature_c`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySample {
    pub channel: String,
    pub value: f64,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    InstrumentAccepted {
        instrument_id: u64,
        issued_secret: Option<String>,
    },
    SecretReset {
        existed: bool,
    },
    DishRegistered {
        dish_key: u64,
        created: bool,
        /// False when the registration was already stored exactly as given (a resend).
        changed: bool,
    },
    ImageStored {
        duplicate: bool,
    },
    TelemetryStored {
        samples: u32,
    },
}

impl WriteOp {
    /// The bytes this op adds to a batch, for `batch_bytes_max` (JPEG bytes for images).
    pub fn payload_bytes(&self) -> u64 {
        match self {
            WriteOp::PutImage { jpeg, .. } => jpeg.len() as u64,
            WriteOp::PutTelemetry { samples, .. } => (samples.len() as u64).saturating_mul(32),
            _ => 0,
        }
    }

    /// The request's time (server receive time), if it carries one.
    pub fn at_ms(&self) -> Option<i64> {
        match self {
            WriteOp::InstrumentHello { at_ms, .. }
            | WriteOp::RegisterDish { at_ms, .. }
            | WriteOp::PutImage { at_ms, .. }
            | WriteOp::PutTelemetry { at_ms, .. } => Some(*at_ms),
            WriteOp::ResetInstrumentSecret { .. } => None,
        }
    }

    /// Checks the op against `limits` without touching the database.
    pub fn validate(&self) -> Result<(), WriteError> {
        match self {
            WriteOp::InstrumentHello {
                serial,
                model,
                firmware,
                presented_secret,
                new_secret,
                ..
            } => {
                text("serial", serial, Required::Yes)?;
                text("model", model, Required::No)?;
                text("firmware", firmware, Required::No)?;
                text("new secret", new_secret, Required::Yes)?;
                match presented_secret {
                    Some(secret) => text("presented secret", secret, Required::No),
                    None => Ok(()),
                }
            }
            WriteOp::ResetInstrumentSecret { serial } => text("serial", serial, Required::Yes),
            WriteOp::RegisterDish { dish, .. } => validate_dish(dish),
            WriteOp::PutImage {
                dish_id,
                well,
                focal_plane,
                jpeg,
                ..
            } => {
                text("dish id", dish_id, Required::Yes)?;
                well_number(*well)?;
                if !(limits::FOCAL_PLANE_MIN..=limits::FOCAL_PLANE_MAX).contains(focal_plane) {
                    return Err(invalid(format!(
                        "focal plane {focal_plane} is outside {}..={}",
                        limits::FOCAL_PLANE_MIN,
                        limits::FOCAL_PLANE_MAX
                    )));
                }
                if !(limits::JPEG_BYTES_MIN..=limits::JPEG_BYTES_MAX).contains(&jpeg.len()) {
                    return Err(invalid(format!(
                        "image of {} bytes is outside {}..={} bytes",
                        jpeg.len(),
                        limits::JPEG_BYTES_MIN,
                        limits::JPEG_BYTES_MAX
                    )));
                }
                Ok(())
            }
            WriteOp::PutTelemetry { samples, .. } => validate_telemetry(samples),
        }
    }
}

fn validate_dish(dish: &DishRegistration) -> Result<(), WriteError> {
    text("dish id", &dish.dish_id, Required::Yes)?;
    text("patient id", &dish.patient.patient_id, Required::Yes)?;
    text("first name", &dish.patient.first_name, Required::No)?;
    text("last name", &dish.patient.last_name, Required::No)?;
    date_of_birth(&dish.patient.date_of_birth)?;
    text("treatment name", &dish.treatment_name, Required::Yes)?;
    if dish.wells.len() > limits::WELLS_PER_DISH_MAX {
        return Err(invalid(format!(
            "{} wells exceed the {} wells a dish may have",
            dish.wells.len(),
            limits::WELLS_PER_DISH_MAX
        )));
    }
    let mut wells = BTreeSet::new();
    let mut embryo_ids = BTreeSet::new();
    for well in &dish.wells {
        well_number(well.well)?;
        text("embryo id", &well.embryo_id, Required::Yes)?;
        if !wells.insert(well.well) {
            return Err(invalid(format!("well {} is listed twice", well.well)));
        }
        if !embryo_ids.insert(well.embryo_id.as_str()) {
            return Err(invalid(format!(
                "embryo id {:?} is listed for two wells",
                well.embryo_id
            )));
        }
    }
    Ok(())
}

fn validate_telemetry(samples: &[TelemetrySample]) -> Result<(), WriteError> {
    if samples.len() > limits::TELEMETRY_SAMPLES_PER_OP_MAX {
        return Err(invalid(format!(
            "{} telemetry samples exceed the {} allowed per request",
            samples.len(),
            limits::TELEMETRY_SAMPLES_PER_OP_MAX
        )));
    }
    for sample in samples {
        text("telemetry channel", &sample.channel, Required::Yes)?;
        if !sample.value.is_finite() {
            return Err(invalid(format!(
                "telemetry channel {:?} has a non-finite value",
                sample.channel
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Required {
    Yes,
    No,
}

fn text(what: &str, value: &str, required: Required) -> Result<(), WriteError> {
    if required == Required::Yes && value.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if value.len() > limits::TEXT_BYTES_MAX {
        return Err(invalid(format!(
            "{what} has {} bytes, more than {}",
            value.len(),
            limits::TEXT_BYTES_MAX
        )));
    }
    Ok(())
}

fn well_number(well: u32) -> Result<(), WriteError> {
    if (limits::WELL_MIN..=limits::WELL_MAX).contains(&well) {
        Ok(())
    } else {
        Err(invalid(format!(
            "well {well} is outside {}..={}",
            limits::WELL_MIN,
            limits::WELL_MAX
        )))
    }
}

/// `yyyy-mm-dd` with a plausible month and day, or empty.
fn date_of_birth(value: &str) -> Result<(), WriteError> {
    if value.is_empty() {
        return Ok(());
    }
    let bytes = value.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
    let number = |range: std::ops::Range<usize>| -> u32 {
        value[range].parse().unwrap_or(0) // Digits were checked above.
    };
    if shape_ok && (1..=12).contains(&number(5..7)) && (1..=31).contains(&number(8..10)) {
        Ok(())
    } else {
        Err(invalid(format!(
            "date of birth {value:?} is not yyyy-mm-dd"
        )))
    }
}

fn invalid(message: String) -> WriteError {
    WriteError::InvalidInput(message)
}

/// Compact, secret-free Debug: secrets are never printed and images print their length only.
impl fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteOp::InstrumentHello {
                serial,
                model,
                firmware,
                presented_secret,
                at_ms,
                ..
            } => f
                .debug_struct("InstrumentHello")
                .field("serial", serial)
                .field("model", model)
                .field("firmware", firmware)
                .field(
                    "presented_secret",
                    &presented_secret.as_ref().map(|_| "<redacted>"),
                )
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::ResetInstrumentSecret { serial } => f
                .debug_struct("ResetInstrumentSecret")
                .field("serial", serial)
                .finish(),
            WriteOp::RegisterDish {
                instrument_id,
                dish,
                at_ms,
            } => f
                .debug_struct("RegisterDish")
                .field("instrument_id", instrument_id)
                .field("dish_id", &dish.dish_id)
                .field("wells", &dish.wells.len())
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::PutImage {
                instrument_id,
                dish_id,
                well,
                focal_plane,
                acquired_at_ms,
                jpeg,
                at_ms,
            } => f
                .debug_struct("PutImage")
                .field("instrument_id", instrument_id)
                .field("dish_id", dish_id)
                .field("well", well)
                .field("focal_plane", focal_plane)
                .field("acquired_at_ms", acquired_at_ms)
                .field("jpeg_bytes", &jpeg.len())
                .field("at_ms", at_ms)
                .finish(),
            WriteOp::PutTelemetry {
                instrument_id,
                samples,
                at_ms,
            } => f
                .debug_struct("PutTelemetry")
                .field("instrument_id", instrument_id)
                .field("samples", &samples.len())
                .field("at_ms", at_ms)
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(well: u32, focal_plane: i32, jpeg_bytes: usize) -> WriteOp {
        WriteOp::PutImage {
            instrument_id: 1,
            dish_id: "D1".into(),
            well,
            focal_plane,
            acquired_at_ms: 0,
            jpeg: ImageBytes::new(bytes::Bytes::from(vec![1u8; jpeg_bytes])),
            at_ms: 0,
        }
    }

    #[test]
    fn image_bounds() {
        assert!(image(1, 0, 1).validate().is_ok());
        assert!(image(1024, 1000, 1).validate().is_ok());
        assert!(image(1, -1000, limits::JPEG_BYTES_MAX).validate().is_ok());
        for op in [
            image(0, 0, 1),
            image(1025, 0, 1),
            image(1, 1001, 1),
            image(1, -1001, 1),
            image(1, 0, 0),
            image(1, 0, limits::JPEG_BYTES_MAX + 1),
        ] {
            assert_eq!(op.validate().unwrap_err().code(), "invalid_input", "{op:?}");
        }
    }

    #[test]
    fn dates_of_birth() {
        for good in ["", "1985-02-28", "2000-12-31"] {
            assert!(date_of_birth(good).is_ok(), "{good}");
        }
        for bad in [
            "1985.02.28",
            "1985-13-01",
            "1985-00-10",
            "85-02-28",
            "1985-02-2x",
        ] {
            assert!(date_of_birth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let op = WriteOp::InstrumentHello {
            serial: "S1".into(),
            model: "M".into(),
            firmware: "F".into(),
            presented_secret: Some("hunter2-presented".into()),
            new_secret: "hunter2-new".into(),
            at_ms: 0,
        };
        let text = format!("{op:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("S1"));
    }

    #[test]
    fn long_text_is_refused() {
        let op = WriteOp::ResetInstrumentSecret {
            serial: "x".repeat(limits::TEXT_BYTES_MAX + 1),
        };
        assert!(matches!(op.validate(), Err(WriteError::InvalidInput(_))));
    }
}
