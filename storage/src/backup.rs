//! Online backup, verification and restore of a store.
//!
//! # What a backup is
//!
//! One read transaction is the snapshot: the index (every table, copied row by row into a new
//! redb file) and, from the same transaction, the volume rows saying how many bytes of each
//! volume hold committed records. Each volume is copied up to that `end`: bytes before it
//! never change (volumes are append-only), so the copy is consistent with the index however
//! much is appended meanwhile. The server keeps running and writing throughout.
//!
//! # Layout of a backup target
//!
//! ```text
//! <target>/server-id                  the server the target belongs to (one per target)
//! <target>/volumes/NNNNNNNN-S.vol     sealed volumes, shared by every backup (S: when sealed)
//! <target>/backups/<name>/manifest.json
//! <target>/backups/<name>/esserver.redb
//! <target>/backups/<name>/volumes/NNNNNNNN.vol   the volume active at the snapshot, to its end
//! <target>/backups/<name>/files/...   the data directory's licence and TLS files
//! ```
//!
//! Incremental: a sealed volume never changes, so one already in the target (same id, same
//! sealing time, same length, listed by an earlier complete backup) is not copied again. A
//! backup is complete once its `manifest.json` exists: it is written last, after every file
//! it lists is durable, and the backup's directory is renamed from `<name>.partial` only
//! then. An interrupted backup leaves a `.partial` directory (and perhaps `.partial` volume
//! files) that the next backup removes; earlier backups are never touched.
//!
//! The manifest lists every file with its size and SHA-256, the schema version and the
//! change-log sequence number the backup holds. [`verify`] checks every file against it;
//! [`restore`] copies a backup into a new data directory, checking every byte on the way.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use redb::{Database, Durability, Key, ReadTransaction, TableDefinition, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::StorageError;
use crate::store::{Store, DATABASE_FILE_NAME};
use crate::tables::{self, VolumeRow};
use crate::volume::VOLUMES_DIR_NAME;

/// The manifest's file name in a backup's directory.
pub const MANIFEST_FILE_NAME: &str = "manifest.json";
/// The manifest format this code writes and reads.
pub const MANIFEST_FORMAT: u32 = 2;
/// The oldest manifest format this version reads (1 had no companion files).
const MANIFEST_FORMAT_MIN: u32 = 1;
/// Files of the data directory besides the store that a backup carries (when present): the
/// licence and the TLS identity viewers pin.
pub const DATA_FILES: [&str; 4] = [
    "license.json",
    "license-authority.key",
    "tls/server.crt",
    "tls/server.key",
];
const BACKUPS_DIR_NAME: &str = "backups";
const SERVER_ID_FILE_NAME: &str = "server-id";
const PARTIAL_SUFFIX: &str = ".partial";
const COPY_CHUNK_BYTES: usize = 1024 * 1024;
/// A data-directory file larger than this is not a licence or a TLS file: not carried.
const DATA_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// Why a backup, a verification or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    /// The target or the backup is not what it must be (another server's, no backup in it,
    /// a non-empty restore target, ...).
    #[error("{0}")]
    Refused(String),
    /// A file does not match its manifest entry.
    #[error("{0}")]
    Damaged(String),
    /// Asked to stop (the server shuts down); what was written is cleared by the next run.
    #[error("interrupted: the server is shutting down; the next backup starts afresh")]
    Interrupted,
}

impl BackupError {
    /// A stable code for scripts.
    pub fn code(&self) -> &'static str {
        match self {
            BackupError::Storage(error) => error.code(),
            BackupError::Io { .. } => "io_error",
            BackupError::Refused(_) => "refused",
            BackupError::Damaged(_) => "damaged",
            BackupError::Interrupted => "interrupted",
        }
    }
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// What a file of a backup is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileKind {
    /// The index (redb), restored as `esserver.redb`.
    Index,
    /// Volume `id`, restored as `volumes/NNNNNNNN.vol`.
    Volume { id: u32, sealed: bool },
    /// A file of the data directory, restored at `name` (one of [`DATA_FILES`]).
    DataFile { name: String },
    /// The companion file of archived volume `id` (its records' headers), restored as
    /// `volumes/NNNNNNNN.idx`: the volume itself is in the archive's object store, and the
    /// writer checks a resent image against the header listed there. Since format 2.
    Companion { id: u32 },
}

/// One file of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Relative to the backup target.
    pub path: String,
    pub bytes: u64,
    /// Hex.
    pub sha256: String,
    #[serde(flatten)]
    pub kind: FileKind,
    /// For a sealed volume: when it was sealed (part of its identity in the target).
    #[serde(default)]
    pub sealed_at_ms: i64,
}

/// A backup's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub server_id: String,
    pub schema_version: u64,
    /// The newest change-log entry the backup holds.
    pub change_seq: u64,
    pub created_at_ms: i64,
    pub images: u64,
    pub image_bytes: u64,
    pub files: Vec<ManifestFile>,
    /// Volumes the index names whose files were missing (or short) in the data directory
    /// when the backup was taken: their images are not in the backup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_volumes: Vec<u32>,
    /// Volumes whose checked copy is in the archive's object store (`[Archive]`): not copied;
    /// the backup's index names them, and a restored server reads them from there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub archived_volumes: Vec<ArchivedVolume>,
}

/// A volume in the archive's object store, as a manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedVolume {
    pub id: u32,
    pub object: String,
    pub bytes: u64,
    /// Hex.
    pub sha256: String,
}

impl Manifest {
    /// Bytes of every file the backup is made of.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// Where a backup stands, for progress output.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    /// "index", "volumes", "files", "verify", "restore".
    pub phase: &'static str,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a backup did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub name: String,
    /// Where the backup is: its directory, or its object-store prefix.
    pub location: String,
    pub files: u64,
    /// Bytes of every file the backup is made of.
    pub bytes: u64,
    /// Files and bytes copied by this run (the rest was in the target already).
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub change_seq: u64,
    pub schema_version: u64,
    pub images: u64,
    pub seconds: f64,
    /// Volumes whose files were missing in the data directory (their images are not in it).
    pub missing_volumes: Vec<u32>,
}

/// Calls `progress` at most every this many bytes of copying.
const PROGRESS_EVERY_BYTES: u64 = 16 * 1024 * 1024;

/// Progress of a copy, and its stop flag: what a [`Sink`] reports its bytes to.
pub struct Meter<'a> {
    progress: &'a mut dyn FnMut(&Progress),
    state: Progress,
    reported_at: u64,
    /// Set when the copy must stop.
    stop: Option<&'a std::sync::atomic::AtomicBool>,
}

