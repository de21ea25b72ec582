//! The storage side of the archive tier, with an object store in memory: a volume is recorded
//! as archived only when sealed and whole, its local file goes only after the record, its
//! images then read through the fetch (checked like local ones), a fetch that fails is
//! `archive_unavailable` for those images only, verify and a restart accept the missing file,
//! and a resend of an archived image is found a duplicate without the object store.

use bytes::Bytes;
use es_storage::archive::{ArchiveFetch, ArchiveRefusal, VolumeArchived, VolumeState};
use es_storage::*;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod common;
use common::{filled, open, read, T0};

/// Objects by key; `down` makes every read fail, `flip` damages what it returns.
#[derive(Default)]
struct MemoryStore {
    objects: Mutex<HashMap<String, Vec<u8>>>,
    down: AtomicBool,
    flip: AtomicBool,
    reads: std::sync::atomic::AtomicU64,
}

impl ArchiveFetch for MemoryStore {
    fn read_range(
        &self,
        _volume: u32,
        object: &str,
        offset: u64,
        length: u32,
    ) -> Result<Bytes, String> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        if self.down.load(Ordering::Relaxed) {
            return Err("connection refused by 127.0.0.1:9".into());
        }
        let objects = self.objects.lock();
        let object = objects.get(object).ok_or("no such object")?;
        let mut bytes = object[offset as usize..offset as usize + length as usize].to_vec();
        if self.flip.load(Ordering::Relaxed) {
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
        }
        Ok(Bytes::from(bytes))
    }
}

/// Waits (bounded) until the writer has trimmed the sealed volumes and written their
/// companion files; returns the volumes ready to archive.
fn ready(store: &Store) -> Vec<VolumeState> {
    for _ in 0..500 {
        let states = store.volume_states().unwrap();
        let sealed = states.iter().filter(|s| s.row.sealed).count();
        let ready: Vec<VolumeState> = states
            .into_iter()
            .filter(|s| s.ready_to_archive())
            .collect();
        if sealed > 0 && ready.len() == sealed {
            return ready;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the sealed volumes never became ready to archive");
}

/// "Uploads" a volume into `objects` as the archiver does, returning its record op.
fn upload(store: &Store, objects: &MemoryStore, state: &VolumeState) -> VolumeArchived {
    let bytes = std::fs::read(store.volume_path(state.id)).unwrap();
    assert_eq!(bytes.len() as u64, state.row.end);
    let object = format!("esserver/volumes/{:08}.vol", state.id);
    let sha256: [u8; 32] = Sha256::digest(&bytes).into();
    objects.objects.lock().insert(object.clone(), bytes);
    VolumeArchived {
        volume: state.id,
        object,
        bytes: state.row.end,
        sha256,
        at_ms: T0 + 1,
    }
}

#[test]
fn archived_volumes_read_through_the_fetch_checked_and_only_they_depend_on_it() {
    let data = tempfile::tempdir().unwrap();
    let (store, writer, instrument_id, jpegs) = filled(data.path(), 60);
    let objects = Arc::new(MemoryStore::default());

    let ready = ready(&store);
    assert!(
        ready.len() >= 2,
        "60 images of 60 kB seal several 1 MiB volumes"
    );
    let active = store
        .volume_states()
        .unwrap()
        .into_iter()
        .find(|s| !s.row.sealed)
        .expect("an active volume");

    // The active volume and a wrong size are refused; nothing is recorded.
    let mut op = upload(&store, &objects, &ready[0]);
    let refused = writer.write(VolumeArchived {
        volume: active.id,
        ..op.clone()
    });
    assert_eq!(
        refused,
        Err(WriteError::Refused(ArchiveRefusal::NotSealed(active.id)))
    );
    op.bytes += 1;
    assert!(matches!(
        writer.write(op.clone()),
        Err(WriteError::Refused(ArchiveRefusal::SizeMismatch { .. }))
    ));
    op.bytes -= 1;
    // Not recorded: the local file is not removed.
    assert!(!store.remove_archived_local(ready[0].id).unwrap());
    assert!(store.volume_path(ready[0].id).exists());

    // Every sealed volume archived and its local file removed.
    for state in &ready {
        let op = upload(&store, &objects, state);
        writer.write(op.clone()).unwrap();
        writer.write(op).unwrap(); // again: a no-op
        assert!(store.remove_archived_local(state.id).unwrap());
        assert!(!store.volume_path(state.id).exists());
    }
    let states = store.volume_states().unwrap();
    assert!(states
        .iter()
        .filter(|s| s.row.sealed)
        .all(|s| s.archived.is_some() && s.local_bytes.is_none()));

    // No fetch installed: archived images are archive_unavailable, the others read.
    let mut unavailable = 0;
    for (n, jpeg) in jpegs.iter().enumerate() {
        let result = store.read().unwrap().image(
            instrument_id,
            "D1",
            1 + n as u32 % 4,
            0,
            T0 + n as i64 * 600_000,
        );
        match result {
            Ok(Some(read)) => assert_eq!(&read, jpeg),
            Err(error) => {
                assert_eq!(error.code(), "archive_unavailable", "{error}");
                assert!(error.to_string().contains("no [Archive]"), "{error}");
                unavailable += 1;
            }
            Ok(None) => panic!("image {n} is not in the index"),
        }
    }
    assert!(unavailable > 0 && unavailable < jpegs.len());

    // With the fetch: every image reads, byte-identical.
    store.set_archive_fetch(objects.clone());
    for (n, jpeg) in jpegs.iter().enumerate() {
        assert_eq!(read(&store, instrument_id, n as u32).as_ref(), Some(jpeg));
    }
    assert!(objects.reads.load(Ordering::Relaxed) >= unavailable as u64);

    // The object store down: a clear error for archived images only.
    objects.down.store(true, Ordering::Relaxed);
    let error = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 1, 0, T0)
        .unwrap_err();
    assert_eq!(error.code(), "archive_unavailable");
    assert!(error.to_string().contains("connection refused"), "{error}");
    let last = jpegs.len() as u32 - 1;
    assert_eq!(read(&store, instrument_id, last).as_ref(), jpegs.last());
    objects.down.store(false, Ordering::Relaxed);

    // Damaged bytes from the object store are caught like damaged local ones.
    objects.flip.store(true, Ordering::Relaxed);
    let error = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 1, 0, T0)
        .unwrap_err();
    assert_eq!(error.code(), "image_damaged");
    objects.flip.store(false, Ordering::Relaxed);

    // A resend of an archived image is a duplicate, found without the object store.
    let reads_before = objects.reads.load(Ordering::Relaxed);
    let resend = PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well: 1,
        focal_plane: 0,
        acquired_at_ms: T0,
        jpeg: ImageBytes::new(jpegs[0].clone()),
        at_ms: T0 + 99,
    };
    assert_eq!(writer.write(resend), Ok(ImageStored { duplicate: true }));
    assert_eq!(objects.reads.load(Ordering::Relaxed), reads_before);

    // Verify is clean and says what it did not read; a restart accepts the missing files.
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.volumes_archived, ready.len() as u64);
    assert!(report.images_archived > 0);
    writer.shutdown();
    drop(writer);
    drop(store);
    let store = open(data.path());
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    store.set_archive_fetch(objects.clone());
    for (n, jpeg) in jpegs.iter().enumerate() {
        assert_eq!(read(&store, instrument_id, n as u32).as_ref(), Some(jpeg));
    }
}

