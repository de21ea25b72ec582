//! Field limits of the incubator protocol. A request that breaks one is answered with
//! ERROR invalid_field (the connection stays open); a HELLO that breaks one closes it.

use super::error_code::{error_message, ErrorCode};
use super::message::Message;
use super::pb;

/// Longest identifier or name (serial number, dish id, patient id, embryo id, ...), in bytes.
pub const FIELD_BYTES_MAX: usize = 128;
/// REGISTER_DISH.fertilization_method and DishWell.label: 0..=32 bytes.
pub const SHORT_FIELD_BYTES_MAX: usize = 32;
/// Longest alarm text, in bytes.
pub const ALARM_TEXT_BYTES_MAX: usize = 1024;
/// Lowest well number.
pub const WELL_MIN: u32 = 1;
/// Highest well number, and the most wells one dish may register.
pub const WELL_MAX: u32 = 1024;
/// Lowest focal plane index.
pub const FOCAL_PLANE_MIN: i32 = -1000;
/// Highest focal plane index.
pub const FOCAL_PLANE_MAX: i32 = 1000;
/// Largest JPEG, in bytes (the frame must also fit frame_bytes_max).
pub const JPEG_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most samples in one TELEMETRY.
pub const SAMPLES_PER_TELEMETRY_MAX: usize = 4096;
/// Most alarms in one TELEMETRY.
pub const ALARMS_PER_TELEMETRY_MAX: usize = 256;
/// Page size of LIST_PATIENTS when its limit is 0.
pub const PATIENT_LIST_LIMIT_DEFAULT: u32 = 100;
/// Largest page of LIST_PATIENTS; larger limits count as this.
pub const PATIENT_LIST_LIMIT_MAX: u32 = 1000;

/// A field that breaks a limit of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the field, e.g. `wells[2].embryo_id`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The ERROR invalid_field answer to request `seq`.
    pub fn to_error(&self, seq: u64) -> Message {
        error_message(seq, ErrorCode::InvalidField, self.to_string())
    }
}

type Checked = Result<(), FieldError>;

/// Checks the fields of a HELLO (not its protocol version).
pub fn validate_hello(hello: &pb::Hello) -> Checked {
    required_text("serial_number", &hello.serial_number)?;
    required_text("model", &hello.model)?;
    optional_text("firmware_version", &hello.firmware_version, FIELD_BYTES_MAX)?;
    optional_text("secret", &hello.secret, FIELD_BYTES_MAX)
}

/// Checks the fields of a client request against the protocol's limits. Server-to-client
/// messages and HELLO (see [`validate_hello`]) pass unchecked.
pub fn validate_request(message: &Message) -> Checked {
    match message {
        Message::RegisterDish(register) => validate_register_dish(register),
        Message::Image(image) => validate_image(image),
        Message::Telemetry(telemetry) => validate_telemetry(telemetry),
        Message::SyncState(sync) => required_text("dish_id", &sync.dish_id),
        Message::ListPatients(list) => {
            optional_text("after_patient_id", &list.after_patient_id, FIELD_BYTES_MAX)
        }
        _ => Ok(()),
    }
}

/// The page size a LIST_PATIENTS asks for, after the default and the maximum are applied.
pub fn patient_list_limit(list: &pb::ListPatients) -> u32 {
    match list.limit {
        0 => PATIENT_LIST_LIMIT_DEFAULT,
        limit => limit.min(PATIENT_LIST_LIMIT_MAX),
    }
}

fn validate_register_dish(register: &pb::RegisterDish) -> Checked {
    required_text("dish_id", &register.dish_id)?;
    let Some(patient) = &register.patient else {
        return Err(FieldError::new("patient", "missing"));
    };
    validate_patient(patient)?;
    required_text("treatment_name", &register.treatment_name)?;
    positive_instant("insemination_time_ms", register.insemination_time_ms)?;
    optional_text(
        "fertilization_method",
        &register.fertilization_method,
        SHORT_FIELD_BYTES_MAX,
    )?;
    validate_dish_wells(&register.wells)
}

fn validate_patient(patient: &pb::Patient) -> Checked {
    required_text("patient.patient_id", &patient.patient_id)?;
    optional_text("patient.first_name", &patient.first_name, FIELD_BYTES_MAX)?;
    optional_text("patient.last_name", &patient.last_name, FIELD_BYTES_MAX)?;
    if !patient.date_of_birth.is_empty() && !is_iso_date(&patient.date_of_birth) {
        return Err(FieldError::new(
            "patient.date_of_birth",
            "expected yyyy-mm-dd or empty",
        ));
    }
    Ok(())
}

fn validate_dish_wells(wells: &[pb::DishWell]) -> Checked {
    if wells.is_empty() || wells.len() > WELL_MAX as usize {
        return Err(FieldError::new(
            "wells",
            format!("expected 1..={WELL_MAX} wells"),
        ));
    }
    let mut seen = vec![false; WELL_MAX as usize + 1];
    for (index, dish_well) in wells.iter().enumerate() {
        let field = |name: &str| format!("wells[{index}].{name}");
        check_well(&field("well"), dish_well.well)?;
        required_text(&field("embryo_id"), &dish_well.embryo_id)?;
        optional_text(&field("label"), &dish_well.label, SHORT_FIELD_BYTES_MAX)?;
        let slot = &mut seen[dish_well.well as usize];
        if *slot {
            return Err(FieldError::new(field("well"), "well listed twice"));
        }
        *slot = true;
    }
    Ok(())
}