impl<'a> Meter<'a> {
    fn new(
        progress: &'a mut dyn FnMut(&Progress),
        phase: &'static str,
        files_total: u64,
        bytes_total: u64,
        stop: Option<&'a std::sync::atomic::AtomicBool>,
    ) -> Meter<'a> {
        Meter {
            progress,
            state: Progress {
                phase,
                files_total,
                bytes_total,
                ..Progress::default()
            },
            reported_at: 0,
            stop,
        }
    }

    /// [`BackupError::Interrupted`] once the copy must stop.
    pub fn check_stop(&self) -> Result<(), BackupError> {
        match self.stop {
            Some(stop) if stop.load(std::sync::atomic::Ordering::Acquire) => {
                Err(BackupError::Interrupted)
            }
            _ => Ok(()),
        }
    }

    /// `bytes` more were copied.
    pub fn add_bytes(&mut self, bytes: u64) {
        self.state.bytes_done += bytes;
        if self.state.bytes_done - self.reported_at >= PROGRESS_EVERY_BYTES {
            self.reported_at = self.state.bytes_done;
            (self.progress)(&self.state);
        }
    }

    fn file_done(&mut self) {
        self.state.files_done += 1;
        self.reported_at = self.state.bytes_done;
        (self.progress)(&self.state);
    }
}

