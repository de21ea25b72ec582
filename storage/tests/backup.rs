//! Backup, verify and restore through the public API: a backup taken while the writer keeps
//! storing is a consistent snapshot; the second one copies only what is new; a flipped byte
//! is found by verify and refused by restore; a restored directory opens and verifies clean.

use es_storage::backup::{self, BackupError, FileKind};
use es_storage::*;
use std::path::Path;

mod common;
use common::{filled, open, put, read, setup, T0};

fn quiet(_: &backup::Progress) {}

#[test]
fn a_backup_during_writes_restores_exactly_its_snapshot_and_the_next_copies_only_the_new() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let (store, writer, instrument_id, mut jpegs) = filled(data.path(), 40);

    // The first backup runs while another thread keeps storing images.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (writer, stop) = (writer.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 40;
            let mut stored = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                stored.push(put(&writer, instrument_id, n));
                n += 1;
            }
            stored
        })
    };
    let mut progress_calls = 0;
    let first = store
        .backup(target.path(), "b1", data.path(), T0, &mut |_| {
            progress_calls += 1
        })
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    jpegs.extend(busy.join().unwrap());
    assert!(progress_calls >= 2, "{progress_calls}");
    assert_eq!(first.files_copied, first.files, "{first:?}");
    let manifest = backup::read_manifest(target.path(), "b1").unwrap();
    assert_eq!(manifest.images, first.images);
    assert!(manifest.images >= 40, "{manifest:?}");
    assert!(manifest.files.iter().any(|f| f.kind
        == FileKind::Volume {
            id: 1,
            sealed: true
        }));

    // More images seal more volumes; the second backup copies the new ones only.
    let before = jpegs.len() as u32;
    for n in before..before + 30 {
        jpegs.push(put(&writer, instrument_id, n));
    }
    let second = store
        .backup(target.path(), "b2", data.path(), T0 + 1, &mut quiet)
        .unwrap();
    let first_sealed: u64 = manifest
        .files
        .iter()
        .filter(|f| matches!(f.kind, FileKind::Volume { sealed: true, .. }))
        .map(|f| f.bytes)
        .sum();
    assert!(first_sealed > 0);
    assert!(
        second.bytes_copied + first_sealed <= second.bytes + 4096,
        "the second backup copied sealed volumes again: {second:?}"
    );
    assert!(second.files_copied < second.files, "{second:?}");

    // Both backups verify; a restore of the first holds exactly its snapshot's images.
    assert!(backup::verify(target.path(), Some("b1"), &mut quiet)
        .unwrap()
        .is_clean());
    assert!(backup::verify(target.path(), None, &mut quiet)
        .unwrap()
        .is_clean());
    writer.shutdown();
    let restored = tempfile::tempdir().unwrap();
    let restored_dir = restored.path().join("data");
    let report = backup::restore(target.path(), Some("b1"), &restored_dir, &mut quiet).unwrap();
    assert_eq!(report.images, manifest.images);
    let copy = open(&restored_dir);
    assert_eq!(copy.server_id(), store.server_id());
    let stats = copy.read().unwrap().stats().unwrap();
    assert_eq!(stats.images, manifest.images);
    for n in 0..manifest.images as u32 {
        assert_eq!(
            read(&copy, instrument_id, n).as_ref(),
            Some(&jpegs[n as usize])
        );
    }
    assert_eq!(read(&copy, instrument_id, manifest.images as u32), None);
    assert!(copy.verify(&mut |_| {}).unwrap().is_clean());
    // The restored store takes new images.
    let copy_writer = copy.start_writer(WriterOptions::default());
    put(&copy_writer, instrument_id, 1000);
    copy_writer.shutdown();

    // A restore never writes into a directory that holds something.
    let refused = backup::restore(target.path(), None, &restored_dir, &mut quiet);
    assert!(
        matches!(refused, Err(BackupError::Refused(_))),
        "{refused:?}"
    );
}

