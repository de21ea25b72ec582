//! The storage side of the archive tier: sealed volumes whose copy lives in an object store.
//!
//! # Rules
//!
//! - Only a **sealed** volume whose local file is complete (trimmed to its committed `end`, its
//!   companion file written) is archived. A sealed volume never changes again, so its copy never
//!   goes stale.
//! - The caller (the server's archiver) uploads the volume's `[0, end)`, reads the object back
//!   and checks its size and SHA-256 against the local bytes, and only then submits
//!   [`VolumeArchived`]. Its commit is the one durable fact "this volume is in the object store".
//! - Only after that commit may the local file go ([`Store::remove_archived_local`], which reads
//!   the committed row again first). A crash between the two leaves a local file the next pass
//!   removes; a crash before the commit leaves an object no row names, which the next pass
//!   overwrites.
//! - Reads prefer the local file. When it is gone, [`crate::Reader`] finds the volume's row here
//!   and asks the [`ArchiveFetch`] the server installed ([`Store::set_archive_fetch`]) for the
//!   record's bytes: an HTTP range request, on a worker thread, never on an event loop. Every
//!   fetched record is checked like a local one (header CRC, key, SHA-256). A fetch that fails is
//!   `StorageError::ArchiveUnavailable` for that image and nothing else.
//!
//! This crate holds no HTTP client: the fetch is the server's (`src/archive/`).

use crate::apply::Batch;
use crate::error::{Refusal, StorageError, WriteError};
use crate::ops::{Applied, Operation};
use crate::store::Store;
use crate::tables::{self, decode, encode, ArchivedVolumeRow, VolumeRow};
use crate::volume::sync_directory;
use redb::ReadableTable;
use std::fmt;
use std::sync::Arc;

/// Reads records of archived volumes from the object store. Implemented by the server; called
/// from read snapshots on worker threads.
pub trait ArchiveFetch: Send + Sync + 'static {
    /// `length` bytes at `offset` of the archived volume `volume`, stored as `object`. The
    /// error says why, for a person (no credentials, no signed URLs).
    fn read_range(
        &self,
        volume: u32,
        object: &str,
        offset: u64,
        length: u32,
    ) -> Result<bytes::Bytes, String>;

    /// The bytes `read_range` gave for (volume, offset) did not check: forget any copy kept.
    fn discard(&self, _volume: u32, _offset: u64) {}
}

/// A volume as the index and the data directory know it, for the archiver and `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeState {
    pub id: u32,
    pub row: VolumeRow,
    /// Its object-store copy, when it was archived.
    pub archived: Option<ArchivedVolumeRow>,
    /// Bytes of the local file; None when there is none.
    pub local_bytes: Option<u64>,
    /// Its companion file (the list of its records) is written.
    pub companion: bool,
}

impl VolumeState {
    /// Sealed, complete on disk and not archived yet: the archiver may copy it.
    pub fn ready_to_archive(&self) -> bool {
        self.row.sealed
            && self.archived.is_none()
            && self.companion
            && self.local_bytes == Some(self.row.end)
    }
}

/// Records that `volume` is in the object store as `object`, `bytes` long with SHA-256
/// `sha256`, read back and checked by the caller. Refused when the volume is unknown, not
/// sealed, or its committed end is not `bytes`. Recording it again with the same object is a
/// no-op; with another object it replaces the row (the older copy was superseded).
#[derive(Debug, Clone)]
pub struct VolumeArchived {
    pub volume: u32,
    pub object: String,
    pub bytes: u64,
    pub sha256: [u8; 32],
    pub at_ms: i64,
}

/// Why [`VolumeArchived`] was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveRefusal {
    UnknownVolume(u32),
    NotSealed(u32),
    SizeMismatch { volume: u32, end: u64, bytes: u64 },
}

impl fmt::Display for ArchiveRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArchiveRefusal::UnknownVolume(id) => write!(f, "volume {id} is not in the index"),
            ArchiveRefusal::NotSealed(id) => {
                write!(
                    f,
                    "volume {id} is still active; only sealed volumes are archived"
                )
            }
            ArchiveRefusal::SizeMismatch { volume, end, bytes } => write!(
                f,
                "volume {volume} holds {end} committed bytes, the archived copy {bytes}"
            ),
        }
    }
}

impl Refusal for ArchiveRefusal {
    fn code(&self) -> &'static str {
        match self {
            ArchiveRefusal::UnknownVolume(_) => "unknown_volume",
            ArchiveRefusal::NotSealed(_) => "volume_not_sealed",
            ArchiveRefusal::SizeMismatch { .. } => "archive_size_mismatch",
        }
    }
}

