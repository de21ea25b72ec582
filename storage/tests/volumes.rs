//! Storage v2 through the public API: images in volume files, the index in redb. Migration from
//! a version-4 store, sealing, damage that stays where it is, the tail cut at open.

use bytes::Bytes;
use es_storage::*;
use std::path::Path;

const SEED: [u8; 16] = [0x5e; 16];
const T0: i64 = 1_700_000_000_000;

fn open_with(dir: &Path, volume_bytes_max: u64) -> Store {
    let options = StoreOptions {
        volume_bytes_max,
        ..StoreOptions::default()
    };
    Store::open(dir, &options, SEED).unwrap()
}

fn write<O: Operation>(writer: &Writer, op: O) -> OpResult<O> {
    writer.write(op)
}

/// One instrument "SN-V" with dish "D1", wells 1..=4. Returns the instrument id.
fn setup(writer: &Writer) -> u64 {
    let instrument_id = match write(
        writer,
        InstrumentHello {
            number: 0,
            serial: "SN-V".into(),
            model: "EmbryoScope+".into(),
            firmware: "1".into(),
            presented_secret: None,
            new_secret: "s".into(),
            issued_connection_open: false,
            enrolment: Default::default(),
            at_ms: T0,
        },
    ) {
        Ok(InstrumentAccepted { instrument_id, .. }) => instrument_id,
        other => panic!("{other:?}"),
    };
    let dish = DishRegistration {
        fertilization_method: String::new(),
        dish_id: "D1".into(),
        slot: 1,
        patient: PatientRef {
            patient_idx: String::new(),
            patient_id: "MRN-V".into(),
            first_name: "Ada".into(),
            last_name: "Volume".into(),
            date_of_birth: String::new(),
        },
        treatment_name: "2026-1".into(),
        insemination_at_ms: T0 - 3_600_000,
        wells: (1..=4)
            .map(|well| WellRegistration {
                label: String::new(),
                well,
                embryo_id: format!("EV{well}"),
            })
            .collect(),
    };
    write(
        writer,
        RegisterDish {
            instrument_id,
            dish,
            at_ms: T0,
        },
    )
    .unwrap();
    instrument_id
}

fn image(instrument_id: u64, n: u32, len: usize) -> (PutImage, Bytes) {
    let jpeg = Bytes::from(fixture_jpeg(1 + n % 4, n, 0, len));
    let op = PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well: 1 + n % 4,
        focal_plane: 0,
        acquired_at_ms: T0 + i64::from(n) * 600_000,
        jpeg: ImageBytes::new(jpeg.clone()),
        at_ms: T0 + i64::from(n),
    };
    (op, jpeg)
}

fn read(store: &Store, instrument_id: u64, n: u32) -> Result<Option<Bytes>, StorageError> {
    store.read().unwrap().image(
        instrument_id,
        "D1",
        1 + n % 4,
        0,
        T0 + i64::from(n) * 600_000,
    )
}

#[test]
fn images_roll_over_into_new_volumes_and_read_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), 1 << 20);
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    // 60 images of 100 KB: about six 1 MiB volumes.
    let mut jpegs = Vec::new();
    for n in 0..60 {
        let (op, jpeg) = image(instrument_id, n, 100_000);
        assert_eq!(write(&writer, op), Ok(ImageStored { duplicate: false }));
        jpegs.push(jpeg);
    }
    // A resend is a duplicate, other bytes a conflict.
    let (op, _) = image(instrument_id, 7, 100_000);
    assert_eq!(write(&writer, op), Ok(ImageStored { duplicate: true }));
    let (mut op, _) = image(instrument_id, 7, 100_000);
    op.jpeg = ImageBytes::new(Bytes::from_static(b"\xff\xd8other\xff\xd9"));
    assert_eq!(
        write(&writer, op),
        Err(WriteError::Refused(ImageRefusal::Conflict))
    );
    writer.shutdown();
    let stats = store.read().unwrap().stats().unwrap();
    assert!(stats.volumes >= 5, "{stats:?}");
    assert_eq!(stats.volumes_sealed, stats.volumes - 1);
    assert_eq!(stats.active_volume as u64, stats.volumes);
    assert_eq!(stats.images, 60);
    for (n, jpeg) in jpegs.iter().enumerate() {
        assert_eq!(
            read(&store, instrument_id, n as u32).unwrap().as_ref(),
            Some(jpeg)
        );
    }
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.volumes_checked, stats.volumes);
    // Sealed volumes hold nothing past their records.
    let volume_bytes: u64 = std::fs::read_dir(store.volumes_dir())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum::<u64>();
    assert!(volume_bytes >= stats.volume_bytes);
    drop(store);

    let store = open_with(dir.path(), 1 << 20);
    assert_eq!(store.recovery(), Recovery::default());
    for (n, jpeg) in jpegs.iter().enumerate() {
        assert_eq!(
            read(&store, instrument_id, n as u32).unwrap().as_ref(),
            Some(jpeg)
        );
    }
    // Appends go on in the active volume after a reopen.
    let writer = store.start_writer(WriterOptions::default());
    let (op, jpeg) = image(instrument_id, 60, 100_000);
    write(&writer, op).unwrap();
    writer.shutdown();
    assert_eq!(read(&store, instrument_id, 60).unwrap(), Some(jpeg));
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn a_version_4_store_is_migrated_into_volumes_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let images = write_v4_fixture(dir.path(), 30, &[-15, 0, 15], 20_000).unwrap();
    assert_eq!(images.len(), 180);
    let store = open_with(dir.path(), 1 << 20);
    let reader = store.read().unwrap();
    for image in &images {
        let stored = reader
            .image(
                image.instrument_id,
                &image.dish_id,
                image.well,
                image.focal_plane,
                image.acquired_at_ms,
            )
            .unwrap()
            .expect("migrated image");
        let original = fixture_jpeg(image.well, image.index, image.focal_plane, 20_000);
        assert_eq!(stored.as_ref(), original.as_slice());
        let location = store
            .image_location(
                image.instrument_id,
                &image.dish_id,
                image.well,
                image.focal_plane,
                image.acquired_at_ms,
            )
            .unwrap()
            .unwrap();
        assert!(!location.is_legacy());
    }
    let stats = reader.stats().unwrap();
    assert_eq!(stats.images, 180);
    assert_eq!(stats.image_bytes, 180 * 20_000);
    assert!(stats.volumes >= 3, "{stats:?}");
    drop(reader);
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.images_checked, 180);
    drop(store);
    // The old table is gone.
    let db = redb::Database::open(dir.path().join(DATABASE_FILE_NAME)).unwrap();
    let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
    assert!(matches!(
        txn.open_table(tables::LEGACY_IMAGES),
        Err(redb::TableError::TableDoesNotExist(_))
    ));
}

