//! Opening the database: file location, schema version check and migration, server id.

use crate::error::StorageError;
use crate::reader::Reader;
use crate::tables::{self, decode_u64, encode, encode_u64, StateRow};
use crate::volume::{Appender, ListedVolume, Recovery, Volumes};
use crate::writer::{Writer, WriterOptions};
use crate::{model, verify};
use parking_lot::{Mutex, RwLock};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The database file name inside the data directory.
pub const DATABASE_FILE_NAME: &str = "esserver.redb";

const MIB: u64 = 1024 * 1024;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// redb page cache.
    pub cache_bytes: u64,
    /// Change-log entries older than this (by their `at_ms`) are pruned by the writer, measured
    /// back from the newest `at_ms` of each batch. Must be >= 0.
    pub change_log_retention_ms: i64,
    /// An image volume is sealed, and the next one started, before a record would take it past
    /// this many bytes. At least 1 MiB.
    pub volume_bytes_max: u64,
    /// Write image records with `O_DIRECT` (no copy into the page cache) where the filesystem
    /// allows it; reads still go through the page cache.
    pub volume_direct_io: bool,
    /// Every commit also saves redb's allocator state, so that opening after a crash loads it
    /// instead of walking every B-tree of the database to rebuild it (redb's "quick repair").
    pub quick_repair: bool,
    /// The name new patients' `PatientIDx` begin with (`[Clinic] site_name`, by default the
    /// host name), kept as [`crate::tables::site_name`] makes it. Empty keeps the one the
    /// database has (`ESSERVER` when it has none).
    pub site_name: String,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            cache_bytes: 256 * MIB,
            change_log_retention_ms: 30 * DAY_MS,
            volume_bytes_max: 4 * 1024 * MIB,
            volume_direct_io: true,
            quick_repair: true,
            site_name: String::new(),
        }
    }
}

/// The open database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<StoreInner>,
}

/// Opens the database file again (the file, or the backend a test gave).
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// The database, opened for writing (the server, admin tools) or read-only (offline verify).
enum Db {
    Write(Database),
    Read(redb::ReadOnlyDatabase),
}

pub(crate) struct StoreInner {
    /// The open database. redb answers every call with an error after a failed I/O (a full
    /// disk, say) until the database is closed and opened again: the writer does that
    /// ([`Store::reopen`]), so this is replaced in place. `None` only during a reopen.
    db: RwLock<Option<Db>>,
    opener: Opener,
    /// Times the database was reopened after an I/O error.
    pub(crate) reopens: std::sync::atomic::AtomicU64,
    pub(crate) path: PathBuf,
    pub(crate) server_id: String,
    pub(crate) options: StoreOptions,
    /// Set while a writer thread runs: there is one writer at a time.
    pub(crate) writer_running: AtomicBool,
    /// Called by the writer after every commit that added changes (see [`Store::on_commit`]).
    pub(crate) commit_listeners: Mutex<Vec<CommitListener>>,
    /// The image volumes, read by everyone.
    pub(crate) volumes: Arc<Volumes>,
    /// Appends image records: used by the writer thread (and the migration before it). None
    /// for a store opened read-only.
    pub(crate) appender: Mutex<Option<Appender>>,
    /// What the opening found past the last index commit.
    pub(crate) recovery: Recovery,
    /// Backups under way: while one runs, no archived volume's local file is removed (its
    /// snapshot may predate the archive record and copy the file).
    pub(crate) backups_running: std::sync::atomic::AtomicU32,
}

impl StoreInner {
    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction, StorageError> {
        match self.db.read().as_ref() {
            Some(Db::Write(db)) => Ok(db.begin_read()?),
            Some(Db::Read(db)) => Ok(db.begin_read()?),
            None => Err(closed()),
        }
    }

    pub(crate) fn begin_write(&self) -> Result<redb::WriteTransaction, StorageError> {
        match self.db.read().as_ref() {
            Some(Db::Write(db)) => Ok(db.begin_write()?),
            Some(Db::Read(_)) => Err(StorageError::Redb(
                "the store is open read-only; it takes no writes".into(),
            )),
            None => Err(closed()),
        }
    }
}