/// Longest object key recorded (S3 allows 1024 bytes).
pub const OBJECT_KEY_BYTES_MAX: usize = 1024;

impl Operation for VolumeArchived {
    type Outcome = ();
    type Refusal = ArchiveRefusal;

    fn validate(&self) -> Result<(), String> {
        if self.object.is_empty() || self.object.len() > OBJECT_KEY_BYTES_MAX {
            return Err(format!(
                "the object key must be 1 to {OBJECT_KEY_BYTES_MAX} bytes, not {}",
                self.object.len()
            ));
        }
        if self.volume == 0 {
            return Err("volume ids start at 1".into());
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.volume_archived(self)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Batch<'_> {
    pub(crate) fn volume_archived(&mut self, op: &VolumeArchived) -> Applied<VolumeArchived> {
        let row: VolumeRow = match self.volume_rows().get(op.volume)? {
            Some(row) => decode(row.value(), "volume")?,
            None => {
                return Ok(Err(WriteError::Refused(ArchiveRefusal::UnknownVolume(
                    op.volume,
                ))))
            }
        };
        if !row.sealed {
            return Ok(Err(WriteError::Refused(ArchiveRefusal::NotSealed(
                op.volume,
            ))));
        }
        if row.end != op.bytes {
            return Ok(Err(WriteError::Refused(ArchiveRefusal::SizeMismatch {
                volume: op.volume,
                end: row.end,
                bytes: op.bytes,
            })));
        }
        let archived = ArchivedVolumeRow {
            object: op.object.clone(),
            bytes: op.bytes,
            sha256: op.sha256,
            archived_at_ms: op.at_ms,
        };
        if let Some(existing) = self.volume_archive().get(op.volume)? {
            let existing: ArchivedVolumeRow = decode(existing.value(), "archived volume")?;
            if existing.object == archived.object && existing.sha256 == archived.sha256 {
                return Ok(Ok(()));
            }
        }
        self.volume_archive()
            .insert(op.volume, encode(&archived).as_slice())?;
        Ok(Ok(()))
    }
}

impl Store {
    /// Installs the object-store reader for archived volumes (the server does, when
    /// `[Archive]` is configured). Without one, an archived image whose local file is gone is
    /// `ArchiveUnavailable`.
    pub fn set_archive_fetch(&self, fetch: Arc<dyn ArchiveFetch>) {
        self.inner.volumes.set_archive(Some(fetch));
    }

    /// Every volume of the index, with its archive row and what the data directory holds.
    pub fn volume_states(&self) -> Result<Vec<VolumeState>, StorageError> {
        let txn = self.inner.begin_read()?;
        let rows = txn.open_table(tables::VOLUMES)?;
        let archive = txn.open_table(tables::VOLUME_ARCHIVE)?;
        let volumes = &self.inner.volumes;
        let mut out = Vec::new();
        for entry in rows.range::<u32>(..)? {
            let (id, row) = entry?;
            let id = id.value();
            let row: VolumeRow = decode(row.value(), "volume")?;
            let archived = match archive.get(id)? {
                Some(value) => Some(decode::<ArchivedVolumeRow>(
                    value.value(),
                    "archived volume",
                )?),
                None => None,
            };
            out.push(VolumeState {
                id,
                row,
                archived,
                local_bytes: std::fs::metadata(volumes.path(id)).ok().map(|m| m.len()),
                companion: volumes.companion_path(id).exists(),
            });
        }
        Ok(out)
    }

    /// Reads every record of sealed volume `volume` that the index still names and checks it
    /// whole (header CRC, key, SHA-256), before it is archived: damage is found while the
    /// local copy can still be repaired (a resend, or the volume from a backup), not after it
    /// is gone. Returns the records checked; `Err` says which one is damaged.
    pub fn check_volume_records(&self, volume: u32) -> Result<u64, String> {
        let txn = self.inner.begin_read().map_err(|e| e.to_string())?;
        let rows = txn.open_table(tables::VOLUMES).map_err(|e| e.to_string())?;
        let row: VolumeRow = match rows.get(volume).map_err(|e| e.to_string())? {
            Some(row) => decode(row.value(), "volume").map_err(|e| e.to_string())?,
            None => return Err(format!("volume {volume} is not in the index")),
        };
        let acquisitions = txn
            .open_table(tables::ACQUISITIONS)
            .map_err(|e| e.to_string())?;
        let volumes = &self.inner.volumes;
        let mut checked = 0u64;
        let mut damage: Option<String> = None;
        crate::volume::walk(volumes, volume, row.end, &mut |walked| {
            let crate::volume::Walked::Record { offset, header } = walked else {
                return Ok(());
            };
            let key = header.image_key();
            let live = match acquisitions.get((key.0, key.1, key.2))? {
                Some(value) => tables::AcquisitionRow::decode(value.value())?
                    .location(key.3)
                    .is_some_and(|at| at.volume == volume && at.offset == offset),
                None => false,
            };
            if !live {
                return Ok(()); // a superseded copy
            }
            let location = crate::volume::Location {
                volume,
                offset,
                length: header.record_len() as u32,
            };
            match volumes.read_record(location, key) {
                Ok(_) => checked += 1,
                Err(crate::volume::ReadFailure::Damaged(reason)) if damage.is_none() => {
                    damage = Some(reason);
                }
                Err(crate::volume::ReadFailure::Io(error)) => return Err(error.into()),
                Err(_) => {}
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        match damage {
            Some(reason) => Err(format!(
                "volume {volume} holds a damaged image ({reason}); it is not archived (run \
                 esserver verify, and restore the volume from a backup)"
            )),
            None => Ok(checked),
        }
    }

    /// Reads the committed archive rows into memory (at open).
    pub(crate) fn load_archived(&self) -> Result<(), StorageError> {
        let txn = self.inner.begin_read()?;
        let archive = txn.open_table(tables::VOLUME_ARCHIVE)?;
        for entry in archive.range::<u32>(..)? {
            let (id, row) = entry?;
            let row: ArchivedVolumeRow = decode(row.value(), "archived volume")?;
            self.inner.volumes.note_archived(id.value(), row);
        }
        Ok(())
    }

    /// The path of a volume's local file (which may not exist), for the archiver's upload.
    pub fn volume_path(&self, volume: u32) -> std::path::PathBuf {
        self.inner.volumes.path(volume)
    }

    /// Removes the local file of `volume` once its archive row is committed (read again here:
    /// nothing is removed that the index does not name as archived). Ok(false) when there was
    /// no row or no file, or while a backup runs (its snapshot may predate the row and copy
    /// the file: the next pass removes it); its companion file stays (it is small and lists
    /// the records).
    pub fn remove_archived_local(&self, volume: u32) -> Result<bool, StorageError> {
        if self
            .inner
            .backups_running
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            tracing::info!(
                volume,
                "a backup is running: the archived volume's local file stays until the next pass"
            );
            return Ok(false);
        }
        let txn = self.inner.begin_read()?;
        let archive = txn.open_table(tables::VOLUME_ARCHIVE)?;
        let Some(row) = archive.get(volume)? else {
            return Ok(false);
        };
        let row: ArchivedVolumeRow = decode(row.value(), "archived volume")?;
        let volumes = &self.inner.volumes;
        volumes.note_archived(volume, row.clone());
        let path = volumes.path(volume);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() != row.bytes => {
                return Err(StorageError::Corrupt(format!(
                    "volume {volume}'s local file is {} bytes, its archived copy {}; the local \
                     file is kept",
                    meta.len(),
                    row.bytes
                )));
            }
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(error.into()),
        }
        std::fs::remove_file(&path)?;
        sync_directory(volumes.dir())?;
        volumes.forget(volume);
        tracing::info!(volume, object = %row.object, "local volume file removed: its archived copy was checked");
        Ok(true)
    }
}

/// Reads `length` bytes of an archived volume through `fetch`; `Err` is the reason.
pub(crate) fn fetch_record(
    fetch: Option<&Arc<dyn ArchiveFetch>>,
    volume: u32,
    row: &ArchivedVolumeRow,
    offset: u64,
    length: u32,
) -> Result<bytes::Bytes, String> {
    let Some(fetch) = fetch else {
        return Err(format!(
            "its volume {volume} is in the object store and this server has no [Archive] \
             configured to read it"
        ));
    };
    if offset.saturating_add(u64::from(length)) > row.bytes {
        return Err(format!(
            "the record at offset {offset} lies past the archived copy's {} bytes",
            row.bytes
        ));
    }
    let bytes = fetch.read_range(volume, &row.object, offset, length)?;
    if bytes.len() != length as usize {
        return Err(format!(
            "the object store returned {} bytes for a {length}-byte record",
            bytes.len()
        ));
    }
    Ok(bytes)
}