impl Store {
    /// Backs the store up into `target` as backup `name` while the store stays open for
    /// writing (see the module documentation). `progress` is called as files are copied.
    pub fn backup(
        &self,
        target: &Path,
        name: &str,
        data_dir: &Path,
        now_ms: i64,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<BackupReport, BackupError> {
        let never = std::sync::atomic::AtomicBool::new(false);
        self.backup_until(target, name, data_dir, now_ms, progress, &never)
    }

    /// [`Store::backup`] that stops with [`BackupError::Interrupted`] soon after `stop` is
    /// set (a server shutting down does not wait for a long backup).
    pub fn backup_until(
        &self,
        target: &Path,
        name: &str,
        data_dir: &Path,
        now_ms: i64,
        progress: &mut dyn FnMut(&Progress),
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<BackupReport, BackupError> {
        check_apart(target, data_dir)?;
        let sink = DirSink { target };
        self.backup_to(&sink, name, data_dir, now_ms, progress, stop)
    }

    /// Backs the store up into `sink` (a target directory, or an object store the server
    /// provides) as backup `name`; see the module documentation. Stops with
    /// [`BackupError::Interrupted`] soon after `stop` is set.
    pub fn backup_to(
        &self,
        sink: &dyn Sink,
        name: &str,
        data_dir: &Path,
        now_ms: i64,
        progress: &mut dyn FnMut(&Progress),
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<BackupReport, BackupError> {
        let started = Instant::now();
        check_name(name)?;
        // Before the snapshot: no archived volume's file goes until this backup ends.
        let _running = BackupRunning::new(&self.inner.backups_running);
        let txn = self.inner.begin_read()?;
        let server_id = self.server_id();
        sink.prepare(&server_id)?;
        let previous = list_from(sink.source())?.pop();
        let scratch = sink.begin(name)?;

        let archived = snapshot_archived(&txn)?;
        let (archived_rows, volumes): (Vec<VolumeEntry>, Vec<VolumeEntry>) =
            snapshot_volumes(&txn)?
                .into_iter()
                .partition(|(id, _)| archived.iter().any(|a| a.id == *id));
        let (schema_version, change_seq, images, image_bytes) = snapshot_meta(&txn)?;
        let volume_bytes: u64 = volumes.iter().map(|(_, row)| row.end).sum();
        // Small files, read whole now: one replaced meanwhile (a licence installed) is taken
        // as it was, never half of each.
        let data_files: Vec<(&str, Vec<u8>)> = DATA_FILES
            .iter()
            .filter_map(|name| {
                let path = data_dir.join(name);
                let small = fs::metadata(&path).ok()?.len() <= DATA_FILE_BYTES_MAX;
                Some((*name, fs::read(&path).ok().filter(|_| small)?))
            })
            .collect();
        let mut meter = Meter::new(
            progress,
            "index",
            volumes.len() as u64 + 1 + data_files.len() as u64,
            volume_bytes + data_files.iter().map(|(_, b)| b.len() as u64).sum::<u64>(),
            Some(stop),
        );
        (meter.progress)(&meter.state);

        // The index: every table of the snapshot, row by row, into a new database (in the
        // sink's staging directory, or a scratch file beside the data directory).
        let index_path = match &scratch {
            Some(dir) => dir.join(DATABASE_FILE_NAME),
            // One name, so a scratch file a killed backup left is replaced by the next.
            None => data_dir.join(format!("backup-index{PARTIAL_SUFFIX}")),
        };
        let _ = fs::remove_file(&index_path);
        let copied = copy_index(&txn, &index_path);
        // The volume rows are read: the volumes' committed bytes never change, so the
        // snapshot is not needed while they are copied (holding it for hours would keep
        // redb from reusing pages the writer frees meanwhile).
        drop(txn);
        let index_file = format!("{BACKUPS_DIR_NAME}/{name}/{DATABASE_FILE_NAME}");
        let index = copied.and_then(|()| {
            let (index_bytes, index_sha) = hash_file(&index_path, None)?;
            if scratch.is_none() {
                let mut file = File::open(&index_path)
                    .map_err(io_error(format!("cannot open {}", index_path.display())))?;
                let sent = sink.put(&index_file, &mut file, index_bytes, &mut meter)?;
                if sent != index_sha {
                    return Err(BackupError::Damaged(format!(
                        "{} changed while it was stored",
                        index_path.display()
                    )));
                }
            }
            Ok((index_bytes, index_sha))
        });
        if scratch.is_none() {
            let _ = fs::remove_file(&index_path);
        }
        let (index_bytes, index_sha) = index?;
        let mut files = vec![ManifestFile {
            path: index_file,
            bytes: index_bytes,
            sha256: index_sha,
            kind: FileKind::Index,
            sealed_at_ms: 0,
        }];
        let (mut files_copied, mut bytes_copied) = (1u64, index_bytes);
        meter.state.bytes_total += index_bytes;
        if scratch.is_some() {
            meter.add_bytes(index_bytes);
        }
        meter.file_done();

        // The volumes, each to its committed end.
        meter.state.phase = "volumes";
        let source_dir = self.inner.volumes.dir().to_path_buf();
        let mut missing_volumes = Vec::new();
        for (id, row) in &volumes {
            let source = source_dir.join(crate::volume::volume_file_name(*id));
            let short = fs::metadata(&source).map_or(true, |m| m.len() < row.end);
            if short {
                // The store lost this file (or part of it): the rest is backed up, and the
                // backup says what it lacks, rather than no backup at all.
                tracing::error!(volume = id, path = %source.display(),
                    "a volume file is missing or shorter than its committed records; the backup goes on without it and lists it as missing");
                missing_volumes.push(*id);
                meter.state.bytes_total -= row.end;
                meter.file_done();
                continue;
            }
            let (path, reused) = if row.sealed {
                let pooled = format!("{VOLUMES_DIR_NAME}/{}", pooled_name(*id, row.sealed_at_ms));
                let known = previous.as_ref().and_then(|m| {
                    m.files.iter().find(|f| {
                        f.kind
                            == FileKind::Volume {
                                id: *id,
                                sealed: true,
                            }
                            && f.sealed_at_ms == row.sealed_at_ms
                            && f.bytes == row.end
                    })
                });
                match known {
                    Some(known) if sink.pooled_size(&pooled)? == Some(row.end) => {
                        (pooled, Some(known.sha256.clone()))
                    }
                    _ => (pooled, None),
                }
            } else {
                (
                    format!(
                        "{BACKUPS_DIR_NAME}/{name}/{VOLUMES_DIR_NAME}/{}",
                        crate::volume::volume_file_name(*id)
                    ),
                    None,
                )
            };
            let sha256 = match reused {
                Some(sha256) => {
                    meter.state.bytes_total -= row.end;
                    sha256
                }
                None => {
                    let mut input = File::open(&source)
                        .map_err(io_error(format!("cannot open {}", source.display())))?;
                    let sha256 = sink.put(&path, &mut input, row.end, &mut meter)?;
                    files_copied += 1;
                    bytes_copied += row.end;
                    sha256
                }
            };
            files.push(ManifestFile {
                path,
                bytes: row.end,
                sha256,
                kind: FileKind::Volume {
                    id: *id,
                    sealed: row.sealed,
                },
                sealed_at_ms: row.sealed_at_ms,
            });
            meter.file_done();
        }

        // The companion files of the archived volumes (small; shared like sealed volumes).
        for (id, row) in &archived_rows {
            let source = self.inner.volumes.companion_path(*id);
            let Ok(meta) = fs::metadata(&source) else {
                tracing::warn!(volume = id, path = %source.display(),
                    "an archived volume's companion file is missing: a restored server refuses resends of its images");
                continue;
            };
            let pooled = format!(
                "{VOLUMES_DIR_NAME}/{}",
                pooled_companion_name(*id, row.sealed_at_ms)
            );
            let bytes = meta.len();
            let known = previous.as_ref().and_then(|m| {
                m.files
                    .iter()
                    .find(|f| f.kind == FileKind::Companion { id: *id } && f.path == pooled)
            });
            let sha256 = match known {
                Some(known)
                    if known.bytes == bytes && sink.pooled_size(&pooled)? == Some(bytes) =>
                {
                    known.sha256.clone()
                }
                _ => {
                    let mut input = File::open(&source)
                        .map_err(io_error(format!("cannot open {}", source.display())))?;
                    meter.state.bytes_total += bytes;
                    let sha256 = sink.put(&pooled, &mut input, bytes, &mut meter)?;
                    files_copied += 1;
                    bytes_copied += bytes;
                    sha256
                }
            };
            files.push(ManifestFile {
                path: pooled,
                bytes,
                sha256,
                kind: FileKind::Companion { id: *id },
                sealed_at_ms: row.sealed_at_ms,
            });
        }

        // The data directory's licence and TLS files.
        meter.state.phase = "files";
        for (file_name, content) in data_files {
            let path = format!("{BACKUPS_DIR_NAME}/{name}/files/{file_name}");
            let bytes = content.len() as u64;
            let sha256 = sink.put(&path, &mut content.as_slice(), bytes, &mut meter)?;
            meter.file_done();
            files_copied += 1;
            bytes_copied += bytes;
            files.push(ManifestFile {
                path,
                bytes,
                sha256,
                kind: FileKind::DataFile {
                    name: file_name.to_string(),
                },
                sealed_at_ms: 0,
            });
        }

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            name: name.to_string(),
            server_id,
            schema_version,
            change_seq,
            created_at_ms: now_ms,
            images,
            image_bytes,
            files,
            missing_volumes: missing_volumes.clone(),
            archived_volumes: archived,
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(|error| {
            BackupError::Refused(format!("cannot encode the manifest: {error}"))
        })?;
        meter.check_stop()?;
        sink.complete(name, &text)?;
        Ok(BackupReport {
            name: name.to_string(),
            location: sink.source().describe_backup(name),
            files: manifest.files.len() as u64,
            bytes: manifest.bytes(),
            files_copied,
            bytes_copied,
            change_seq,
            schema_version,
            images,
            seconds: started.elapsed().as_secs_f64(),
            missing_volumes,
        })
    }
}

/// Counts a backup under way for as long as it lives.
struct BackupRunning<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> BackupRunning<'a> {
    fn new(count: &'a std::sync::atomic::AtomicU32) -> BackupRunning<'a> {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        BackupRunning(count)
    }
}

impl Drop for BackupRunning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Where a backup is written: a target directory ([`DirSink`]), or an object store (the
/// server's). Paths are the manifest's, relative to the target and `/`-separated:
/// `volumes/<pooled name>` for the sealed volumes every backup shares, and
/// `backups/<name>/...` for a backup's own files. A backup is complete once
/// [`Sink::complete`] has stored its manifest, after everything it lists.
pub trait Sink {
    /// Reading the same target (for the previous backup, and for the report).
    fn source(&self) -> &dyn Source;
    /// Makes the target this server's (or checks that it is), and removes what an
    /// interrupted backup left there.
    fn prepare(&self, server_id: &str) -> Result<(), BackupError>;
    /// Starts backup `name` (refused when one of that name exists). Returns a local
    /// directory standing for `backups/<name>/` when the sink has one: the index is written
    /// straight into it, else into a scratch file and stored with [`Sink::put`].
    fn begin(&self, name: &str) -> Result<Option<PathBuf>, BackupError>;
    /// The size of the shared file at `path`, None when it is not there.
    fn pooled_size(&self, path: &str) -> Result<Option<u64>, BackupError>;
    /// Stores `bytes` bytes of `input` at `path`, whole or not at all (an input that ends
    /// early is an error); returns the SHA-256 (hex) of what was stored.
    fn put(
        &self,
        path: &str,
        input: &mut dyn Read,
        bytes: u64,
        meter: &mut Meter<'_>,
    ) -> Result<String, BackupError>;
    /// Completes backup `name`: its manifest, stored last.
    fn complete(&self, name: &str, manifest: &[u8]) -> Result<(), BackupError>;
    /// Removes complete backup `name` (its manifest first, so an interrupted removal leaves
    /// only what the next backup clears).
    fn remove_backup(&self, name: &str) -> Result<(), BackupError>;
    /// The shared volume files: (path, bytes).
    fn pooled(&self) -> Result<Vec<(String, u64)>, BackupError>;
    /// Removes the shared file at `path`.
    fn remove_pooled(&self, path: &str) -> Result<(), BackupError>;
}

/// A target directory, as a [`Sink`]: a backup's files are written under
/// `backups/<name>.partial/` (each file through a `.partial` name of its own), made durable,
/// and the directory renamed to `backups/<name>` once the manifest is in it.
pub struct DirSink<'a> {
    pub target: &'a Path,
}

impl DirSink<'_> {
    /// The local path of `path`: a backup's own files are in its `.partial` directory until
    /// it is complete.
    fn local(&self, path: &str) -> PathBuf {
        let mut parts = path.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(BACKUPS_DIR_NAME), Some(name), Some(rest)) => self
                .target
                .join(BACKUPS_DIR_NAME)
                .join(format!("{name}{PARTIAL_SUFFIX}"))
                .join(rest),
            _ => self.target.join(path),
        }
    }
}

