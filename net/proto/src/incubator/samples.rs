//! One realistic example message of each type: the frames shown in
//! `docs/protocol/incubator.md`, and fixtures for tests and simulators.

use bytes::Bytes;

use super::error_code::{error_message, ErrorCode};
use super::message::{Message, MessageType};
use super::{pb, FRAME_BYTES_MAX_DEFAULT, INFLIGHT_REQUESTS_MAX_DEFAULT, PROTOCOL_VERSION};

/// A 16-byte stand-in for a JPEG: SOI, the start of an APP0/JFIF segment, EOI.
pub const EXAMPLE_JPEG: [u8; 16] = [
    0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10, 0x4a, 0x46, 0x49, 0x46, 0x00, 0x01, 0x01, 0x00, 0xff, 0xd9,
];

const DISH_ID: &str = "D2024.06.10_S0412";
const PATIENT_ID: &str = "MRN-004711";
const TREATMENT: &str = "2024-0612";
/// 2024-06-10 08:30:00 UTC.
const INSEMINATION_MS: i64 = 1_718_008_200_000;
/// 2024-06-11 10:00:00 UTC.
const ACQUIRED_MS: i64 = 1_718_100_000_000;

/// The example message of `message_type`.
pub fn example(message_type: MessageType) -> Message {
    match message_type {
        MessageType::Hello => Message::Hello(hello()),
        MessageType::HelloOk => Message::HelloOk(hello_ok()),
        MessageType::RegisterDish => Message::RegisterDish(register_dish()),
        MessageType::Image => Message::Image(image()),
        MessageType::Telemetry => Message::Telemetry(telemetry()),
        MessageType::SyncState => Message::SyncState(pb::SyncState {
            seq: 4,
            dish_id: DISH_ID.into(),
        }),
        MessageType::SyncStateResult => Message::SyncStateResult(sync_state_result()),
        MessageType::ListPatients => Message::ListPatients(pb::ListPatients {
            seq: 5,
            after_patient_id: String::new(),
            limit: 100,
        }),
        MessageType::PatientList => Message::PatientList(patient_list()),
        MessageType::Ack => Message::ack(2, false),
        MessageType::Error => error_message(
            6,
            ErrorCode::ImageConflict,
            "well 1 plane -2 at 1718100000000 is stored with other bytes",
        ),
        MessageType::Ping => Message::Ping(pb::Ping { seq: 7 }),
    }
}

/// The example message of every type, in type-number order.
pub fn examples() -> Vec<Message> {
    MessageType::ALL.into_iter().map(example).collect()
}

fn hello() -> pb::Hello {
    pb::Hello {
        protocol_version: PROTOCOL_VERSION,
        serial_number: "ESP-1234".into(),
        model: "es-plus".into(),
        firmware_version: "7.9.2".into(),
        instrument_clock_ms: ACQUIRED_MS,
        secret: String::new(),
        instrument_number: 1234,
    }
}

fn hello_ok() -> pb::HelloOk {
    pb::HelloOk {
        server_id: "esserver-01".into(),
        accepted_version: PROTOCOL_VERSION,
        frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
        inflight_requests_max: INFLIGHT_REQUESTS_MAX_DEFAULT,
        issued_secret: "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a9c".into(),
        server_clock_ms: ACQUIRED_MS + 250,
    }
}

fn embryo_id(well: u32) -> String {
    format!("D2024.06.10_S0412_I1234_P-{well}")
}

fn register_dish() -> pb::RegisterDish {
    pb::RegisterDish {
        seq: 1,
        dish_id: DISH_ID.into(),
        slot: 3,
        patient: Some(pb::Patient {
            patient_id: PATIENT_ID.into(),
            first_name: "Anna".into(),
            last_name: "Larsen".into(),
            date_of_birth: "1990-04-17".into(),
        }),
        treatment_name: TREATMENT.into(),
        insemination_time_ms: INSEMINATION_MS,
        wells: (1..=2)
            .map(|well| pb::DishWell {
                well,
                embryo_id: embryo_id(well),
                label: String::new(),
            })
            .collect(),
        fertilization_method: "ICSI".into(),
    }
}

fn image() -> pb::Image {
    pb::Image {
        seq: 2,
        dish_id: DISH_ID.into(),
        well: 1,
        focal_plane: -2,
        acquired_at_ms: ACQUIRED_MS,
        jpeg: Bytes::from_static(&EXAMPLE_JPEG),
    }
}

fn telemetry() -> pb::Telemetry {
    pb::Telemetry {
        seq: 3,
        samples: vec![pb::TelemetrySample {
            channel: "temperature_c".into(),
            value: 37.0,
            at_ms: ACQUIRED_MS,
        }],
        alarms: vec![pb::Alarm {
            code: "CO2-LOW".into(),
            severity: pb::AlarmSeverity::Warning.into(),
            raised_at_ms: ACQUIRED_MS - 60_000,
            cleared_at_ms: 0,
            text: "CO2 below set point".into(),
        }],
    }
}

fn sync_state_result() -> pb::SyncStateResult {
    pb::SyncStateResult {
        seq: 4,
        known: true,
        dish_id: DISH_ID.into(),
        wells: vec![pb::WellState {
            well: 1,
            embryo_id: embryo_id(1),
            acquisitions: vec![pb::AcquisitionState {
                acquired_at_ms: ACQUIRED_MS,
                focal_planes: vec![-2, -1, 0, 1, 2],
            }],
        }],
    }
}

fn patient_list() -> pb::PatientList {
    pb::PatientList {
        seq: 5,
        patients: vec![pb::PatientInfo {
            patient_id: PATIENT_ID.into(),
            first_name: "Anna".into(),
            last_name: "Larsen".into(),
            date_of_birth: "1990-04-17".into(),
            treatments: vec![TREATMENT.into()],
        }],
        next_after: String::new(),
    }
}

/// `bytes` as the protocol document shows frames: two-digit lowercase hex separated by
/// spaces, 16 bytes per line, each line ending in a newline.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 3);
    for line in bytes.chunks(16) {
        let hex: Vec<String> = line.iter().map(|byte| format!("{byte:02x}")).collect();
        text.push_str(&hex.join(" "));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_dump_writes_sixteen_lowercase_bytes_per_line() {
        let bytes: Vec<u8> = (0xf0..=0xff).chain([0xab]).collect();
        let expected = "f0 f1 f2 f3 f4 f5 f6 f7 f8 f9 fa fb fc fd fe ff\nab\n";
        assert_eq!(hex_dump(&bytes), expected);
    }

    #[test]
    fn examples_cover_every_type_and_pass_validation() {
        let examples = examples();
        let types: Vec<MessageType> = examples.iter().map(Message::message_type).collect();
        assert_eq!(types, MessageType::ALL);
        for message in &examples {
            assert_eq!(
                super::super::validate_request(message),
                Ok(()),
                "{message:?}"
            );
        }
        let Message::Hello(hello) = example(MessageType::Hello) else {
            panic!("not a HELLO");
        };
        assert_eq!(super::super::validate_hello(&hello), Ok(()));
    }
}