fn validate_image(image: &pb::Image) -> Checked {
    required_text("dish_id", &image.dish_id)?;
    check_well("well", image.well)?;
    if !(FOCAL_PLANE_MIN..=FOCAL_PLANE_MAX).contains(&image.focal_plane) {
        return Err(FieldError::new(
            "focal_plane",
            format!(
                "{} is outside {FOCAL_PLANE_MIN}..={FOCAL_PLANE_MAX}",
                image.focal_plane
            ),
        ));
    }
    positive_instant("acquired_at_ms", image.acquired_at_ms)?;
    if image.jpeg.is_empty() || image.jpeg.len() > JPEG_BYTES_MAX {
        return Err(FieldError::new(
            "jpeg",
            format!("{} bytes is outside 1..={JPEG_BYTES_MAX}", image.jpeg.len()),
        ));
    }
    Ok(())
}

fn validate_telemetry(telemetry: &pb::Telemetry) -> Checked {
    if telemetry.samples.len() > SAMPLES_PER_TELEMETRY_MAX {
        return Err(FieldError::new(
            "samples",
            format!("more than {SAMPLES_PER_TELEMETRY_MAX} samples"),
        ));
    }
    if telemetry.alarms.len() > ALARMS_PER_TELEMETRY_MAX {
        return Err(FieldError::new(
            "alarms",
            format!("more than {ALARMS_PER_TELEMETRY_MAX} alarms"),
        ));
    }
    for (index, sample) in telemetry.samples.iter().enumerate() {
        validate_sample(index, sample)?;
    }
    for (index, alarm) in telemetry.alarms.iter().enumerate() {
        validate_alarm(index, alarm)?;
    }
    Ok(())
}

fn validate_sample(index: usize, sample: &pb::TelemetrySample) -> Checked {
    required_text(&format!("samples[{index}].channel"), &sample.channel)?;
    if !sample.value.is_finite() {
        return Err(FieldError::new(
            format!("samples[{index}].value"),
            "not a finite number",
        ));
    }
    positive_instant(&format!("samples[{index}].at_ms"), sample.at_ms)
}

fn validate_alarm(index: usize, alarm: &pb::Alarm) -> Checked {
    let field = |name: &str| format!("alarms[{index}].{name}");
    required_text(&field("code"), &alarm.code)?;
    match pb::AlarmSeverity::try_from(alarm.severity) {
        Ok(pb::AlarmSeverity::Unspecified) | Err(_) => {
            return Err(FieldError::new(field("severity"), "expected 1, 2 or 3"));
        }
        Ok(_) => {}
    }
    positive_instant(&field("raised_at_ms"), alarm.raised_at_ms)?;
    if alarm.cleared_at_ms < 0 {
        return Err(FieldError::new(field("cleared_at_ms"), "negative"));
    }
    optional_text(&field("text"), &alarm.text, ALARM_TEXT_BYTES_MAX)
}

fn required_text(field: &str, value: &str) -> Checked {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    optional_text(field, value, FIELD_BYTES_MAX)
}

fn optional_text(field: &str, value: &str, bytes_max: usize) -> Checked {
    if value.len() > bytes_max {
        return Err(FieldError::new(
            field,
            format!("{} bytes is longer than {bytes_max}", value.len()),
        ));
    }
    Ok(())
}

fn check_well(field: &str, well: u32) -> Checked {
    if !(WELL_MIN..=WELL_MAX).contains(&well) {
        return Err(FieldError::new(
            field,
            format!("{well} is outside {WELL_MIN}..={WELL_MAX}"),
        ));
    }
    Ok(())
}

/// Latest instant an instrument may send (Unix ms): the year 2286, as the storage's
/// `limits::INSTANT_MS_MAX`. A later one is a unit mistake (microseconds, say).
pub const INSTANT_MS_MAX: i64 = 10_000_000_000_000;

fn positive_instant(field: &str, at_ms: i64) -> Checked {
    if !(1..=INSTANT_MS_MAX).contains(&at_ms) {
        return Err(FieldError::new(
            field,
            format!(
                "{at_ms} must be a Unix time in ms after 1970 and before 2286 (at most \
                 {INSTANT_MS_MAX})"
            ),
        ));
    }
    Ok(())
}