impl Sink for DirSink<'_> {
    fn source(&self) -> &dyn Source {
        self
    }

    fn prepare(&self, server_id: &str) -> Result<(), BackupError> {
        prepare_target(self.target, server_id)
    }

    fn begin(&self, name: &str) -> Result<Option<PathBuf>, BackupError> {
        let backups = self.target.join(BACKUPS_DIR_NAME);
        let final_dir = backups.join(name);
        if final_dir.exists() {
            return Err(BackupError::Refused(format!(
                "a backup named {name} exists already in {}",
                backups.display()
            )));
        }
        let partial = backups.join(format!("{name}{PARTIAL_SUFFIX}"));
        create_private_dir(&partial.join(VOLUMES_DIR_NAME))?;
        Ok(Some(partial))
    }

    fn pooled_size(&self, path: &str) -> Result<Option<u64>, BackupError> {
        Ok(fs::metadata(self.target.join(path)).map(|m| m.len()).ok())
    }

    fn put(
        &self,
        path: &str,
        input: &mut dyn Read,
        bytes: u64,
        meter: &mut Meter<'_>,
    ) -> Result<String, BackupError> {
        let destination = self.local(path);
        if let Some(parent) = destination.parent() {
            create_private_dir(parent)?;
        }
        copy_prefix(input, path, &destination, bytes, meter)
    }

    fn complete(&self, name: &str, manifest: &[u8]) -> Result<(), BackupError> {
        let backups = self.target.join(BACKUPS_DIR_NAME);
        let partial = backups.join(format!("{name}{PARTIAL_SUFFIX}"));
        let final_dir = backups.join(name);
        write_durably(&partial.join(MANIFEST_FILE_NAME), manifest)?;
        sync_tree(&partial)?;
        sync_dir(&self.target.join(VOLUMES_DIR_NAME))?;
        fs::rename(&partial, &final_dir)
            .map_err(io_error(format!("cannot complete {}", final_dir.display())))?;
        sync_dir(&backups)
    }

    fn remove_backup(&self, name: &str) -> Result<(), BackupError> {
        let backups = self.target.join(BACKUPS_DIR_NAME);
        let dir = backups.join(name);
        let doomed = backups.join(format!("{name}{PARTIAL_SUFFIX}"));
        fs::rename(&dir, &doomed).map_err(io_error(format!("cannot remove {}", dir.display())))?;
        fs::remove_dir_all(&doomed)
            .map_err(io_error(format!("cannot remove {}", doomed.display())))?;
        sync_dir(&backups)
    }

    fn pooled(&self) -> Result<Vec<(String, u64)>, BackupError> {
        let pool = self.target.join(VOLUMES_DIR_NAME);
        let entries =
            fs::read_dir(&pool).map_err(io_error(format!("cannot list {}", pool.display())))?;
        Ok(entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let bytes = entry.metadata().map(|m| m.len()).unwrap_or(0);
                is_pooled_name(&name).then(|| (format!("{VOLUMES_DIR_NAME}/{name}"), bytes))
            })
            .collect())
    }

    fn remove_pooled(&self, path: &str) -> Result<(), BackupError> {
        let path = self.target.join(path);
        fs::remove_file(&path).map_err(io_error(format!("cannot remove {}", path.display())))?;
        sync_dir(&self.target.join(VOLUMES_DIR_NAME))
    }
}

/// Where backups are read from: a target directory ([`DirSink`] reads its own), or an object
/// store (the server's). Paths are the manifest's.
pub trait Source {
    /// The target, for messages: `/mnt/backup`, `s3://bucket/prefix`.
    fn describe(&self) -> String;
    /// Where backup `name` is, for messages and reports.
    fn describe_backup(&self, name: &str) -> String {
        format!("{}/{BACKUPS_DIR_NAME}/{name}", self.describe())
    }
    /// The names of the backups whose manifest is there.
    fn backup_names(&self) -> Result<Vec<String>, BackupError>;
    /// Opens the file at `path`.
    fn open(&self, path: &str) -> Result<Box<dyn Read + '_>, BackupError>;
}

impl Source for DirSink<'_> {
    fn describe(&self) -> String {
        self.target.display().to_string()
    }

    fn backup_names(&self) -> Result<Vec<String>, BackupError> {
        let dir = self.target.join(BACKUPS_DIR_NAME);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error(format!("cannot list {}", dir.display()))(error)),
        };
        Ok(entries
            .flatten()
            .filter(|e| e.path().join(MANIFEST_FILE_NAME).is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(PARTIAL_SUFFIX))
            .collect())
    }

    fn open(&self, path: &str) -> Result<Box<dyn Read + '_>, BackupError> {
        let path = self.target.join(path);
        let file =
            File::open(&path).map_err(io_error(format!("cannot open {}", path.display())))?;
        Ok(Box::new(file))
    }
}