#[test]
fn damage_costs_only_the_records_it_touches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), 64 << 20);
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    let mut jpegs = Vec::new();
    for n in 0..40 {
        let (op, jpeg) = image(instrument_id, n, 30_000);
        write(&writer, op).unwrap();
        jpegs.push(jpeg);
    }
    writer.shutdown();
    let location = |n: u32| {
        store
            .image_location(
                instrument_id,
                "D1",
                1 + n % 4,
                0,
                T0 + i64::from(n) * 600_000,
            )
            .unwrap()
            .unwrap()
    };
    let volume = store
        .volumes_dir()
        .join(format!("{:08}.vol", location(0).volume));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&volume)
        .unwrap();
    // One flipped byte inside image 5's JPEG, and a zeroed 64 KiB range from the middle of
    // image 20 (it covers image 21 and part of 22).
    let flip_at = location(5).offset + 500;
    let mut byte = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut byte, flip_at).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[byte[0] ^ 0x10], flip_at).unwrap();
    let zero_from = location(20).offset + 10_000;
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; 65_536], zero_from).unwrap();
    let zero_to = zero_from + 65_536;
    drop(file);
    let touched: Vec<u32> = (0..40)
        .filter(|&n| {
            let at = location(n);
            let end = at.offset + u64::from(at.length);
            n == 5 || (at.offset < zero_to && end > zero_from)
        })
        .collect();
    assert_eq!(touched, vec![5, 20, 21, 22]);
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.damaged_images.len(), touched.len(), "{report:?}");
    assert!(report.problems.is_empty(), "{report:?}");
    assert!(report.orphan_records.is_empty(), "{report:?}");
    assert!(!report.unreadable_ranges.is_empty());
    for n in 0..40u32 {
        let result = read(&store, instrument_id, n);
        if touched.contains(&n) {
            match result {
                Err(error) => assert_eq!(error.code(), "image_damaged", "{n}: {error}"),
                Ok(_) => panic!("damaged image {n} was served"),
            }
        } else {
            assert_eq!(result.unwrap().as_ref(), Some(&jpegs[n as usize]), "{n}");
        }
    }
    // The original repairs each damaged image; afterwards verify is clean again (the damaged
    // copies stay, superseded or unreadable, and cost nothing).
    let writer = store.start_writer(WriterOptions::default());
    for &n in &touched {
        let (op, _) = image(instrument_id, n, 30_000);
        assert_eq!(write(&writer, op), Ok(ImageStored { duplicate: false }));
    }
    writer.shutdown();
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.records_superseded >= 1);
    for n in 0..40u32 {
        assert_eq!(
            read(&store, instrument_id, n).unwrap().as_ref(),
            Some(&jpegs[n as usize])
        );
    }
    assert_eq!(store.read().unwrap().stats().unwrap().images, 40);
}

#[test]
fn a_sealed_volume_gets_a_companion_file_listing_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(dir.path(), 1 << 20);
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    for n in 0..25 {
        let (op, _) = image(instrument_id, n, 100_000);
        write(&writer, op).unwrap();
    }
    writer.shutdown();
    let stats = store.read().unwrap().stats().unwrap();
    assert!(stats.volumes_sealed >= 2, "{stats:?}");
    drop(store);
    // The companions are written on a thread of their own, from the list of records the
    // writer kept while each volume filled; a reopen writes any missing one by walking the
    // volume. Both give the same bytes.
    let companion = |id: u64| dir.path().join("volumes").join(format!("{id:08}.idx"));
    let wait_for_companions = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while (1..=stats.volumes_sealed).any(|id| !companion(id).exists()) {
            assert!(
                std::time::Instant::now() < deadline,
                "companion files were not written"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for_companions();
    let kept: Vec<Vec<u8>> = (1..=stats.volumes_sealed)
        .map(|id| std::fs::read(companion(id)).unwrap())
        .collect();
    for id in 1..=stats.volumes_sealed {
        std::fs::remove_file(companion(id)).unwrap();
    }
    let store = open_with(dir.path(), 1 << 20);
    wait_for_companions();
    for (id, kept) in (1..=stats.volumes_sealed).zip(&kept) {
        assert_eq!(
            &std::fs::read(companion(id)).unwrap(),
            kept,
            "companion of volume {id}: kept list and walk differ"
        );
    }
    assert!(
        !companion(u64::from(stats.active_volume)).exists(),
        "the active volume has none"
    );
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // A companion that does not match its volume is reported.
    let bytes = std::fs::read(companion(1)).unwrap();
    std::fs::write(companion(1), &bytes[..bytes.len() - 10]).unwrap();
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("companion file of volume 1 is damaged")),
        "{report:?}"
    );
}