/// True for `yyyy-mm-dd` with a month 01..=12 and a day 01..=31.
fn is_iso_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits_at = |range: std::ops::Range<usize>| bytes[range].iter().all(u8::is_ascii_digit);
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    if !(digits_at(0..4) && digits_at(5..7) && digits_at(8..10)) {
        return false;
    }
    let number = |range: std::ops::Range<usize>| {
        bytes[range]
            .iter()
            .fold(0u32, |total, digit| total * 10 + u32::from(digit - b'0'))
    };
    (1..=12).contains(&number(5..7)) && (1..=31).contains(&number(8..10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn image() -> pb::Image {
        pb::Image {
            seq: 1,
            dish_id: "D1".into(),
            well: 3,
            focal_plane: -2,
            acquired_at_ms: 1_700_000_000_000,
            jpeg: Bytes::from_static(&[0xff, 0xd8, 0xff, 0xd9]),
        }
    }

    fn register() -> pb::RegisterDish {
        pb::RegisterDish {
            fertilization_method: String::new(),
            seq: 1,
            dish_id: "D1".into(),
            slot: 1,
            patient: Some(pb::Patient {
                patient_id: "MRN1".into(),
                date_of_birth: "1990-02-28".into(),
                ..Default::default()
            }),
            treatment_name: "2022-1411".into(),
            insemination_time_ms: 1_700_000_000_000,
            wells: vec![pb::DishWell {
                label: String::new(),
                well: 1,
                embryo_id: "E1".into(),
            }],
        }
    }

    fn field_of(message: Message) -> String {
        validate_request(&message)
            .expect_err("should be refused")
            .field
    }

    #[test]
    fn valid_requests_pass() {
        assert_eq!(validate_request(&Message::Image(image())), Ok(()));
        assert_eq!(validate_request(&Message::RegisterDish(register())), Ok(()));
    }

    #[test]
    fn image_limits_are_enforced() {
        let mut bad = image();
        bad.well = 0;
        assert_eq!(field_of(Message::Image(bad)), "well");
        let mut bad = image();
        bad.focal_plane = 1001;
        assert_eq!(field_of(Message::Image(bad)), "focal_plane");
        let mut bad = image();
        bad.jpeg = Bytes::new();
        assert_eq!(field_of(Message::Image(bad)), "jpeg");
        let mut bad = image();
        bad.dish_id = "x".repeat(FIELD_BYTES_MAX + 1);
        assert_eq!(field_of(Message::Image(bad)), "dish_id");
        // Microseconds by mistake, or before 1970: refused; the bounds themselves pass.
        for at_ms in [0, -1, 1_700_000_000_000_000, INSTANT_MS_MAX + 1] {
            let mut bad = image();
            bad.acquired_at_ms = at_ms;
            assert_eq!(field_of(Message::Image(bad)), "acquired_at_ms", "{at_ms}");
        }
        for at_ms in [1, INSTANT_MS_MAX] {
            let mut good = image();
            good.acquired_at_ms = at_ms;
            assert!(validate_request(&Message::Image(good)).is_ok(), "{at_ms}");
        }
    }

    #[test]
    fn register_dish_limits_are_enforced() {
        let mut bad = register();
        bad.wells.push(bad.wells[0].clone());
        assert_eq!(field_of(Message::RegisterDish(bad)), "wells[1].well");
        let mut bad = register();
        bad.patient = None;
        assert_eq!(field_of(Message::RegisterDish(bad)), "patient");
        let mut bad = register();
        if let Some(patient) = bad.patient.as_mut() {
            patient.date_of_birth = "1990-13-01".into();
        }
        assert_eq!(
            field_of(Message::RegisterDish(bad)),
            "patient.date_of_birth"
        );
    }

    #[test]
    fn telemetry_rejects_unspecified_severity_and_nan() {
        let alarm = pb::Alarm {
            code: "T1".into(),
            severity: 0,
            raised_at_ms: 1,
            ..Default::default()
        };
        let telemetry = pb::Telemetry {
            seq: 1,
            alarms: vec![alarm],
            ..Default::default()
        };
        assert_eq!(
            field_of(Message::Telemetry(telemetry)),
            "alarms[0].severity"
        );
        let sample = pb::TelemetrySample {
            channel: "temperature_c".into(),
            value: f64::NAN,
            at_ms: 1,
        };
        let telemetry = pb::Telemetry {
            seq: 1,
            samples: vec![sample],
            ..Default::default()
        };
        assert_eq!(field_of(Message::Telemetry(telemetry)), "samples[0].value");
    }

    #[test]
    fn hello_needs_serial_number_and_invalid_field_error_is_built() {
        let hello = pb::Hello {
            model: "es-plus".into(),
            ..Default::default()
        };
        let error = validate_hello(&hello).expect_err("empty serial");
        assert_eq!(error.field, "serial_number");
        let Message::Error(wire) = error.to_error(4) else {
            panic!("not an ERROR");
        };
        assert_eq!((wire.seq, wire.code), (4, ErrorCode::InvalidField.code()));
    }

    #[test]
    fn patient_list_limit_applies_default_and_maximum() {
        let mut list = pb::ListPatients::default();
        assert_eq!(patient_list_limit(&list), PATIENT_LIST_LIMIT_DEFAULT);
        list.limit = 5000;
        assert_eq!(patient_list_limit(&list), PATIENT_LIST_LIMIT_MAX);
        list.limit = 7;
        assert_eq!(patient_list_limit(&list), 7);
    }
}