/// Refuses a target that is the data directory, inside it, or holds it: a backup's shared
/// volumes beside the live ones, and a prune that removes what no backup lists, would
/// destroy the store.
fn check_apart(target: &Path, data_dir: &Path) -> Result<(), BackupError> {
    let resolve = |path: &Path| -> PathBuf {
        // The target may not exist yet: resolve its nearest existing ancestor.
        let mut existing = path.to_path_buf();
        let mut rest = Vec::new();
        while !existing.exists() {
            match (
                existing.file_name().map(|n| n.to_owned()),
                existing.parent(),
            ) {
                (Some(name), Some(parent)) => {
                    rest.push(name);
                    existing = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut resolved = fs::canonicalize(&existing).unwrap_or(existing);
        for name in rest.into_iter().rev() {
            resolved.push(name);
        }
        resolved
    };
    let (target, data) = (resolve(target), resolve(data_dir));
    if target.starts_with(&data) || data.starts_with(&target) {
        return Err(BackupError::Refused(format!(
            "the backup target {} and the data directory {} overlap: put backups on \
             another directory (another disk, ideally)",
            target.display(),
            data.display()
        )));
    }
    Ok(())
}

/// The name a shared volume file has in the target: only files named so are ever removed.
pub fn is_pooled_name(name: &str) -> bool {
    let Some(stem) = name
        .strip_suffix(".vol")
        .or_else(|| name.strip_suffix(".idx"))
    else {
        return false;
    };
    let Some((id, sealed)) = stem.split_once('-') else {
        return false;
    };
    id.len() == 8
        && id.bytes().all(|b| b.is_ascii_digit())
        && !sealed.is_empty()
        && sealed.bytes().all(|b| b.is_ascii_digit())
}

/// Creates `dir` (and its parents) readable by the owner only: a backup holds the patient
/// index, the licence authority's key and the TLS key.
fn create_private_dir(dir: &Path) -> Result<(), BackupError> {
    // Every directory this creates (not the ones that were there) is made owner-only.
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
        missing.push(path.to_path_buf());
        at = path.parent();
    }
    fs::create_dir_all(dir).map_err(io_error(format!("cannot create {}", dir.display())))?;
    for path in &missing {
        owner_only(path, true)?;
    }
    Ok(())
}

/// A restore is staged beside its target and renamed into place, which cannot work across
/// filesystems: an (empty) mount point is refused before anything is copied.
#[cfg(unix)]
fn refuse_mount_point(data_dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(here) = fs::metadata(data_dir) else {
        return Ok(());
    };
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match fs::metadata(parent) {
        Ok(above) if above.dev() != here.dev() => Err(BackupError::Refused(format!(
            "{} is a mount point; restore into a new directory on it, e.g. {}",
            data_dir.display(),
            data_dir.join("esserver").display()
        ))),
        _ => Ok(()),
    }
}

#[cfg(not(unix))]
fn refuse_mount_point(_data_dir: &Path) -> Result<(), BackupError> {
    Ok(())
}

/// Syncs every directory under `root` and `root` itself, deepest first.
fn sync_tree(root: &Path) -> Result<(), BackupError> {
    let entries =
        fs::read_dir(root).map_err(io_error(format!("cannot list {}", root.display())))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            sync_tree(&entry.path())?;
        }
    }
    sync_dir(root)
}

/// A backup's name becomes a directory name: letters, digits, `-`, `_`, `.` only.
fn check_name(name: &str) -> Result<(), BackupError> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.ends_with(PARTIAL_SUFFIX)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if fine {
        Ok(())
    } else {
        Err(BackupError::Refused(format!(
            "{name:?} is not a backup name (1 to 64 letters, digits, '-', '_', '.')"
        )))
    }
}

/// The name a sealed volume has in a target's shared `volumes/`.
pub fn pooled_name(id: u32, sealed_at_ms: i64) -> String {
    format!("{id:08}-{sealed_at_ms}.vol")
}

/// The name an archived volume's companion file has in a target's shared `volumes/`.
fn pooled_companion_name(id: u32, sealed_at_ms: i64) -> String {
    format!("{id:08}-{sealed_at_ms}.idx")
}

/// Makes `target` a backup target of `server_id` (or checks that it is one), and removes
/// what an interrupted backup left.
fn prepare_target(target: &Path, server_id: &str) -> Result<(), BackupError> {
    create_private_dir(target)?;
    create_private_dir(&target.join(BACKUPS_DIR_NAME))?;
    create_private_dir(&target.join(VOLUMES_DIR_NAME))?;
    let id_path = target.join(SERVER_ID_FILE_NAME);
    match fs::read_to_string(&id_path) {
        Ok(existing) if existing.trim() == server_id => {}
        Ok(existing) => {
            return Err(BackupError::Refused(format!(
                "{} holds the backups of server {}, not of this server ({server_id}): use \
                 another target",
                target.display(),
                existing.trim()
            )))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            write_durably(&id_path, format!("{server_id}\n").as_bytes())?;
            sync_dir(target)?;
        }
        Err(error) => {
            return Err(io_error(format!("cannot read {}", id_path.display()))(
                error,
            ))
        }
    }
    for dir in [target.join(BACKUPS_DIR_NAME), target.join(VOLUMES_DIR_NAME)] {
        let entries =
            fs::read_dir(&dir).map_err(io_error(format!("cannot list {}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(PARTIAL_SUFFIX) {
                continue;
            }
            tracing::warn!(path = %path.display(), "removing what an interrupted backup left");
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_error(format!("cannot remove {}", path.display())))?;
        }
    }
    Ok(())
}

/// The complete backups of `target`, oldest first (by when they were taken).
pub fn list(target: &Path) -> Result<Vec<Manifest>, BackupError> {
    list_from(&DirSink { target })
}

/// The complete backups of `source`, oldest first (by when they were taken).
pub fn list_from(source: &dyn Source) -> Result<Vec<Manifest>, BackupError> {
    let mut manifests = Vec::new();
    for name in source.backup_names()? {
        match read_manifest_from(source, &name) {
            Ok(manifest) => manifests.push(manifest),
            // One unreadable backup must not stop every later backup: it is left out (and
            // left alone), and `backup verify --name` reports what is wrong with it.
            Err(error) => tracing::warn!(
                backup = %name,
                target = %source.describe(),
                "a backup's manifest cannot be read; it is left out: {error}"
            ),
        }
    }
    // Oldest first by when they were taken (a name sorts wrongly after a clock step).
    manifests.sort_by(|a, b| (a.created_at_ms, &a.name).cmp(&(b.created_at_ms, &b.name)));
    Ok(manifests)
}

/// Longest manifest read.
const MANIFEST_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Reads backup `name`'s manifest.
pub fn read_manifest(target: &Path, name: &str) -> Result<Manifest, BackupError> {
    read_manifest_from(&DirSink { target }, name)
}

