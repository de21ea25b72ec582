//! Shared by the storage integration tests: a store with small volumes, one instrument and one
//! dish of four wells, and numbered images.
#![allow(dead_code)]

use bytes::Bytes;
use es_storage::*;
use std::path::Path;

pub const SEED: [u8; 16] = [0xb4; 16];
pub const T0: i64 = 1_700_000_000_000;
/// Small volumes, so a few dozen images seal several.
pub const VOLUME_BYTES_MAX: u64 = 1 << 20;

pub fn open(dir: &Path) -> Store {
    let options = StoreOptions {
        volume_bytes_max: VOLUME_BYTES_MAX,
        ..StoreOptions::default()
    };
    Store::open(dir, &options, SEED).unwrap()
}

pub fn setup(writer: &Writer) -> u64 {
    let accepted = writer
        .write(InstrumentHello {
            number: 0,
            serial: "SN-B".into(),
            model: "EmbryoScope+".into(),
            firmware: "1".into(),
            presented_secret: None,
            new_secret: "s".into(),
            issued_connection_open: false,
            enrolment: Default::default(),
            at_ms: T0,
        })
        .unwrap();
    let dish = DishRegistration {
        fertilization_method: String::new(),
        dish_id: "D1".into(),
        slot: 1,
        patient: PatientRef {
            patient_idx: String::new(),
            patient_id: "MRN-B".into(),
            first_name: "Ada".into(),
            last_name: "Backup".into(),
            date_of_birth: String::new(),
        },
        treatment_name: "2026-1".into(),
        insemination_at_ms: T0 - 3_600_000,
        wells: (1..=4)
            .map(|well| WellRegistration {
                label: String::new(),
                well,
                embryo_id: format!("EB{well}"),
            })
            .collect(),
    };
    writer
        .write(RegisterDish {
            instrument_id: accepted.instrument_id,
            dish,
            at_ms: T0,
        })
        .unwrap();
    accepted.instrument_id
}

pub fn put(writer: &Writer, instrument_id: u64, n: u32) -> Bytes {
    let jpeg = Bytes::from(fixture_jpeg(1 + n % 4, n, 0, 60_000));
    let op = PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well: 1 + n % 4,
        focal_plane: 0,
        acquired_at_ms: T0 + i64::from(n) * 600_000,
        jpeg: ImageBytes::new(jpeg.clone()),
        at_ms: T0 + i64::from(n),
    };
    assert_eq!(writer.write(op), Ok(ImageStored { duplicate: false }));
    jpeg
}

pub fn read(store: &Store, instrument_id: u64, n: u32) -> Option<Bytes> {
    store
        .read()
        .unwrap()
        .image(
            instrument_id,
            "D1",
            1 + n % 4,
            0,
            T0 + i64::from(n) * 600_000,
        )
        .unwrap()
}

/// A store in `dir` with a running writer, the instrument and dish of [`setup`], and `images`
/// numbered images stored: (store, writer, instrument id, their JPEGs in order).
pub fn filled(dir: &Path, images: u32) -> (Store, Writer, u64, Vec<Bytes>) {
    let store = open(dir);
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    let jpegs = (0..images)
        .map(|n| put(&writer, instrument_id, n))
        .collect();
    (store, writer, instrument_id, jpegs)
}
