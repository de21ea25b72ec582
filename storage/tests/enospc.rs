//! A real ENOSPC, twice: first the image volumes run out of space (the appender's write budget,
//! a test hook inside the real write path), then the database file itself (it lives on a
//! storage backend that fails every write past a byte budget with `StorageFull`, as a full
//! filesystem does; redb then refuses every call until the database is reopened, and the writer
//! must reopen it and carry on). Nothing acknowledged may be lost, reads go on, and when space
//! returns, writes succeed again.

use bytes::Bytes;
use es_storage::*;
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const T0: i64 = 1_700_000_000_000;

/// The file, failing every write and growth that would end past `budget` bytes.
#[derive(Debug)]
struct FullDisk {
    file: FileBackend,
    budget: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

impl FullDisk {
    fn check(&self, end: u64) -> io::Result<()> {
        if end > self.budget.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        Ok(())
    }
}

impl StorageBackend for FullDisk {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.file.len()? {
            self.check(len)?;
        }
        self.file.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check(offset + data.len() as u64)?;
        self.file.write(offset, data)
    }
    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.file.try_lock_range(start, end)
    }
    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.file.try_lock_shared_range(start, end)
    }
    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_range(start, end)
    }
    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.lock_shared_range(start, end)
    }
    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.file.unlock_range(start, end)
    }
}

fn open_full_disk(dir: &Path, budget: &Arc<AtomicU64>, refused: &Arc<AtomicU64>) -> Store {
    let path = dir.join(DATABASE_FILE_NAME);
    let (budget, refused) = (budget.clone(), refused.clone());
    Store::open_with_backend(dir, &StoreOptions::default(), [7; 16], move || {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        Ok(FullDisk {
            file: FileBackend::new(file).map_err(io::Error::other)?,
            budget: budget.clone(),
            refused: refused.clone(),
        })
    })
    .unwrap()
}

fn write<O: Operation>(writer: &Writer, op: O) -> OpResult<O> {
    writer.write(op)
}

fn image(instrument_id: u64, n: u32) -> PutImage {
    // Distinct bytes per image: 60 KB that do not compress or repeat.
    let mut jpeg = vec![0u8; 60_000];
    let mut x = n.wrapping_mul(2_654_435_761).wrapping_add(1);
    for byte in &mut jpeg {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *byte = x as u8;
    }
    PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well: 1 + n % 4,
        focal_plane: 0,
        acquired_at_ms: T0 + i64::from(n) * 600_000,
        jpeg: ImageBytes::new(Bytes::from(jpeg)),
        at_ms: T0,
    }
}

#[test]
fn a_full_disk_fails_writes_then_the_store_reopens_and_carries_on_with_nothing_lost() {
    let dir = tempfile::tempdir().unwrap();
    let budget = Arc::new(AtomicU64::new(u64::MAX));
    let refused = Arc::new(AtomicU64::new(0));
    let store = open_full_disk(dir.path(), &budget, &refused);
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = match write(
        &writer,
        InstrumentHello {
            number: 0,
            serial: "SN-FULL".into(),
            model: "EmbryoScope+".into(),
            firmware: "1".into(),
            presented_secret: None,
            new_secret: "secret".into(),
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
            patient_id: "MRN-FULL".into(),
            first_name: "Ada".into(),
            last_name: "Full".into(),
            date_of_birth: "1985-12-10".into(),
        },
        treatment_name: "2026-1".into(),
        insemination_at_ms: T0 - 3_600_000,
        wells: (1..=4)
            .map(|well| WellRegistration {
                label: String::new(),
                well,
                embryo_id: format!("E{well}"),
            })
            .collect(),
    };
    write(
        &writer,
        RegisterDish {
            instrument_id,
            dish,
            at_ms: T0,
        },
    )
    .unwrap();

    // The volumes' disk fills up 3 MB from here.
    store.set_volume_write_budget_for_tests(Some(3_000_000));
    let mut acked = Vec::new();
    let mut n = 0u32;
    let first_failure = loop {
        assert!(n < 2000, "the budget never ran out");
        match write(&writer, image(instrument_id, n)) {
            Ok(ImageStored { duplicate: false }) => acked.push(n),
            Ok(other) => panic!("{other:?}"),
            Err(error) => break error,
        }
        n += 1;
    };
    assert!(
        matches!(first_failure, WriteError::DiskFull),
        "the failed commit says disk_full: {first_failure:?}"
    );
    assert!(store.reopens() >= 1, "the writer reopened the database");
    assert!(!acked.is_empty());

    // The writer is still there: more writes fail cleanly while the disk stays full, and
    // reads go on and see every acknowledged image.
    for attempt in 0..3 {
        let error = write(&writer, image(instrument_id, n + attempt)).unwrap_err();
        assert_eq!(error.code(), "disk_full", "{error:?}");
    }
    let check_acked = |store: &Store, acked: &[u32]| {
        let reader = store.read().unwrap();
        for &k in acked {
            let op = image(instrument_id, k);
            let PutImage {
                dish_id,
                well,
                focal_plane,
                acquired_at_ms,
                jpeg,
                ..
            } = op;
            let stored = reader
                .image(instrument_id, &dish_id, well, focal_plane, acquired_at_ms)
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged image {k} is missing"));
            assert_eq!(stored.as_ref(), jpeg.as_ref(), "image {k}");
        }
        assert_eq!(reader.stats().unwrap().images, acked.len() as u64);
    };
    check_acked(&store, &acked);

    // Space returns: the same images are accepted, and more.
    store.set_volume_write_budget_for_tests(None);
    for k in n..n + 10 {
        match write(&writer, image(instrument_id, k)) {
            Ok(ImageStored { duplicate: false }) => acked.push(k),
            other => panic!("after space returned: {other:?}"),
        }
    }
    check_acked(&store, &acked);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());

    // Now the database file's disk fills up 1 MB from here: telemetry (which lives in redb)
    // fails with disk_full, the database is reopened, and writes go on once space returns.
    let reopens_before = store.reopens();
    let start_len = std::fs::metadata(store.path()).unwrap().len();
    budget.store(start_len + 1_000_000, Ordering::SeqCst);
    let mut samples_acked = 0u64;
    let mut round = 0i64;
    let telemetry = |round: i64| PutTelemetry {
        instrument_id,
        samples: (0..2000)
            .map(|i| TelemetrySample {
                channel: "temperature".into(),
                value: 37.0,
                at_ms: T0 + round * 1_000_000 + i,
            })
            .collect(),
        alarms: Vec::new(),
        ims: None,
        at_ms: T0,
    };
    let failure = loop {
        assert!(round < 1000, "the database budget never ran out");
        match write(&writer, telemetry(round)) {
            Ok(_) => samples_acked += 2000,
            Err(error) => break error,
        }
        round += 1;
    };
    assert_eq!(failure.code(), "disk_full", "{failure:?}");
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "the backend refused a write"
    );
    assert!(
        store.reopens() > reopens_before,
        "the writer reopened the database"
    );
    check_acked(&store, &acked);
    budget.store(u64::MAX, Ordering::SeqCst);
    write(&writer, telemetry(round)).unwrap();
    samples_acked += 2000;
    assert_eq!(
        store.read().unwrap().stats().unwrap().telemetry_samples,
        samples_acked
    );
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
    drop(store);

    // The file on disk is intact: a plain open sees every acknowledged image, verify is clean.
    let reopened = Store::open(dir.path(), &StoreOptions::default(), [7; 16]).unwrap();
    check_acked(&reopened, &acked);
    let report = reopened.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