/// Reads backup `name`'s manifest from `source`.
pub fn read_manifest_from(source: &dyn Source, name: &str) -> Result<Manifest, BackupError> {
    check_name(name)?;
    let relative = format!("{BACKUPS_DIR_NAME}/{name}/{MANIFEST_FILE_NAME}");
    let path = format!("{}/{relative}", source.describe());
    let mut text = Vec::new();
    source
        .open(&relative)?
        .take(MANIFEST_BYTES_MAX)
        .read_to_end(&mut text)
        .map_err(io_error(format!("cannot read {path}")))?;
    let manifest: Manifest = serde_json::from_slice(&text).map_err(|error| {
        BackupError::Damaged(format!("{path} is not a backup manifest: {error}"))
    })?;
    if manifest.name != name {
        return Err(BackupError::Damaged(format!(
            "{path} names backup {:?}, not {name:?} (a copied or edited backup directory)",
            manifest.name
        )));
    }
    if !(MANIFEST_FORMAT_MIN..=MANIFEST_FORMAT).contains(&manifest.format) {
        return Err(BackupError::Refused(format!(
            "{path} has manifest format {}; this version reads {MANIFEST_FORMAT_MIN} to \
             {MANIFEST_FORMAT}",
            manifest.format
        )));
    }
    let indexes = manifest
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Index)
        .count();
    let mut volume_ids: Vec<u32> = manifest
        .files
        .iter()
        .filter_map(|f| match f.kind {
            FileKind::Volume { id, .. } => Some(id),
            _ => None,
        })
        .collect();
    let volumes = volume_ids.len();
    volume_ids.sort_unstable();
    volume_ids.dedup();
    if indexes != 1 || volume_ids.len() != volumes {
        return Err(BackupError::Damaged(format!(
            "{path} lists {indexes} index files and {volumes} volumes of which {} distinct; a \
             backup has one index and each volume once",
            volume_ids.len()
        )));
    }
    for file in &manifest.files {
        let safe = !file.path.is_empty()
            && !file.path.starts_with('/')
            && file
                .path
                .split('/')
                .all(|part| !part.is_empty() && part != "..");
        if !safe {
            return Err(BackupError::Damaged(format!(
                "{path} names a file outside the backup: {:?}",
                file.path
            )));
        }
    }
    Ok(manifest)
}

/// The backup `name`, or the newest complete one.
pub fn choose(target: &Path, name: Option<&str>) -> Result<Manifest, BackupError> {
    choose_from(&DirSink { target }, name)
}

/// The backup `name` of `source`, or the newest complete one.
pub fn choose_from(source: &dyn Source, name: Option<&str>) -> Result<Manifest, BackupError> {
    match name {
        Some(name) => read_manifest_from(source, name),
        None => list_from(source)?.pop().ok_or_else(|| {
            BackupError::Refused(format!("{} holds no complete backup", source.describe()))
        }),
    }
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// The backups removed, oldest first.
    pub removed: Vec<String>,
    /// Shared volume files no kept backup needs any more, removed.
    pub files_removed: u64,
    pub bytes_freed: u64,
}

/// Keeps the newest `keep` complete backups of `target` (at least one) and removes the
/// older ones, then the shared volumes no kept backup lists. A backup is removed by renaming
/// its directory to `.partial` first, so an interrupted prune leaves only what the next
/// backup clears.
pub fn prune(target: &Path, keep: usize) -> Result<PruneReport, BackupError> {
    prune_in(&DirSink { target }, keep)
}

/// [`prune`] of the backups in `sink`.
pub fn prune_in(sink: &dyn Sink, keep: usize) -> Result<PruneReport, BackupError> {
    let manifests = list_from(sink.source())?;
    let keep = keep.max(1);
    let mut report = PruneReport::default();
    if manifests.len() <= keep {
        return Ok(report);
    }
    let (old, kept) = manifests.split_at(manifests.len() - keep);
    for manifest in old {
        sink.remove_backup(&manifest.name)?;
        report.removed.push(manifest.name.clone());
    }
    let needed: std::collections::HashSet<&str> = kept
        .iter()
        .flat_map(|m| m.files.iter().map(|f| f.path.as_str()))
        .collect();
    for (path, bytes) in sink.pooled()? {
        if !needed.contains(path.as_str()) {
            sink.remove_pooled(&path)?;
            report.files_removed += 1;
            report.bytes_freed += bytes;
        }
    }
    Ok(report)
}

/// What a verification found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub name: String,
    pub files: u64,
    pub bytes: u64,
    /// One line per file that does not match its manifest entry.
    pub damaged: Vec<String>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty()
    }
}