fn closed() -> StorageError {
    StorageError::Io(std::io::Error::other(
        "the database is being reopened after an I/O error; try again",
    ))
}

/// Called with the newest change seq after a commit that logged changes.
pub type CommitListener = Box<dyn Fn(u64) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .field("server_id", &self.inner.server_id)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// The schema version this binary reads and writes.
    pub const SCHEMA_VERSION: u64 = tables::SCHEMA_VERSION;

    /// Opens or creates `<dir>/esserver.redb`, creating `dir`. A new database gets the schema
    /// version and the server id `hex(server_id_seed)`; an existing one keeps its id. A newer
    /// schema version is refused with `SchemaTooNew`; an older one is migrated in place.
    pub fn open(
        dir: &Path,
        options: &StoreOptions,
        server_id_seed: [u8; 16],
    ) -> Result<Store, StorageError> {
        let path = dir.join(DATABASE_FILE_NAME);
        let cache_bytes = usize::try_from(options.cache_bytes).unwrap_or(usize::MAX);
        let file = path.clone();
        let opener: Opener = Box::new(move || {
            Database::builder()
                .set_cache_size(cache_bytes)
                .create(&file)
        });
        Store::open_with(dir, options, server_id_seed, opener)
    }

    /// [`Store::open`] on a storage backend `backend` makes (called again for every reopen),
    /// for tests of disk failures. The database's path is still `<dir>/esserver.redb`.
    #[doc(hidden)]
    pub fn open_with_backend<B: redb::StorageBackend>(
        dir: &Path,
        options: &StoreOptions,
        server_id_seed: [u8; 16],
        backend: impl Fn() -> std::io::Result<B> + Send + Sync + 'static,
    ) -> Result<Store, StorageError> {
        let cache_bytes = usize::try_from(options.cache_bytes).unwrap_or(usize::MAX);
        let opener: Opener = Box::new(move || {
            Database::builder()
                .set_cache_size(cache_bytes)
                .create_with_backend(backend().map_err(redb::StorageError::from)?)
        });
        Store::open_with(dir, options, server_id_seed, opener)
    }

    fn open_with(
        dir: &Path,
        options: &StoreOptions,
        server_id_seed: [u8; 16],
        opener: Opener,
    ) -> Result<Store, StorageError> {
        assert!(options.change_log_retention_ms >= 0);
        assert!(
            options.volume_bytes_max >= MIB,
            "volumes hold at least 1 MiB"
        );
        std::fs::create_dir_all(dir)?;
        let path = dir.join(DATABASE_FILE_NAME);
        let created = !path.exists();
        let db = opener()?;
        if created {
            // The new file's directory entry must be durable too, or a power cut after the
            // first acknowledged write could lose the whole file.
            sync_directory(dir)?;
        }
        let server_id = prepare(&db, server_id_seed, &options.site_name)?;
        let volumes = Arc::new(Volumes::new(dir));
        let listed = list_volumes(&db)?;
        let (mut appender, recovery) = Appender::open(
            Arc::clone(&volumes),
            options.volume_bytes_max,
            options.volume_direct_io,
            &listed,
        )?;
        crate::migrate::move_legacy_images(&db, &mut appender)?;
        tracing::info!(path = %path.display(), %server_id, volumes = listed.len(), "storage opened");
        let store = Store::assemble(
            Db::Write(db),
            opener,
            path,
            server_id,
            options,
            volumes,
            Some(appender),
            recovery,
        );
        store.load_archived()?;
        Ok(store)
    }

    /// What opening the store cut off past the last index commit (never acknowledged).
    pub fn recovery(&self) -> Recovery {
        self.inner.recovery.clone()
    }

    /// The directory of the image volumes.
    pub fn volumes_dir(&self) -> PathBuf {
        self.inner.volumes.dir().to_path_buf()
    }

    /// Opens `<dir>/esserver.redb` read-only, changing nothing on disk: for checking a store
    /// no server runs on. A database of another schema version is refused (start the server
    /// once to migrate it), and so is one that was not closed cleanly: redb would have to
    /// repair it, which only a read-write open does (starting the server does it, in well
    /// under a second with quick repair).
    pub fn open_read_only(dir: &Path, options: &StoreOptions) -> Result<Store, StorageError> {
        let path = dir.join(DATABASE_FILE_NAME);
        if !path.exists() {
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no database at {}", path.display()),
            )));
        }
        let cache_bytes = usize::try_from(options.cache_bytes).unwrap_or(usize::MAX);
        let db = match redb::Builder::new()
            .set_cache_size(cache_bytes)
            .open_read_only(&path)
        {
            Ok(db) => db,
            Err(redb::DatabaseError::RepairAborted) => {
                return Err(StorageError::NeedsRecovery);
            }
            Err(error) => return Err(error.into()),
        };
        let server_id = {
            let txn = db.begin_read()?;
            let meta = txn.open_table(tables::META)?;
            let version = match meta.get(tables::META_SCHEMA_VERSION)? {
                Some(bytes) => decode_u64(bytes.value(), "schema version")?,
                None => return Err(StorageError::Corrupt("schema version is missing".into())),
            };
            if version > tables::SCHEMA_VERSION {
                return Err(StorageError::SchemaTooNew {
                    found: version,
                    supported: tables::SCHEMA_VERSION,
                });
            }
            if version < tables::SCHEMA_VERSION {
                return Err(StorageError::Corrupt(format!(
                    "schema version {version} is older than this esserver's ({}); start the \
                     server once to migrate it, then check it",
                    tables::SCHEMA_VERSION
                )));
            }
            read_server_id(&meta)?
        };
        let opener: Opener = Box::new(|| {
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(
                std::io::Error::other("a read-only store is not reopened"),
            )))
        });
        let store = Store::assemble(
            Db::Read(db),
            opener,
            path,
            server_id,
            options,
            Arc::new(Volumes::new(dir)),
            None,
            Recovery::default(),
        );
        store.load_archived()?;
        Ok(store)
    }

    /// The store around an opened database (read-write with its appender, or read-only).
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        db: Db,
        opener: Opener,
        path: PathBuf,
        server_id: String,
        options: &StoreOptions,
        volumes: Arc<Volumes>,
        appender: Option<Appender>,
        recovery: Recovery,
    ) -> Store {
        Store {
            inner: Arc::new(StoreInner {
                db: RwLock::new(Some(db)),
                opener,
                reopens: std::sync::atomic::AtomicU64::new(0),
                path,
                server_id,
                options: options.clone(),
                writer_running: AtomicBool::new(false),
                commit_listeners: Mutex::new(Vec::new()),
                volumes,
                appender: Mutex::new(appender),
                recovery,
                backups_running: std::sync::atomic::AtomicU32::new(0),
            }),
        }
    }

    /// 32 lowercase hex characters, fixed when the database was created.
    pub fn server_id(&self) -> String {
        self.inner.server_id.clone()
    }

    /// The `.redb` file.
    pub fn path(&self) -> PathBuf {
        self.inner.path.clone()
    }

    pub fn options(&self) -> &StoreOptions {
        &self.inner.options
    }

    /// A read snapshot (MVCC): sees every commit made before this call, nothing later.
    pub fn read(&self) -> Result<Reader, StorageError> {
        Ok(Reader::new(
            self.inner.begin_read()?,
            Arc::clone(&self.inner.volumes),
        ))
    }

    /// Closes the database and opens it again: after a failed I/O (ENOSPC, EIO) redb refuses
    /// every call until then. Read transactions still open on the old one end with an error.
    /// Retries for up to `patience` while the file cannot be opened yet.
    pub(crate) fn reopen(&self, patience: std::time::Duration) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        // Close under the lock, then retry the open without it: readers on the event loops
        // get a prompt "being reopened" error meanwhile instead of waiting on the lock.
        let old = self.inner.db.write().take();
        if let Some(Db::Write(old)) = old {
            if let Err(error) = old.close() {
                tracing::warn!(%error, "closing the database after an I/O error");
            }
        }
        let mut delay = std::time::Duration::from_millis(10);
        loop {
            match (self.inner.opener)() {
                Ok(db) => {
                    *self.inner.db.write() = Some(Db::Write(db));
                    self.inner.reopens.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %self.inner.path.display(),
                        "database reopened after an I/O error; writes go on");
                    return Ok(());
                }
                Err(error) if started.elapsed() < patience => {
                    tracing::warn!(%error, "cannot reopen the database yet; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(std::time::Duration::from_secs(1));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Times the database was reopened after an I/O error since it was opened.
    pub fn reopens(&self) -> u64 {
        self.inner.reopens.load(Ordering::Relaxed)
    }

    /// Registers `listener`, called on the writer thread after every commit that logged
    /// changes, with the newest change seq, once the commit is durable and after the batch's
    /// completions. It must not block (hand the seq to the loops and return).
    pub fn on_commit(&self, listener: CommitListener) {
        self.inner.commit_listeners.lock().push(listener);
    }

    /// True while the writer thread runs (the service's watchdog stops pinging when it has
    /// ended, by a panic say, so that the service manager restarts the server).
    pub fn writer_running(&self) -> bool {
        self.inner.writer_running.load(Ordering::Acquire)
    }

    /// Spawns the one writer thread ("es-storage-writer").
    ///
    /// # Panics
    /// If a writer of this store is running already: one thread owns all write transactions.
    pub fn start_writer(&self, options: WriterOptions) -> Writer {
        assert!(
            self.inner.appender.lock().is_some(),
            "a store opened read-only has no writer"
        );
        let already = self.inner.writer_running.swap(true, Ordering::AcqRel);
        assert!(!already, "a writer of this store is running already");
        Writer::start(self.clone(), options)
    }

    /// Checks every image's SHA-256 and the schema's invariants from one read snapshot.
    /// `progress` is called every 1000 images and at the end.
    pub fn verify(
        &self,
        progress: &mut dyn FnMut(model::VerifyProgress),
    ) -> Result<model::VerifyReport, StorageError> {
        crate::guarded("verify", || {
            let txn = self.inner.begin_read()?;
            verify::verify(&txn, &self.inner.volumes, progress)
        })
    }

    /// Test hook: flips one byte of a stored image's JPEG in place in its volume, keeping its
    /// header, so that reads and `verify` see a damaged image. Returns false if there is no such
    /// image.
    #[doc(hidden)]
    pub fn corrupt_image_for_tests(
        &self,
        instrument_id: u64,
        dish_id: &str,
        well: u32,
        focal_plane: i32,
        acquired_at_ms: i64,
    ) -> Result<bool, StorageError> {
        let Some(location) =
            self.image_location(instrument_id, dish_id, well, focal_plane, acquired_at_ms)?
        else {
            return Ok(false);
        };
        let path = self.inner.volumes.path(location.volume);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let last = location.offset + u64::from(location.length) - 1;
        let mut byte = [0u8; 1];
        crate::volume::read_exact_at(&file, &mut byte, last)?;
        byte[0] ^= 0x5a;
        crate::volume::write_all_at(&file, &byte, last)?;
        file.sync_data()?;
        Ok(true)
    }

    /// Test hook: after `bytes` more bytes of image records, volume writes fail as on a full
    /// disk (`None`: no limit).
    #[doc(hidden)]
    pub fn set_volume_write_budget_for_tests(&self, bytes: Option<u64>) {
        if let Some(appender) = self.inner.appender.lock().as_mut() {
            appender.set_write_budget(bytes);
        }
    }

    /// Where an image's record is (volume, offset, length), for tools and tests.
    pub fn image_location(
        &self,
        instrument_id: u64,
        dish_id: &str,
        well: u32,
        focal_plane: i32,
        acquired_at_ms: i64,
    ) -> Result<Option<tables::Location>, StorageError> {
        let txn = self.inner.begin_read()?;
        let by_instrument = txn.open_table(tables::DISH_BY_INSTRUMENT)?;
        let Some(dish_key) = by_instrument
            .get((instrument_id, dish_id))?
            .map(|g| g.value())
        else {
            return Ok(None);
        };
        let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
        let Some(row) = acquisitions.get((dish_key, well, acquired_at_ms))? else {
            return Ok(None);
        };
        let row = tables::AcquisitionRow::decode(row.value())?;
        Ok(row.location(focal_plane))
    }
}

/// The rows of the `volumes` table, by id.
fn list_volumes(db: &Database) -> Result<Vec<ListedVolume>, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(tables::VOLUMES)?;
    let archived: std::collections::HashSet<u32> = match txn.open_table(tables::VOLUME_ARCHIVE) {
        Ok(archive) => archive
            .range::<u32>(..)?
            .map(|entry| entry.map(|(id, _)| id.value()))
            .collect::<Result<_, _>>()?,
        Err(redb::TableError::TableDoesNotExist(_)) => Default::default(),
        Err(error) => return Err(error.into()),
    };
    let mut out = Vec::new();
    for entry in table.range::<u32>(..)? {
        let (id, row): (redb::AccessGuard<u32>, redb::AccessGuard<&[u8]>) = entry?;
        out.push(ListedVolume {
            id: id.value(),
            row: tables::decode(row.value(), "volume")?,
            archived: archived.contains(&id.value()),
        });
    }
    Ok(out)
}

/// Test hook: write a schema version into an existing database (no server may have it open).
pub fn set_schema_version_for_tests(dir: &Path, version: u64) -> Result<(), StorageError> {
    let db = Database::open(dir.join(DATABASE_FILE_NAME))?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut meta = txn.open_table(tables::META)?;
        meta.insert(tables::META_SCHEMA_VERSION, encode_u64(version).as_slice())?;
    }
    txn.commit()?;
    Ok(())
}