#[test]
fn a_flipped_byte_is_found_by_verify_and_refused_by_restore() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let (store, writer, _, _) = filled(data.path(), 30);
    store
        .backup(target.path(), "b1", data.path(), T0, &mut quiet)
        .unwrap();
    writer.shutdown();
    let manifest = backup::read_manifest(target.path(), "b1").unwrap();
    let victim = manifest
        .files
        .iter()
        .find(|f| matches!(f.kind, FileKind::Volume { sealed: true, .. }))
        .unwrap();
    let path = target.path().join(&victim.path);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[1000] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let report = backup::verify(target.path(), None, &mut quiet).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert!(report.damaged[0].contains(&victim.path), "{report:?}");
    let restored = tempfile::tempdir().unwrap();
    let restored_dir = restored.path().join("data");
    let refused = backup::restore(target.path(), None, &restored_dir, &mut quiet);
    assert!(
        matches!(refused, Err(BackupError::Damaged(_))),
        "{refused:?}"
    );
    assert!(
        !restored_dir.exists(),
        "a failed restore left a data directory"
    );
}

#[test]
fn a_target_holds_one_servers_backups_and_an_interrupted_backup_is_cleared() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let store = open(data.path());
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    put(&writer, instrument_id, 0);
    // What a killed backup leaves: a partial directory and a partial pool volume.
    std::fs::create_dir_all(target.path().join("backups/b0.partial/volumes")).unwrap();
    std::fs::create_dir_all(target.path().join("volumes")).unwrap();
    std::fs::write(target.path().join("volumes/00000001-1.vol.partial"), b"x").unwrap();
    store
        .backup(target.path(), "b1", data.path(), T0, &mut quiet)
        .unwrap();
    assert!(!target.path().join("backups/b0.partial").exists());
    assert!(!target
        .path()
        .join("volumes/00000001-1.vol.partial")
        .exists());
    assert_eq!(backup::list(target.path()).unwrap().len(), 1);
    writer.shutdown();
    drop(store);

    let other_data = tempfile::tempdir().unwrap();
    let other = Store::open(other_data.path(), &StoreOptions::default(), [7; 16]).unwrap();
    let refused = other.backup(target.path(), "b2", other_data.path(), T0, &mut quiet);
    assert!(
        matches!(refused, Err(BackupError::Refused(_))),
        "{refused:?}"
    );
}

#[test]
fn prune_keeps_the_newest_and_the_volumes_they_need() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let store = open(data.path());
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = setup(&writer);
    let mut n = 0;
    for name in ["b1", "b2", "b3"] {
        for _ in 0..25 {
            put(&writer, instrument_id, n);
            n += 1;
        }
        store
            .backup(target.path(), name, data.path(), T0, &mut quiet)
            .unwrap();
    }
    writer.shutdown();
    let report = backup::prune(target.path(), 2).unwrap();
    assert_eq!(report.removed, vec!["b1".to_string()]);
    let kept: Vec<String> = backup::list(target.path())
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(kept, ["b2", "b3"]);
    // Every kept backup is whole; nothing is pruned twice.
    assert!(backup::verify(target.path(), Some("b2"), &mut quiet)
        .unwrap()
        .is_clean());
    assert!(backup::verify(target.path(), Some("b3"), &mut quiet)
        .unwrap()
        .is_clean());
    assert!(backup::prune(target.path(), 2).unwrap().removed.is_empty());
    let restored = tempfile::tempdir().unwrap();
    let dir = restored.path().join("data");
    backup::restore(target.path(), Some("b2"), &dir, &mut quiet).unwrap();
    assert!(open(&dir).verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn a_target_overlapping_the_data_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    let store = open(data.path());
    for target in [data.path().to_path_buf(), data.path().join("backups")] {
        let refused = store.backup(&target, "b1", data.path(), T0, &mut quiet);
        assert!(
            matches!(refused, Err(BackupError::Refused(_))),
            "{refused:?}"
        );
    }
    // Nothing was written beside the live volumes.
    assert!(!data.path().join("backups").exists());
    assert!(!data.path().join("server-id").exists());
}