#[test]
fn a_volume_file_missing_without_an_archive_row_is_still_damage() {
    let data = tempfile::tempdir().unwrap();
    let (store, _writer, instrument_id, _) = filled(data.path(), 40);
    let ready = ready(&store);
    store.set_archive_fetch(Arc::new(MemoryStore::default()));
    std::fs::remove_file(store.volume_path(ready[0].id)).unwrap();
    let error = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 1, 0, T0)
        .unwrap_err();
    assert_eq!(error.code(), "image_damaged");
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.volumes_archived, 0);
}

#[test]
fn a_backup_keeps_archived_files_while_it_runs_and_carries_their_companions() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let (store, writer, instrument_id, jpegs) = filled(data.path(), 40);
    let objects = Arc::new(MemoryStore::default());
    let ready = ready(&store);
    let first = &ready[0];
    // A snapshot taken before the volume is recorded as archived.
    let old = store.read().unwrap();
    writer.write(upload(&store, &objects, first)).unwrap();

    // While a backup runs, the archived volume's local file stays.
    let mut kept = Vec::new();
    let report = store
        .backup(target.path(), "b1", data.path(), T0, &mut |_| {
            kept.push(store.remove_archived_local(first.id).unwrap());
        })
        .unwrap();
    assert!(!kept.is_empty() && kept.iter().all(|removed| !removed));
    assert!(store.volume_path(first.id).exists());
    let manifest = es_storage::backup::read_manifest(target.path(), &report.name).unwrap();
    assert_eq!(manifest.archived_volumes.len(), 1);
    assert!(manifest
        .files
        .iter()
        .any(|f| f.kind == es_storage::backup::FileKind::Companion { id: first.id }));
    // After it, the file goes; a read on the snapshot from before the record still finds it.
    assert!(store.remove_archived_local(first.id).unwrap());
    store.set_archive_fetch(objects.clone());
    assert_eq!(
        old.image(instrument_id, "D1", 1, 0, T0).unwrap().as_ref(),
        Some(&jpegs[0])
    );
    drop(old);
    writer.shutdown();

    // Restored: the archived volume reads through the fetch, and a resend of one of its
    // images is checked against the companion the backup carried.
    let restored_dir = tempfile::tempdir().unwrap();
    let restored = restored_dir.path().join("data");
    es_storage::backup::restore(target.path(), None, &restored, &mut |_| {}).unwrap();
    let copy = open(&restored);
    copy.set_archive_fetch(objects.clone());
    for (n, jpeg) in jpegs.iter().enumerate() {
        assert_eq!(read(&copy, instrument_id, n as u32).as_ref(), Some(jpeg));
    }
    let writer = copy.start_writer(WriterOptions::default());
    let resend = |jpeg: Bytes| PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well: 1,
        focal_plane: 0,
        acquired_at_ms: T0,
        jpeg: ImageBytes::new(jpeg),
        at_ms: T0 + 7,
    };
    assert_eq!(
        writer.write(resend(jpegs[0].clone())),
        Ok(ImageStored { duplicate: true })
    );
    assert!(matches!(
        writer.write(resend(jpegs[1].clone())),
        Err(WriteError::Refused(ImageRefusal::Conflict))
    ));
    // Without the companion, a resend cannot be compared locally: refused, nothing replaced.
    std::fs::remove_file(
        restored
            .join("volumes")
            .join(format!("{:08}.idx", first.id)),
    )
    .unwrap();
    assert!(matches!(
        writer.write(resend(jpegs[0].clone())),
        Err(WriteError::Refused(ImageRefusal::Conflict))
    ));
    assert_eq!(read(&copy, instrument_id, 0).as_ref(), Some(&jpegs[0]));
    writer.shutdown();
}