/// Initialises a new database or checks and migrates an existing one. Returns the server id.
fn prepare(
    db: &Database,
    server_id_seed: [u8; 16],
    site_name: &str,
) -> Result<String, StorageError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let server_id = {
        let mut meta = txn.open_table(tables::META)?;
        let had_rows = !meta.is_empty()?;
        let version = match meta.get(tables::META_SCHEMA_VERSION)? {
            Some(bytes) => Some(decode_u64(bytes.value(), "schema version")?),
            None => None,
        };
        // Before a migration, which mints PatientIDx values with it. An opener that names
        // none keeps the stored one.
        if !site_name.trim().is_empty() {
            meta.insert(
                tables::META_SITE_NAME,
                tables::site_name(site_name).as_bytes(),
            )?;
        }
        match version {
            None => {
                if had_rows {
                    return Err(StorageError::Corrupt(
                        "meta table has rows but no schema version".into(),
                    ));
                }
                let server_id = hex::encode(server_id_seed);
                let version = encode_u64(tables::SCHEMA_VERSION);
                meta.insert(tables::META_SCHEMA_VERSION, version.as_slice())?;
                meta.insert(tables::META_SERVER_ID, server_id.as_bytes())?;
                meta.insert(tables::META_STATE, encode(&StateRow::initial()).as_slice())?;
                meta.insert(
                    tables::META_IMS,
                    encode(&tables::ImsStateRow::default()).as_slice(),
                )?;
                tracing::info!(%server_id, "new database created");
            }
            Some(found) if found > tables::SCHEMA_VERSION => {
                return Err(StorageError::SchemaTooNew {
                    found,
                    supported: tables::SCHEMA_VERSION,
                });
            }
            Some(found) => {
                drop(meta);
                migrate(&txn, found)?;
                meta = txn.open_table(tables::META)?;
            }
        }
        read_server_id(&meta)?
    };

    tables::create_all(&txn)?;
    txn.commit()?;
    Ok(server_id)
}