#[test]
fn a_copied_or_damaged_manifest_is_left_out_and_stops_nothing() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let (store, writer, _, _) = filled(data.path(), 25);
    store
        .backup(target.path(), "b1", data.path(), T0, &mut quiet)
        .unwrap();
    // An operator's copy of a backup directory: its manifest names b1, not the copy.
    let backups = target.path().join("backups");
    std::fs::create_dir_all(backups.join("copy-b1")).unwrap();
    std::fs::copy(
        backups.join("b1/manifest.json"),
        backups.join("copy-b1/manifest.json"),
    )
    .unwrap();
    assert!(matches!(
        backup::read_manifest(target.path(), "copy-b1"),
        Err(BackupError::Damaged(_))
    ));
    // A later backup whose manifest is cut short.
    store
        .backup(target.path(), "b2", data.path(), T0 + 1, &mut quiet)
        .unwrap();
    let manifest = backups.join("b2/manifest.json");
    let text = std::fs::read(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();
    // Both are left out; backups and prunes go on, and nothing outside a backup is removed.
    let names: Vec<String> = backup::list(target.path())
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["b1"]);
    store
        .backup(target.path(), "b3", data.path(), T0 + 2, &mut quiet)
        .unwrap();
    backup::prune(target.path(), 1).unwrap();
    assert!(backups.join("copy-b1").exists() && backups.join("b2").exists());
    assert!(backup::verify(target.path(), Some("b3"), &mut quiet)
        .unwrap()
        .is_clean());
    writer.shutdown();
}

#[cfg(unix)]
#[test]
fn a_backup_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let store = open(data.path());
    std::fs::create_dir_all(data.path().join("tls")).unwrap();
    std::fs::write(data.path().join("tls/server.key"), b"secret key").unwrap();
    store
        .backup(target.path(), "b1", data.path(), T0, &mut quiet)
        .unwrap();
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let backup_dir = target.path().join("backups/b1");
    assert_eq!(mode(&backup_dir), 0o700);
    assert_eq!(mode(&backup_dir.join("files/tls")), 0o700);
    assert_eq!(mode(&backup_dir.join("files/tls/server.key")), 0o600);
    assert_eq!(mode(&backup_dir.join("esserver.redb")), 0o600);
    assert_eq!(mode(&backup_dir.join("manifest.json")), 0o600);
}

#[test]
fn a_volume_file_missing_from_the_store_is_listed_and_the_rest_is_backed_up() {
    let data = tempfile::tempdir().unwrap();
    let target = tempfile::tempdir().unwrap();
    let (store, writer, instrument_id, jpegs) = filled(data.path(), 40);
    writer.shutdown();
    // Volume 1 (sealed) is lost from the data directory.
    std::fs::remove_file(data.path().join("volumes/00000001.vol")).unwrap();
    let report = store
        .backup(target.path(), "b1", data.path(), T0, &mut quiet)
        .unwrap();
    assert_eq!(report.missing_volumes, vec![1]);
    let manifest = backup::read_manifest(target.path(), "b1").unwrap();
    assert_eq!(manifest.missing_volumes, vec![1]);
    assert!(!manifest
        .files
        .iter()
        .any(|f| matches!(f.kind, FileKind::Volume { id: 1, .. })));
    assert!(backup::verify(target.path(), None, &mut quiet)
        .unwrap()
        .is_clean());
    // Restored: the images of the other volumes read back; those of volume 1 are as lost
    // as they were in the store.
    let restored = tempfile::tempdir().unwrap();
    let dir = restored.path().join("data");
    backup::restore(target.path(), None, &dir, &mut quiet).unwrap();
    let copy = open(&dir);
    let last = jpegs.len() as u32 - 1;
    assert_eq!(
        read(&copy, instrument_id, last).as_ref(),
        Some(&jpegs[last as usize])
    );
    assert!(!copy.verify(&mut |_| {}).unwrap().is_clean());
}
