//! What the storage examples share: an instrument with one registered dish, and a frame.

use bytes::Bytes;
use es_storage::{
    DishRegistration, InstrumentHello, PatientRef, RegisterDish, WellRegistration, Writer,
};

/// Registers instrument `serial` (an EmbryoScope+) and its dish `dish_id` with wells
/// 1..=`wells` (embryo ids `<dish_id>_E<well>`); returns the instrument id.
pub fn instrument_with_dish(writer: &Writer, serial: &str, dish_id: &str, wells: u32) -> u64 {
    let instrument_id = writer
        .write(InstrumentHello {
            number: 0,
            serial: serial.into(),
            model: "es-plus".into(),
            firmware: "1".into(),
            presented_secret: None,
            new_secret: "s".into(),
            issued_connection_open: false,
            enrolment: Default::default(),
            at_ms: 1,
        })
        .expect("instrument")
        .instrument_id;
    writer
        .write(RegisterDish {
            instrument_id,
            dish: DishRegistration {
                fertilization_method: String::new(),
                dish_id: dish_id.into(),
                slot: 1,
                patient: PatientRef {
                    patient_idx: String::new(),
                    patient_id: "P1".into(),
                    first_name: "A".into(),
                    last_name: "B".into(),
                    date_of_birth: String::new(),
                },
                treatment_name: "T".into(),
                insemination_at_ms: 1,
                wells: (1..=wells)
                    .map(|well| WellRegistration {
                        label: String::new(),
                        well,
                        embryo_id: format!("{dish_id}_E{well}"),
                    })
                    .collect(),
            },
            at_ms: 1,
        })
        .expect("dish");
    instrument_id
}

/// `bytes` bytes that stand for a JPEG (the store does not decode images).
pub fn frame(bytes: u32) -> Bytes {
    Bytes::from(
        (0..bytes)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
}