/// Checks every file of backup `name` (the newest when None) against its manifest: size and
/// SHA-256.
pub fn verify(
    target: &Path,
    name: Option<&str>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<VerifyReport, BackupError> {
    verify_from(&DirSink { target }, name, progress)
}

/// [`verify`] of a backup in `source`.
pub fn verify_from(
    source: &dyn Source,
    name: Option<&str>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<VerifyReport, BackupError> {
    let manifest = choose_from(source, name)?;
    let files = manifest.files.len() as u64;
    let mut meter = Meter::new(progress, "verify", files, manifest.bytes(), None);
    let mut damaged = Vec::new();
    for file in &manifest.files {
        let hashed = source
            .open(&file.path)
            .and_then(|mut input| hash_stream(&mut input, &file.path, Some(&mut meter)));
        match hashed {
            Ok((bytes, sha256)) if bytes == file.bytes && sha256 == file.sha256 => {}
            Ok((bytes, _)) if bytes != file.bytes => damaged.push(format!(
                "{}: {bytes} bytes, the manifest says {}",
                file.path, file.bytes
            )),
            Ok(_) => damaged.push(format!(
                "{}: its SHA-256 is not the manifest's (the file is damaged)",
                file.path
            )),
            Err(error) => damaged.push(format!("{}: {error}", file.path)),
        }
        meter.file_done();
    }
    Ok(VerifyReport {
        files: manifest.files.len() as u64,
        bytes: manifest.bytes(),
        name: manifest.name,
        damaged,
    })
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub name: String,
    pub data_dir: PathBuf,
    pub files: u64,
    pub bytes: u64,
    pub change_seq: u64,
    pub images: u64,
    pub seconds: f64,
}

/// Restores backup `name` (the newest when None) of `target` into `data_dir`, which must not
/// exist or be empty. Every byte is checked against the manifest on the way; the data
/// directory appears (renamed from `<data_dir>.partial`) only once all of it is there and
/// durable, so an interrupted restore leaves nothing a server could start on.
pub fn restore(
    target: &Path,
    name: Option<&str>,
    data_dir: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RestoreReport, BackupError> {
    restore_from(&DirSink { target }, name, data_dir, progress)
}

/// [`restore`] of a backup in `source`.
pub fn restore_from(
    source: &dyn Source,
    name: Option<&str>,
    data_dir: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RestoreReport, BackupError> {
    let started = Instant::now();
    let manifest = choose_from(source, name)?;
    if let Ok(mut entries) = fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(BackupError::Refused(format!(
                "{} is not empty: restore into a new directory",
                data_dir.display()
            )));
        }
    }
    refuse_mount_point(data_dir)?;
    let mut partial = data_dir.as_os_str().to_owned();
    partial.push(PARTIAL_SUFFIX);
    let partial = PathBuf::from(partial);
    if partial.exists() {
        tracing::warn!(path = %partial.display(), "removing what an interrupted restore left");
        fs::remove_dir_all(&partial)
            .map_err(io_error(format!("cannot remove {}", partial.display())))?;
    }
    fs::create_dir_all(partial.join(VOLUMES_DIR_NAME))
        .map_err(io_error(format!("cannot create {}", partial.display())))?;
    owner_only(&partial, true)?;
    let files = manifest.files.len() as u64;
    let mut meter = Meter::new(progress, "restore", files, manifest.bytes(), None);
    for file in &manifest.files {
        let destination = match &file.kind {
            FileKind::Index => partial.join(DATABASE_FILE_NAME),
            FileKind::Volume { id, .. } => partial
                .join(VOLUMES_DIR_NAME)
                .join(crate::volume::volume_file_name(*id)),
            FileKind::Companion { id } => {
                partial.join(VOLUMES_DIR_NAME).join(format!("{id:08}.idx"))
            }
            FileKind::DataFile { name } if DATA_FILES.contains(&name.as_str()) => {
                partial.join(name)
            }
            FileKind::DataFile { name } => {
                return Err(BackupError::Damaged(format!(
                    "the manifest names an unknown data file {name:?}"
                )))
            }
        };
        if let Some(parent) = destination.parent() {
            fs::create_dir_all(parent)
                .map_err(io_error(format!("cannot create {}", parent.display())))?;
            owner_only(parent, true)?;
        }
        let mut input = source.open(&file.path)?;
        let sha256 = copy_prefix(&mut input, &file.path, &destination, file.bytes, &mut meter)?;
        if sha256 != file.sha256 {
            return Err(BackupError::Damaged(format!(
                "{}: its SHA-256 is not the manifest's (the backup file is damaged); nothing \
                 was restored",
                file.path
            )));
        }
        owner_only(&destination, false)?;
        meter.file_done();
    }
    sync_tree(&partial)?;
    if data_dir.exists() {
        // Empty (checked above): the rename replaces it.
        fs::remove_dir(data_dir)
            .map_err(io_error(format!("cannot replace {}", data_dir.display())))?;
    }
    fs::rename(&partial, data_dir)
        .map_err(io_error(format!("cannot complete {}", data_dir.display())))?;
    if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(RestoreReport {
        name: manifest.name.clone(),
        data_dir: data_dir.to_path_buf(),
        files: manifest.files.len() as u64,
        bytes: manifest.bytes(),
        change_seq: manifest.change_seq,
        images: manifest.images,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A volume row with its id.
type VolumeEntry = (u32, VolumeRow);

/// The volume rows of the snapshot.
fn snapshot_volumes(txn: &ReadTransaction) -> Result<Vec<(u32, VolumeRow)>, BackupError> {
    let table = txn
        .open_table(tables::VOLUMES)
        .map_err(StorageError::from)?;
    let mut out = Vec::new();
    for entry in table.range::<u32>(..).map_err(StorageError::from)? {
        let (id, row) = entry.map_err(StorageError::from)?;
        out.push((id.value(), tables::decode(row.value(), "volume")?));
    }
    Ok(out)
}

/// The snapshot's archived volumes (`volume_archive`).
fn snapshot_archived(txn: &ReadTransaction) -> Result<Vec<ArchivedVolume>, BackupError> {
    let table = txn
        .open_table(tables::VOLUME_ARCHIVE)
        .map_err(StorageError::from)?;
    let mut out = Vec::new();
    for entry in table.range::<u32>(..).map_err(StorageError::from)? {
        let (id, row) = entry.map_err(StorageError::from)?;
        let row: tables::ArchivedVolumeRow = tables::decode(row.value(), "archived volume")?;
        out.push(ArchivedVolume {
            id: id.value(),
            object: row.object,
            bytes: row.bytes,
            sha256: hex::encode(row.sha256),
        });
    }
    Ok(out)
}

/// (schema version, newest change seq, images, image bytes) of the snapshot.
fn snapshot_meta(txn: &ReadTransaction) -> Result<(u64, u64, u64, u64), BackupError> {
    let meta = txn.open_table(tables::META).map_err(StorageError::from)?;
    let version = meta
        .get(tables::META_SCHEMA_VERSION)
        .map_err(StorageError::from)?
        .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
        .map_or(0, u64::from_le_bytes);
    let state: tables::StateRow = match meta.get(tables::META_STATE).map_err(StorageError::from)? {
        Some(row) => tables::decode(row.value(), "state")?,
        None => tables::StateRow::default(),
    };
    Ok((
        version,
        state.change_last_seq,
        state.images,
        state.image_bytes,
    ))
}

/// Copies every row of `table` from the snapshot into `dst`.
fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    dst: &redb::WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, StorageError> {
    let source = match src.open_table(table) {
        Ok(source) => source,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(error) => return Err(error.into()),
    };
    let mut destination = dst.open_table(table)?;
    let mut rows = 0;
    for entry in source.range::<K::SelfType<'_>>(..)? {
        let (key, value) = entry?;
        destination.insert(key.value(), value.value())?;
        rows += 1;
    }
    Ok(rows)
}

/// Every table of the schema, in one list: `$f(args..., table)` for each (a generic function
/// called once per table type). A table a backup does not copy is a backup that loses data,
/// so [`copy_index`] also checks that the snapshot has no table outside this list.
macro_rules! every_table {
    ($f:ident $(, $arg:expr)*) => {
        [
            $f($($arg,)* tables::META)?,
            $f($($arg,)* tables::INSTRUMENTS)?,
            $f($($arg,)* tables::INSTRUMENT_BY_SERIAL)?,
            $f($($arg,)* tables::PATIENTS)?,
            $f($($arg,)* tables::PATIENT_BY_ID)?,
            $f($($arg,)* tables::PATIENT_BY_IDX)?,
            $f($($arg,)* tables::PATIENT_DIFFERENCES)?,
            $f($($arg,)* tables::TREATMENTS)?,
            $f($($arg,)* tables::TREATMENT_BY_PATIENT_NAME)?,
            $f($($arg,)* tables::DISHES)?,
            $f($($arg,)* tables::DISH_BY_INSTRUMENT)?,
            $f($($arg,)* tables::DISH_BY_TREATMENT)?,
            $f($($arg,)* tables::WELLS)?,
            $f($($arg,)* tables::EMBRYO_BY_ID)?,
            $f($($arg,)* tables::EMBRYO_BY_KEY)?,
            $f($($arg,)* tables::ANNOTATIONS)?,
            $f($($arg,)* tables::AUDIT)?,
            $f($($arg,)* tables::USERS)?,
            $f($($arg,)* tables::LOGIN_FAILURES)?,
            $f($($arg,)* tables::SCORES)?,
            $f($($arg,)* tables::TRANSFERS)?,
            $f($($arg,)* tables::TRANSFER_BY_TREATMENT)?,
            $f($($arg,)* tables::API_KEYS)?,
            $f($($arg,)* tables::IDEMPOTENCY)?,
            $f($($arg,)* tables::IDEMPOTENCY_BY_AGE)?,
            $f($($arg,)* tables::ACQUISITIONS)?,
            $f($($arg,)* tables::VOLUMES)?,
            $f($($arg,)* tables::VOLUME_ARCHIVE)?,
            $f($($arg,)* tables::MODELS)?,
            $f($($arg,)* tables::MODEL_RESULTS)?,
            $f($($arg,)* tables::ACTIVITY_CURVES)?,
            $f($($arg,)* tables::DEVICES)?,
            $f($($arg,)* tables::LEGACY_IMAGES)?,
            $f($($arg,)* tables::TELEMETRY)?,
            $f($($arg,)* tables::IMS_QUEUE)?,
            $f($($arg,)* tables::IMS_ALARMS)?,
            $f($($arg,)* tables::INSTRUMENT_DAYS)?,
            $f($($arg,)* tables::CHANGES)?,
        ]
    };
}

fn table_name<K: Key + 'static, V: Value + 'static>(
    table: TableDefinition<'static, K, V>,
) -> Result<String, StorageError> {
    use redb::TableHandle;
    Ok(table.name().to_string())
}

/// Writes the snapshot's tables into a new database at `path`, committed durably.
fn copy_index(txn: &ReadTransaction, path: &Path) -> Result<(), BackupError> {
    use redb::TableHandle;
    let known = every_table!(table_name);
    for table in txn.list_tables().map_err(StorageError::from)? {
        if !known.iter().any(|k| k == table.name()) {
            return Err(BackupError::Refused(format!(
                "the store has a table {:?} that the backup does not know; nothing was backed \
                 up (a bug: report it)",
                table.name()
            )));
        }
    }
    let db = Database::create(path).map_err(StorageError::from)?;
    let mut dst = db.begin_write().map_err(StorageError::from)?;
    dst.set_durability(Durability::Immediate)
        .map_err(StorageError::from)?;
    every_table!(copy_table, txn, &dst);
    dst.commit().map_err(StorageError::from)?;
    drop(db);
    owner_only(path, false)?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_error(format!("cannot sync {}", path.display())))?;
    Ok(())
}

/// Copies the first `bytes` bytes of `source` to `destination` (through
/// `<destination>.partial`, renamed once durable), and returns their SHA-256 (hex). A source
/// shorter than `bytes` is an error.
fn copy_prefix(
    input: &mut dyn Read,
    what: &str,
    destination: &Path,
    bytes: u64,
    meter: &mut Meter<'_>,
) -> Result<String, BackupError> {
    let mut temporary = destination.as_os_str().to_owned();
    temporary.push(PARTIAL_SUFFIX);
    let temporary = PathBuf::from(temporary);
    let mut output = create_private_file(&temporary)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; COPY_CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let want = buffer
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let read = input
            .read(&mut buffer[..want])
            .map_err(io_error(format!("cannot read {what}")))?;
        if read == 0 {
            return Err(BackupError::Damaged(format!(
                "{what} ends {left} bytes before the {bytes} the copy needs"
            )));
        }
        hasher.update(&buffer[..read]);
        output
            .write_all(&buffer[..read])
            .map_err(io_error(format!("cannot write {}", temporary.display())))?;
        left -= read as u64;
        meter.add_bytes(read as u64);
        meter.check_stop()?;
    }
    output
        .sync_all()
        .map_err(io_error(format!("cannot sync {}", temporary.display())))?;
    drop(output);
    fs::rename(&temporary, destination)
        .map_err(io_error(format!("cannot rename {}", temporary.display())))?;
    Ok(hex::encode(hasher.finalize()))
}

/// (length, SHA-256 hex) of a whole file.
fn hash_file(path: &Path, meter: Option<&mut Meter<'_>>) -> Result<(u64, String), BackupError> {
    let mut file = File::open(path).map_err(io_error(format!("cannot open {}", path.display())))?;
    hash_stream(&mut file, &path.display().to_string(), meter)
}

/// (length, SHA-256 hex) of everything `input` gives.
fn hash_stream(
    input: &mut dyn Read,
    what: &str,
    mut meter: Option<&mut Meter<'_>>,
) -> Result<(u64, String), BackupError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; COPY_CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let read = input
            .read(&mut buffer)
            .map_err(io_error(format!("cannot read {what}")))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        total += read as u64;
        if let Some(meter) = meter.as_deref_mut() {
            meter.add_bytes(read as u64);
        }
    }
    Ok((total, hex::encode(hasher.finalize())))
}

/// Creates (or truncates) `path` for writing, readable by the owner only.
fn create_private_file(path: &Path) -> Result<File, BackupError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map_err(io_error(format!("cannot create {}", path.display())))
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let mut file = create_private_file(path)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_error(format!("cannot write {}", path.display())))
}

fn sync_dir(path: &Path) -> Result<(), BackupError> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(format!("cannot sync {}", path.display())))
}

#[cfg(unix)]
fn owner_only(path: &Path, dir: bool) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if dir { 0o700 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_error(format!(
        "cannot set the permissions of {}",
        path.display()
    )))
}

#[cfg(not(unix))]
fn owner_only(_path: &Path, _dir: bool) -> Result<(), BackupError> {
    Ok(())
}