fn read_server_id(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<String, StorageError> {
    let Some(bytes) = meta.get(tables::META_SERVER_ID)? else {
        return Err(StorageError::Corrupt("server id is missing".into()));
    };
    let server_id = String::from_utf8(bytes.value().to_vec())
        .map_err(|_| StorageError::Corrupt("server id is not UTF-8".into()))?;
    let well_formed = server_id.len() == 32 && server_id.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return Err(StorageError::Corrupt(format!(
            "server id {server_id:?} is not 32 hex characters"
        )));
    }
    Ok(server_id)
}

/// Brings a database of an older schema version up to [`tables::SCHEMA_VERSION`], one step at
/// a time, inside the opening transaction (all steps commit together or not at all).
fn migrate(txn: &redb::WriteTransaction, found: u64) -> Result<(), StorageError> {
    if found == 0 {
        return Err(StorageError::Corrupt(
            "schema version 0 is not valid".into(),
        ));
    }
    let mut version = found;
    while version < tables::SCHEMA_VERSION {
        tracing::info!(
            from = version,
            to = version + 1,
            "migrating database schema"
        );
        crate::migrate::step(txn, version)?;
        version += 1;
    }
    assert_eq!(version, tables::SCHEMA_VERSION);
    if found != version {
        let mut meta = txn.open_table(tables::META)?;
        meta.insert(tables::META_SCHEMA_VERSION, encode_u64(version).as_slice())?;
    }
    Ok(())
}

/// fsync of a directory, so entries created in it survive a power cut.
#[cfg(unix)]
fn sync_directory(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn sync_directory(_dir: &Path) -> Result<(), StorageError> {
    // NTFS journals directory entries; there is no directory handle to flush.
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_version_zero_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &StoreOptions::default(), [1; 16]).unwrap());
        set_schema_version_for_tests(dir.path(), 0).unwrap();
        let error = Store::open(dir.path(), &StoreOptions::default(), [1; 16]).unwrap_err();
        assert_eq!(error.code(), "database_corrupt");
    }

    /// A version-5 store (plain acquisition rows, worded acquisition changes) opens as the
    /// current version, reads every image as before, verifies clean and takes new planes into its old rows.
    #[test]
    fn a_version_5_store_opens_reads_and_grows_unchanged() {
        use crate::ops::{DishRegistration, InstrumentHello, PatientRef, PutImage, RegisterDish};
        use crate::ops::{ImageBytes, WellRegistration};
        #[derive(serde::Serialize)]
        struct PlainV5<'a> {
            planes: &'a [tables::PlaneRow],
            first_stored_at_ms: i64,
        }
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::default();
        let jpeg = |well: u32, plane: i32| {
            bytes::Bytes::from(format!("\u{ff}jpeg of well {well} plane {plane}").repeat(40))
        };
        let put = |instrument_id, well, plane, at| PutImage {
            instrument_id,
            dish_id: "D1".into(),
            well,
            focal_plane: plane,
            acquired_at_ms: at,
            jpeg: ImageBytes::new(jpeg(well, plane)),
            at_ms: at,
        };
        let instrument_id;
        {
            let store = Store::open(dir.path(), &options, [1; 16]).unwrap();
            let writer = store.start_writer(WriterOptions::default());
            instrument_id = writer
                .write(InstrumentHello {
                    number: 0,
                    serial: "S".into(),
                    model: "es-plus".into(),
                    firmware: "1".into(),
                    presented_secret: None,
                    new_secret: "x".into(),
                    issued_connection_open: false,
                    enrolment: Default::default(),
                    at_ms: 1,
                })
                .unwrap()
                .instrument_id;
            writer
                .write(RegisterDish {
                    instrument_id,
                    dish: DishRegistration {
                        fertilization_method: String::new(),
                        dish_id: "D1".into(),
                        slot: 1,
                        patient: PatientRef {
                            patient_idx: String::new(),
                            patient_id: "P".into(),
                            first_name: String::new(),
                            last_name: String::new(),
                            date_of_birth: String::new(),
                        },
                        treatment_name: "T".into(),
                        insemination_at_ms: 1,
                        wells: (1..=2)
                            .map(|well| WellRegistration {
                                label: String::new(),
                                well,
                                embryo_id: format!("E{well}"),
                            })
                            .collect(),
                    },
                    at_ms: 1,
                })
                .unwrap();
            for well in 1..=2 {
                for plane in -2..=2 {
                    writer
                        .write(put(instrument_id, well, plane, 1_000))
                        .unwrap();
                }
            }
            writer.shutdown();
        }
        // Write the rows back as version 5 did, and say version 5.
        {
            let db = Database::open(dir.path().join(DATABASE_FILE_NAME)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut rows = txn.open_table(tables::ACQUISITIONS).unwrap();
                let mut plain = Vec::new();
                for entry in rows.range::<tables::AcquisitionKey>(..).unwrap() {
                    let (key, value) = entry.unwrap();
                    let row = tables::AcquisitionRow::decode(value.value()).unwrap();
                    let bytes = tables::encode(&PlainV5 {
                        planes: &row.planes,
                        first_stored_at_ms: row.first_stored_at_ms,
                    });
                    plain.push((key.value(), bytes));
                }
                assert_eq!(plain.len(), 2);
                for (key, bytes) in plain {
                    rows.insert(key, bytes.as_slice()).unwrap();
                }
            }
            // Version 5 had no per-day counts.
            assert!(txn.delete_table(tables::INSTRUMENT_DAYS).unwrap());
            txn.commit().unwrap();
        }
        set_schema_version_for_tests(dir.path(), 5).unwrap();
        let store = Store::open(dir.path(), &options, [1; 16]).unwrap();
        {
            let reader = store.read().unwrap();
            for well in 1..=2 {
                for plane in -2..=2 {
                    let stored = reader
                        .image(instrument_id, "D1", well, plane, 1_000)
                        .unwrap();
                    assert_eq!(stored, Some(jpeg(well, plane)), "well {well} plane {plane}");
                }
            }
            let changes = reader.changes_after(0, 100).unwrap();
            let acquisitions: Vec<_> = changes
                .iter()
                .filter(|c| c.entity == crate::model::ChangeEntity::Acquisition)
                .collect();
            assert_eq!(acquisitions.len(), 2);
            assert_eq!(acquisitions[0].summary, "new acquisition of embryo E1");
            // Version 8's migration counted the images per instrument and day.
            let activity = reader.activity(tables::day_of(1_000), 7).unwrap();
            assert_eq!(activity.len(), 1);
            assert_eq!(activity[0].images_today, 10);
            let jpeg_bytes: usize = (1..=2)
                .flat_map(|well| (-2..=2).map(move |plane| jpeg(well, plane).len()))
                .sum();
            assert_eq!(activity[0].image_bytes_today, jpeg_bytes as u64);
            assert_eq!(activity[0].last_image_ms, 1_000);
        }
        assert!(store.verify(&mut |_| {}).unwrap().is_clean());
        let writer = store.start_writer(WriterOptions::default());
        writer.write(put(instrument_id, 1, 3, 1_000)).unwrap();
        writer.shutdown();
        let reader = store.read().unwrap();
        let activity = reader.activity(tables::day_of(1_000), 7).unwrap();
        assert_eq!(activity[0].images_today, 11);
        assert_eq!(
            reader.image(instrument_id, "D1", 1, 3, 1_000).unwrap(),
            Some(jpeg(1, 3))
        );
        assert_eq!(
            reader.image(instrument_id, "D1", 1, -2, 1_000).unwrap(),
            Some(jpeg(1, -2))
        );
        let version = {
            let txn = store.inner.begin_read().unwrap();
            let meta = txn.open_table(tables::META).unwrap();
            let bytes = meta.get(tables::META_SCHEMA_VERSION).unwrap().unwrap();
            tables::decode_u64(bytes.value(), "schema version").unwrap()
        };
        assert_eq!(version, tables::SCHEMA_VERSION);
    }

    #[test]
    fn second_open_of_the_same_file_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path(), &StoreOptions::default(), [1; 16]).unwrap();
        let error = Store::open(dir.path(), &StoreOptions::default(), [1; 16]).unwrap_err();
        assert_eq!(error.code(), "database_locked", "{error}");
    }
}
