//! Image volumes: append-only files holding the JPEG bytes, beside the redb index.
//!
//! # Layout
//!
//! `<data>/volumes/NNNNNNNN.vol`, numbered from 1. One volume is *active* (appended to); it is
//! *sealed* once the next record would take it past `volume_bytes_max`, and a sealed volume never
//! changes again. Which volumes exist, their state and how many bytes of each hold committed
//! records (`end`) is recorded in redb ([`crate::tables::VOLUMES`]), in the same transaction as
//! the index entries of those records.
//!
//! A volume is a sequence of records, packed, from offset 0 to its `end`. A record is readable
//! and checkable on its own, without the index (all integers little-endian):
//!
//! ```text
//!  0  [4]  magic "ESIM"
//!  4  u8   record format (1)
//!  5  u8   dish id length n (<= 128)
//!  6  u16  reserved, 0
//!  8  u32  JPEG length
//! 12  u32  well
//! 16  u64  dish key (redb surrogate key)
//! 24  u64  instrument id
//! 32  i64  acquired_at_ms
//! 40  i64  stored_at_ms
//! 48  i32  focal plane
//! 52  u32  CRC-32 of the header: bytes [0, 52) and [56, 88 + n)
//! 56  [32] SHA-256 of the JPEG
//! 88  [n]  dish id (UTF-8)
//! 88+n     JPEG bytes
//! ```
//!
//! The header's CRC covers the key, the lengths and the SHA-256; the SHA-256 covers the bytes.
//! So a record whose header CRC and SHA-256 both match is exactly what was written.
//!
//! # Durability
//!
//! The writer appends a batch's records to an in-memory buffer ([`Appender::append`]), writes
//! the buffer with one `pwrite` and makes it durable with one `fdatasync`
//! ([`Appender::sync`]), and only then commits the redb transaction holding the index entries and
//! the volume's new `end`. Bytes past the committed `end` were never acknowledged: at the next
//! start they are cut off (the next append overwrites them), see [`Appender::open`].

use crate::archive::ArchiveFetch;
use crate::error::StorageError;
use crate::tables::{self, VolumeRow};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory of the volumes inside the data directory.
pub const VOLUMES_DIR_NAME: &str = "volumes";

pub(crate) const MAGIC: [u8; 4] = *b"ESIM";
pub(crate) const RECORD_FORMAT: u8 = 1;
/// Bytes of the fixed part of a record header (before the dish id).
pub(crate) const HEADER_FIXED_BYTES: usize = 88;
const CRC_AT: usize = 52;
const SHA_AT: usize = 56;
/// Longest dish id a record carries (`limits::TEXT_BYTES_MAX`).
const DISH_ID_BYTES_MAX: usize = crate::limits::TEXT_BYTES_MAX;
/// Longest record: header, longest dish id, largest JPEG.
pub(crate) const RECORD_BYTES_MAX: u64 =
    (HEADER_FIXED_BYTES + DISH_ID_BYTES_MAX + crate::limits::JPEG_BYTES_MAX) as u64;
/// Volumes are grown by `fallocate` in steps of this many bytes, so most appends write into
/// space already allocated.
const PREALLOCATE_STEP_BYTES: u64 = 16 * 1024 * 1024;

/// The key and metadata of one record: what its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    pub dish_key: u64,
    pub instrument_id: u64,
    pub dish_id: String,
    pub well: u32,
    pub acquired_at_ms: i64,
    pub focal_plane: i32,
    pub stored_at_ms: i64,
    pub sha256: [u8; 32],
    pub jpeg_len: u32,
}

impl RecordHeader {
    /// Bytes of the header (fixed part and dish id).
    pub fn header_len(&self) -> usize {
        HEADER_FIXED_BYTES + self.dish_id.len()
    }

    /// Bytes of the whole record.
    pub fn record_len(&self) -> u64 {
        self.header_len() as u64 + u64::from(self.jpeg_len)
    }

    /// Appends the encoded header to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(self.dish_id.len() <= DISH_ID_BYTES_MAX, "dish id too long");
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.push(RECORD_FORMAT);
        out.push(self.dish_id.len() as u8);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.jpeg_len.to_le_bytes());
        out.extend_from_slice(&self.well.to_le_bytes());
        out.extend_from_slice(&self.dish_key.to_le_bytes());
        out.extend_from_slice(&self.instrument_id.to_le_bytes());
        out.extend_from_slice(&self.acquired_at_ms.to_le_bytes());
        out.extend_from_slice(&self.stored_at_ms.to_le_bytes());
        out.extend_from_slice(&self.focal_plane.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&self.sha256);
        out.extend_from_slice(self.dish_id.as_bytes());
        let header = &out[start..];
        assert_eq!(header.len(), self.header_len());
        let crc = header_crc(header);
        out[start + CRC_AT..start + CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a header from the start of `bytes`. `Ok(None)` when `bytes` is too short to hold
    /// the whole header; `Err` with the reason when it is not a valid header.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Option<RecordHeader>, String> {
        if bytes.len() < HEADER_FIXED_BYTES {
            return Ok(None);
        }
        if bytes[..4] != MAGIC {
            return Err("no record starts here (bad magic)".into());
        }
        if bytes[4] != RECORD_FORMAT {
            return Err(format!("unknown record format {}", bytes[4]));
        }
        let dish_id_len = usize::from(bytes[5]);
        if dish_id_len > DISH_ID_BYTES_MAX {
            return Err(format!("dish id length {dish_id_len} is out of bounds"));
        }
        let header_len = HEADER_FIXED_BYTES + dish_id_len;
        if bytes.len() < header_len {
            return Ok(None);
        }
        let header = &bytes[..header_len];
        let stored_crc = u32_at(header, CRC_AT);
        if header_crc(header) != stored_crc {
            return Err("record header checksum does not match".into());
        }
        let jpeg_len = u32_at(header, 8);
        if jpeg_len as usize > crate::limits::JPEG_BYTES_MAX {
            return Err(format!("record length {jpeg_len} is out of bounds"));
        }
        let dish_id = std::str::from_utf8(&header[HEADER_FIXED_BYTES..])
            .map_err(|_| "record dish id is not UTF-8".to_string())?
            .to_string();
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&header[SHA_AT..SHA_AT + 32]);
        Ok(Some(RecordHeader {
            jpeg_len,
            well: u32_at(header, 12),
            dish_key: u64_at(header, 16),
            instrument_id: u64_at(header, 24),
            acquired_at_ms: u64_at(header, 32) as i64,
            stored_at_ms: u64_at(header, 40) as i64,
            focal_plane: u32_at(header, 48) as i32,
            dish_id,
            sha256,
        }))
    }

    /// The image key of the record: (dish_key, well, acquired_at_ms, focal_plane).
    pub fn image_key(&self) -> tables::ImageKey {
        (
            self.dish_key,
            self.well,
            self.acquired_at_ms,
            self.focal_plane,
        )
    }
}

fn header_crc(header: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[..CRC_AT]);
    hasher.update(&header[CRC_AT + 4..]);
    hasher.finalize()
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Where a record is: its volume, its offset in it, and its whole length (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Location {
    /// 1 and up; 0 means "still in the version-4 `images` table" (during the migration).
    pub volume: u32,
    pub offset: u64,
    pub length: u32,
}

impl Location {
    pub(crate) const LEGACY: Location = Location {
        volume: 0,
        offset: 0,
        length: 0,
    };

    pub fn is_legacy(&self) -> bool {
        self.volume == 0
    }
}

/// A record read back and checked: its header and JPEG.
#[derive(Debug, Clone)]
pub struct Record {
    pub header: RecordHeader,
    pub jpeg: bytes::Bytes,
}

/// Why a record could not be read back intact.
#[derive(Debug)]
pub(crate) enum ReadFailure {
    /// The bytes are not the record the index names: bad header, other key, or a SHA-256
    /// mismatch. The reason is for people.
    Damaged(String),
    /// The disk or the file could not be read.
    Io(io::Error),
    /// The volume's file is not in the data directory (archived, or lost). The reason is for
    /// people.
    Missing(String),
}

impl ReadFailure {
    /// As a storage error about the image named by `key`.
    pub(crate) fn into_storage_error(self, key: String) -> StorageError {
        match self {
            ReadFailure::Damaged(reason) | ReadFailure::Missing(reason) => {
                tracing::error!(%key, %reason, "stored image is damaged");
                StorageError::ImageDamaged { key }
            }
            ReadFailure::Io(error) => StorageError::Io(error),
        }
    }
}

pub(crate) fn volume_file_name(volume: u32) -> String {
    format!("{volume:08}.vol")
}

/// Read access to every volume, shared by the readers (event loops, verify) and the writer.
/// Files are opened once and read with positioned reads (`pread`); the page cache caches.
pub(crate) struct Volumes {
    dir: PathBuf,
    files: RwLock<HashMap<u32, Arc<File>>>,
    /// Reads records of archived volumes whose file is gone (`crate::archive`).
    archive: RwLock<Option<Arc<dyn ArchiveFetch>>>,
    /// The committed `volume_archive` rows, kept current by the store: a read whose snapshot
    /// predates a volume's archive record, made after its file was removed, finds it here.
    archived: RwLock<HashMap<u32, tables::ArchivedVolumeRow>>,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Volumes {
    pub(crate) fn new(data_dir: &Path) -> Volumes {
        Volumes {
            dir: data_dir.join(VOLUMES_DIR_NAME),
            files: RwLock::new(HashMap::new()),
            archive: RwLock::new(None),
            archived: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn note_archived(&self, volume: u32, row: tables::ArchivedVolumeRow) {
        self.archived.write().insert(volume, row);
    }

    /// The archive row of `volume`, as last committed.
    pub(crate) fn archived_row(&self, volume: u32) -> Option<tables::ArchivedVolumeRow> {
        self.archived.read().get(&volume).cloned()
    }

    /// Every archived volume, as last committed.
    pub(crate) fn archived_ids(&self) -> Vec<u32> {
        self.archived.read().keys().copied().collect()
    }

    pub(crate) fn set_archive(&self, fetch: Option<Arc<dyn ArchiveFetch>>) {
        *self.archive.write() = fetch;
    }

    pub(crate) fn archive(&self) -> Option<Arc<dyn ArchiveFetch>> {
        self.archive.read().clone()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn path(&self, volume: u32) -> PathBuf {
        self.dir.join(volume_file_name(volume))
    }

    /// The companion file of a sealed volume: the list of its records.
    pub(crate) fn companion_path(&self, volume: u32) -> PathBuf {
        self.dir.join(format!("{volume:08}.idx"))
    }

    fn file(&self, volume: u32) -> io::Result<Arc<File>> {
        if let Some(file) = self.files.read().get(&volume) {
            return Ok(Arc::clone(file));
        }
        let file = Arc::new(File::open(self.path(volume))?);
        let mut files = self.files.write();
        Ok(Arc::clone(files.entry(volume).or_insert(file)))
    }

    /// Forgets open handles (after a volume file was replaced, in tests).
    pub(crate) fn forget(&self, volume: u32) {
        self.files.write().remove(&volume);
    }

    /// Reads `length` bytes at `offset` of `volume`. A short file is `UnexpectedEof`.
    pub(crate) fn read_at(&self, volume: u32, offset: u64, length: usize) -> io::Result<Vec<u8>> {
        let file = self.file(volume)?;
        let mut out = vec![0u8; length];
        read_exact_at(&file, &mut out, offset)?;
        Ok(out)
    }

    /// Reads the record at `location` and checks that it is the record of `key`, whole.
    pub(crate) fn read_record(
        &self,
        location: Location,
        key: tables::ImageKey,
    ) -> Result<Record, ReadFailure> {
        assert!(!location.is_legacy());
        let bytes = match self.read_at(location.volume, location.offset, location.length as usize) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ReadFailure::Damaged(format!(
                    "volume {} ends before the record at offset {}",
                    location.volume, location.offset
                )));
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Err(ReadFailure::Missing(format!(
                    "volume file {} is missing",
                    self.path(location.volume).display()
                )));
            }
            Err(error) => return Err(ReadFailure::Io(error)),
        };
        check_record(bytes, key).map_err(|reason| {
            ReadFailure::Damaged(format!(
                "volume {} offset {}: {reason}",
                location.volume, location.offset
            ))
        })
    }
}

/// Checks a whole record read from disk against the key the index names.
pub(crate) fn check_record(bytes: Vec<u8>, key: tables::ImageKey) -> Result<Record, String> {
    let header = match RecordHeader::decode(&bytes)? {
        Some(header) => header,
        None => return Err("record is shorter than its header".into()),
    };
    if header.image_key() != key {
        return Err(format!(
            "record holds image {:?}, not {key:?}",
            header.image_key()
        ));
    }
    if header.record_len() != bytes.len() as u64 {
        return Err(format!(
            "record is {} bytes, the index says {}",
            header.record_len(),
            bytes.len()
        ));
    }
    let mut bytes = bytes::Bytes::from(bytes);
    let jpeg = bytes.split_off(header.header_len());
    if tables::sha256(&jpeg) != header.sha256 {
        return Err("SHA-256 of the bytes does not match".into());
    }
    Ok(Record { header, jpeg })
}

#[cfg(unix)]
pub(crate) fn read_exact_at(file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, out, offset)
}

#[cfg(unix)]
pub(crate) fn write_all_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

#[cfg(windows)]
pub(crate) fn read_exact_at(file: &File, mut out: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !out.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, out, offset) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                out = &mut out[n..];
                offset += n as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(windows)]
pub(crate) fn write_all_at(file: &File, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    while !bytes.is_empty() {
        match std::os::windows::fs::FileExt::seek_write(file, bytes, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                bytes = &bytes[n..];
                offset += n as u64;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Grows the file's allocation to at least `len` bytes without writing data, so later appends
/// do not allocate. Falls back to nothing where the filesystem cannot (the appends then
/// allocate as they go).
#[cfg(target_os = "linux")]
fn preallocate(file: &File, from: u64, len: u64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else {
        return Err(io::Error::other("preallocation range out of bounds"));
    };
    // SAFETY: fallocate on a file descriptor we own; no memory is passed.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, length) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(error),
    }
}

#[cfg(not(target_os = "linux"))]
fn preallocate(_file: &File, _from: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> io::Result<File> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "direct I/O is used on Linux only",
    ))
}

/// `fdatasync`: the data and what is needed to read it back, not the timestamps.
fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}

/// Bytes of one direct-I/O block: `O_DIRECT` writes start and end on multiples of it, from a
/// buffer aligned to it. 4096 suits disks of 512- and 4096-byte sectors alike.
const BLOCK_BYTES: usize = 4096;

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; BLOCK_BYTES]);

/// A growable byte buffer whose start is aligned for `O_DIRECT`.
#[derive(Default)]
struct AlignedBuf {
    blocks: Vec<Block>,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl AlignedBuf {
    fn capacity(&self) -> usize {
        self.blocks.len() * BLOCK_BYTES
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `blocks` is one contiguous allocation of plain bytes, `capacity()` long.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.capacity()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        let capacity = self.capacity();
        // SAFETY: as in `bytes`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), capacity) }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes()[..self.len]
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        let need = self.len + data.len();
        if need > self.capacity() {
            let blocks = need.div_ceil(BLOCK_BYTES).max(self.blocks.len() * 2);
            self.blocks.resize(blocks, Block([0; BLOCK_BYTES]));
        }
        let len = self.len;
        self.bytes_mut()[len..need].copy_from_slice(data);
        self.len = need;
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes, padded with zeros to a whole number of blocks.
    fn padded(&mut self) -> &[u8] {
        let padded = self.len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let len = self.len;
        self.bytes_mut()[len..padded].fill(0);
        &self.bytes()[..padded]
    }

    /// Keeps only the last `keep` bytes, moved to the start.
    fn keep_last(&mut self, keep: usize) {
        assert!(keep <= self.len);
        let len = self.len;
        self.bytes_mut().copy_within(len - keep..len, 0);
        self.len = keep;
    }
}

/// The records of the batch being applied, not yet written. With direct I/O the buffer starts
/// with the bytes of the volume's last partial block (`prefix` of them, already on disk), so
/// the write can start on a block boundary.
#[derive(Debug, Default)]
struct Pending {
    buf: AlignedBuf,
    prefix: usize,
    /// Scratch for encoding one record header.
    header: Vec<u8>,
}

impl Pending {
    fn records_len(&self) -> usize {
        self.buf.len - self.prefix
    }

    fn records(&self) -> &[u8] {
        &self.buf.as_slice()[self.prefix..]
    }

    fn push(&mut self, header: &RecordHeader, jpeg: &[u8]) {
        self.header.clear();
        header.encode_into(&mut self.header);
        self.buf.extend_from_slice(&self.header);
        self.buf.extend_from_slice(jpeg);
    }

    /// Forgets the records (the prefix stays).
    fn discard(&mut self) {
        self.buf.truncate(self.prefix);
    }

    /// The records were written and committed, ending at `end`: keep what direct I/O needs of
    /// the last partial block.
    fn written(&mut self, end: u64, direct: bool) {
        let keep = if direct {
            (end % BLOCK_BYTES as u64) as usize
        } else {
            0
        };
        self.buf.keep_last(keep.min(self.buf.len));
        self.prefix = self.buf.len;
    }
}

/// The volume being appended to.
#[derive(Debug)]
struct Active {
    id: u32,
    file: File,
    /// The same file opened with `O_DIRECT` for writing, when the filesystem allows it.
    direct: Option<File>,
    /// Bytes of committed records: everything before is durable and indexed.
    end: u64,
    /// Bytes allocated (file length).
    allocated: u64,
    /// Records of the batch being applied, not yet written; they go at `end`.
    pending: Pending,
    /// Records in `[0, end)` (for the row in redb).
    records: u64,
    pending_records: u64,
    created_at_ms: i64,
    /// The companion file's list of the committed records, kept while the volume fills so
    /// that sealing it reads nothing back. None for a volume this appender did not start
    /// (active at a restart): its companion is written by walking it.
    listed: Option<Listed>,
    /// The same for the records of the batch being applied.
    pending_listed: Listed,
}

/// The most memory a volume's kept list of records may take (about 120 bytes a record: 30 KB
/// images fill a 4 GiB volume with some 140,000, 17 MB); past it the volume is walked when it
/// is sealed.
const LISTED_BYTES_MAX: usize = 64 << 20;

/// Records as a companion file lists them: per record its offset (u64 LE) and its header as
/// it is in the volume.
#[derive(Debug, Default)]
pub(crate) struct Listed {
    body: Vec<u8>,
    records: u64,
}

impl Listed {
    fn push(&mut self, offset: u64, header: &RecordHeader) {
        self.body.extend_from_slice(&offset.to_le_bytes());
        header.encode_into(&mut self.body);
        self.records += 1;
    }

    fn append(&mut self, other: &mut Listed) {
        self.body.append(&mut other.body);
        self.records += std::mem::take(&mut other.records);
    }

    fn clear(&mut self) {
        self.body.clear();
        self.records = 0;
    }
}

/// What a batch changed about the volumes, to be written into its transaction.
#[derive(Debug, Default)]
pub(crate) struct VolumeChanges {
    /// Rows to insert or replace in `volumes`.
    pub rows: Vec<(u32, VolumeRow)>,
}

/// The append side: owned by the one writer (the writer thread, or the migration before it
/// starts). See the module documentation for the order of writes.
#[derive(Debug)]
pub(crate) struct Appender {
    volumes: Arc<Volumes>,
    volume_bytes_max: u64,
    active: Option<Active>,
    /// Volumes filled during the current batch: written, to be synced and sealed with it.
    filling: Vec<Active>,
    /// Sealed by the last committed batch: the preallocated tails are to be cut off; with
    /// their records' list when it was kept.
    sealed_to_trim: Vec<(u32, u64, Option<Listed>)>,
    /// The highest volume id in use (rows and files).
    id_last: u32,
    /// The first volume the current batch created, if it created one.
    batch_new_from: Option<u32>,
    /// An active volume whose file was missing at open: sealed with the next batch.
    seal_missing: Option<(u32, VolumeRow)>,
    /// Test hook: bytes the appender may still write before writes fail as on a full disk.
    write_budget: Option<u64>,
    /// Write records with `O_DIRECT` where the filesystem allows it.
    direct_io: bool,
    /// Sealed volumes whose companion file is still to be written: (id, end, the records'
    /// list when it was kept; else the volume is walked).
    companions_due: Vec<(u32, u64, Option<Listed>)>,
}

/// One volume as redb's `volumes` table lists it, for `Appender::open`.
#[derive(Debug, Clone)]
pub(crate) struct ListedVolume {
    pub id: u32,
    pub row: VolumeRow,
    /// Its checked copy is in the object store (`crate::archive`): its local file may be gone.
    pub archived: bool,
}

/// What [`Appender::open`] found and did, for the log and `status`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes past the active volume's committed end that were cut off (never acknowledged).
    pub tail_bytes_cut: u64,
    /// Whole records found in that tail (written, synced or not, but never indexed).
    pub tail_records_cut: u64,
    /// Volume files without a row (created by a batch that never committed), removed.
    pub files_removed: u64,
}

impl Appender {
    /// Opens the active volume listed last in `listed` (sorted by id) and cuts off whatever lies
    /// past its committed end: records written by a batch whose index commit never happened,
    /// so never acknowledged. Removes volume files that no row names (made by such a batch).
    /// Reads only the tail past the committed end.
    pub(crate) fn open(
        volumes: Arc<Volumes>,
        volume_bytes_max: u64,
        direct_io: bool,
        listed: &[ListedVolume],
    ) -> Result<(Appender, Recovery), StorageError> {
        assert!(volume_bytes_max >= RECORD_BYTES_MAX.min(1 << 20));
        std::fs::create_dir_all(volumes.dir())?;
        let mut recovery = Recovery::default();
        let id_last = listed.last().map_or(0, |v| v.id);
        // Files of volumes no committed row names: only unacknowledged bytes.
        for entry in std::fs::read_dir(volumes.dir())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".vol"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if id > id_last {
                tracing::warn!(
                    volume = id,
                    "removing a volume file no commit names (never acknowledged)"
                );
                std::fs::remove_file(entry.path())?;
                recovery.files_removed += 1;
            }
        }
        if recovery.files_removed > 0 {
            sync_directory(volumes.dir())?;
        }
        let mut appender = Appender {
            volumes,
            volume_bytes_max,
            active: None,
            filling: Vec::new(),
            sealed_to_trim: Vec::new(),
            id_last,
            batch_new_from: None,
            seal_missing: None,
            write_budget: None,
            direct_io,
            companions_due: Vec::new(),
        };
        for listed in listed {
            if listed.row.sealed
                && !appender.volumes.companion_path(listed.id).exists()
                && appender.volumes.path(listed.id).exists()
            {
                appender
                    .companions_due
                    .push((listed.id, listed.row.end, None));
            }
            if listed.row.sealed {
                let path = appender.volumes.path(listed.id);
                if let Ok(meta) = std::fs::metadata(&path) {
                    if meta.len() > listed.row.end {
                        // Sealed, but the preallocated tail was not cut yet.
                        appender
                            .sealed_to_trim
                            .push((listed.id, listed.row.end, None));
                    }
                } else if listed.archived {
                    // Its images are read from the object store.
                } else {
                    tracing::error!(volume = listed.id, path = %path.display(),
                        "a sealed volume file is missing: its images cannot be read");
                }
            }
        }
        if let Some(last) = listed.last().filter(|v| !v.row.sealed) {
            let path = appender.volumes.path(last.id);
            let file = match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            {
                Ok(file) => file,
                Err(error) if error.kind() == io::ErrorKind::NotFound => {
                    tracing::error!(volume = last.id, path = %path.display(),
                        "the active volume file is missing: its images cannot be read; \
                         new images go to a new volume");
                    appender.seal_missing = Some((last.id, last.row.clone()));
                    appender.trim_sealed();
                    return Ok((appender, recovery));
                }
                Err(error) => return Err(error.into()),
            };
            let allocated = file.metadata()?.len();
            if allocated < last.row.end {
                // Shorter than its committed records: damaged or cut by hand. Its readable
                // records still serve; new images go to a new volume.
                tracing::error!(
                    volume = last.id,
                    bytes = allocated,
                    end = last.row.end,
                    "the active volume file is shorter than its committed records; \
                     sealing it and starting a new volume"
                );
                appender.seal_missing = Some((last.id, last.row.clone()));
                appender.trim_sealed();
                return Ok((appender, recovery));
            }
            let (records, bytes) = scan_tail(&file, last.row.end, allocated);
            recovery.tail_records_cut = records;
            recovery.tail_bytes_cut = bytes;
            if records > 0 || bytes > 0 {
                tracing::warn!(
                    volume = last.id,
                    end = last.row.end,
                    records,
                    bytes,
                    "cut off records past the last index commit (never acknowledged)"
                );
            }
            let direct = appender.open_direct(&path);
            let mut pending = Pending::default();
            if direct.is_some() {
                // The last partial block, which the next direct write rewrites whole.
                let start = last.row.end - last.row.end % BLOCK_BYTES as u64;
                let mut tail = vec![0u8; (last.row.end - start) as usize];
                read_exact_at(&file, &mut tail, start)?;
                pending.buf.extend_from_slice(&tail);
                pending.prefix = tail.len();
            }
            appender.active = Some(Active {
                id: last.id,
                file,
                direct,
                end: last.row.end,
                allocated,
                pending,
                records: last.row.records,
                pending_records: 0,
                created_at_ms: last.row.created_at_ms,
                listed: None,
                pending_listed: Listed::default(),
            });
        }
        appender.trim_sealed();
        Ok((appender, recovery))
    }

    /// Adds a record to the current batch. Returns where it will be once the batch is synced.
    /// Starts a new volume (sealing the full one with this batch) when the record would take
    /// the active one past `volume_bytes_max`.
    pub(crate) fn append(
        &mut self,
        header: &RecordHeader,
        jpeg: &[u8],
        at_ms: i64,
    ) -> Result<Location, StorageError> {
        assert_eq!(header.jpeg_len as usize, jpeg.len());
        let record_len = header.record_len();
        let full = self.active.as_ref().is_none_or(|active| {
            let used = active.end + active.pending.records_len() as u64;
            used > 0 && used + record_len > self.volume_bytes_max
        });
        if full {
            self.start_volume(at_ms)?;
        }
        let active = self.active.as_mut().expect("an active volume");
        let offset = active.end + active.pending.records_len() as u64;
        active.pending.push(header, jpeg);
        active.pending_records += 1;
        if let Some(listed) = &active.listed {
            if listed.body.len() + active.pending_listed.body.len() < LISTED_BYTES_MAX {
                active.pending_listed.push(offset, header);
            } else {
                // Tiny records in a large volume: walk it at sealing instead of holding more.
                active.listed = None;
                active.pending_listed.clear();
            }
        }
        Ok(Location {
            volume: active.id,
            offset,
            length: u32::try_from(record_len).expect("records are bounded below 4 GiB"),
        })
    }

    /// The header of a record appended in this batch (not yet written), by location.
    pub(crate) fn pending_header(&self, location: Location) -> Option<RecordHeader> {
        let active = self.active.as_ref()?;
        if location.volume != active.id || location.offset < active.end {
            return None;
        }
        let at = usize::try_from(location.offset - active.end).ok()?;
        RecordHeader::decode(active.pending.records().get(at..)?)
            .ok()
            .flatten()
    }

    /// Moves the active volume (if any) to `filling` and creates the next one.
    fn start_volume(&mut self, at_ms: i64) -> Result<(), StorageError> {
        if let Some(full) = self.active.take() {
            tracing::info!(
                volume = full.id,
                bytes = full.end + full.pending.records_len() as u64,
                "volume full; sealing it and starting the next"
            );
            self.filling.push(full);
        }
        let id = self
            .id_last
            .checked_add(1)
            .expect("volume ids last 4 billion volumes");
        let path = self.volumes.path(id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        // The directory entry must be durable before a commit names the volume.
        sync_directory(self.volumes.dir())?;
        self.id_last = id;
        self.batch_new_from.get_or_insert(id);
        let direct = self.open_direct(&path);
        self.active = Some(Active {
            id,
            file,
            direct,
            end: 0,
            allocated: 0,
            pending: Pending::default(),
            records: 0,
            pending_records: 0,
            created_at_ms: at_ms,
            listed: Some(Listed::default()),
            pending_listed: Listed::default(),
        });
        Ok(())
    }

    /// Writes and `fdatasync`s the batch's records (one write per volume touched) and returns
    /// the `volumes` rows to commit with the batch's index entries. Nothing is committed until
    /// [`Appender::committed`]; on any failure call [`Appender::abort`].
    pub(crate) fn sync(&mut self, at_ms: i64) -> Result<VolumeChanges, StorageError> {
        let mut changes = VolumeChanges::default();
        if let Some((id, row)) = &self.seal_missing {
            let mut row = row.clone();
            row.sealed = true;
            row.sealed_at_ms = at_ms;
            changes.rows.push((*id, row));
        }
        for full in &mut self.filling {
            spend(&mut self.write_budget, full.pending.records_len())?;
            write_pending(full)?;
            let mut row = row_of(full);
            row.sealed = true;
            row.sealed_at_ms = at_ms;
            changes.rows.push((full.id, row));
        }
        if let Some(active) = self.active.as_mut() {
            if active.pending.records_len() > 0 {
                spend(&mut self.write_budget, active.pending.records_len())?;
                write_pending(active)?;
                changes.rows.push((active.id, row_of(active)));
            }
        }
        Ok(changes)
    }

    /// The batch's transaction committed: its records are now part of their volumes.
    pub(crate) fn committed(&mut self, changes: &VolumeChanges) {
        if let Some((id, _)) = &self.seal_missing {
            if changes
                .rows
                .iter()
                .any(|(row_id, row)| row_id == id && row.sealed)
            {
                self.seal_missing = None;
            }
        }
        self.batch_new_from = None;
        for mut full in self.filling.drain(..) {
            full.end += full.pending.records_len() as u64;
            full.records += full.pending_records;
            let mut listed = full.listed.take();
            if let Some(listed) = listed.as_mut() {
                listed.append(&mut full.pending_listed);
                debug_assert_eq!(listed.records, full.records);
            }
            self.sealed_to_trim.push((full.id, full.end, listed));
            self.volumes.forget(full.id);
        }
        if let Some(active) = self.active.as_mut() {
            active.end += active.pending.records_len() as u64;
            active.records += active.pending_records;
            active.pending.written(active.end, active.direct.is_some());
            active.pending_records = 0;
            if let Some(listed) = active.listed.as_mut() {
                listed.append(&mut active.pending_listed);
            }
        }
        self.trim_sealed();
    }

    /// The batch failed: forget its records (what was written past the committed end is cut
    /// off, as at a restart). Volumes the batch created are removed; the one that was active
    /// before it is active again, at its committed end.
    pub(crate) fn abort(&mut self) {
        let mut touched: Vec<Active> = self.filling.drain(..).collect();
        touched.extend(self.active.take());
        let new_from = self.batch_new_from.take();
        for mut volume in touched {
            if new_from.is_some_and(|first| volume.id >= first) {
                let path = self.volumes.path(volume.id);
                drop(volume);
                if let Err(error) = std::fs::remove_file(&path) {
                    tracing::warn!(%error, path = %path.display(), "removing an unused volume file");
                }
            } else {
                volume.pending.discard();
                volume.pending_records = 0;
                volume.pending_listed.clear();
                self.active = Some(volume);
            }
        }
        if let Some(first) = new_from {
            self.id_last = first - 1;
        }
    }

    /// Cuts the preallocated tails off sealed volumes. Failures are logged; the tail is
    /// harmless (nothing reads past `end`) and is tried again at the next start.
    fn trim_sealed(&mut self) {
        for (id, end, listed) in std::mem::take(&mut self.sealed_to_trim) {
            let path = self.volumes.path(id);
            let result = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|file| {
                    file.set_len(end)?;
                    file.sync_all()
                });
            match result {
                Ok(()) => tracing::info!(volume = id, bytes = end, "volume sealed"),
                Err(error) => {
                    tracing::warn!(volume = id, %error, "cutting a sealed volume's spare tail")
                }
            }
            self.companions_due.push((id, end, listed));
        }
        self.write_companions();
    }

    /// Writes the companion files of the volumes sealed since the last call, on a thread of
    /// their own (from the records' list kept while the volume filled, or by reading its
    /// headers from end to end; the writer does not wait).
    fn write_companions(&mut self) {
        if self.companions_due.is_empty() {
            return;
        }
        let due = std::mem::take(&mut self.companions_due);
        let volumes = Arc::clone(&self.volumes);
        let spawned = std::thread::Builder::new()
            .name("es-volume-seal".into())
            .spawn(move || {
                for (id, end, listed) in due {
                    match write_companion(&volumes, id, end, listed) {
                        Ok(records) => {
                            tracing::info!(volume = id, records, "volume companion file written")
                        }
                        Err(error) => tracing::warn!(volume = id, %error,
                            "cannot write the volume's companion file; the next start tries again"),
                    }
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the thread that writes companion files");
        }
    }

    /// The volume records are appended to now, if any.
    #[cfg(test)]
    pub(crate) fn active_volume(&self) -> Option<u32> {
        self.active.as_ref().map(|a| a.id)
    }
}

impl Appender {
    /// The volume file opened for `O_DIRECT` writes, or None (buffered writes) where direct
    /// I/O is off or the filesystem refuses it (tmpfs, for one).
    fn open_direct(&self, path: &Path) -> Option<File> {
        if !self.direct_io {
            return None;
        }
        match open_direct(path) {
            Ok(file) => Some(file),
            Err(error) => {
                tracing::info!(path = %path.display(), %error,
                    "direct I/O is not available for this volume; writing through the page cache");
                None
            }
        }
    }

    /// Test hook: after `bytes` more bytes, every volume write fails with ENOSPC (`None`: no
    /// limit), so tests can fill the disk under the real write path.
    pub(crate) fn set_write_budget(&mut self, bytes: Option<u64>) {
        self.write_budget = bytes;
    }
}

/// Takes `bytes` from the test budget, or fails as a full disk would.
fn spend(budget: &mut Option<u64>, bytes: usize) -> Result<(), StorageError> {
    if let Some(left) = budget.as_mut() {
        if (bytes as u64) > *left {
            return Err(StorageError::DiskFull);
        }
        *left -= bytes as u64;
    }
    Ok(())
}

fn row_of(volume: &Active) -> VolumeRow {
    VolumeRow {
        end: volume.end + volume.pending.records_len() as u64,
        records: volume.records + volume.pending_records,
        sealed: false,
        created_at_ms: volume.created_at_ms,
        sealed_at_ms: 0,
    }
}

/// One `pwrite` of the pending records at the committed end, then `fdatasync`. With direct
/// I/O the write starts at the block holding the committed end (its first bytes rewritten as
/// they are) and is padded with zeros to a whole block; nothing past the committed end is
/// read as a record until a commit says so.
fn write_pending(volume: &mut Active) -> Result<(), StorageError> {
    let records = volume.pending.records_len() as u64;
    if records == 0 {
        return Ok(());
    }
    let end = volume.end + records;
    let write_end = if volume.direct.is_some() {
        let start = volume.end - volume.pending.prefix as u64;
        start + end.saturating_sub(start).div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64
    } else {
        end
    };
    if write_end > volume.allocated {
        let want = write_end.max(volume.allocated + PREALLOCATE_STEP_BYTES);
        match preallocate(&volume.file, volume.allocated, want - volume.allocated) {
            Ok(()) => volume.allocated = want.max(volume.file.metadata()?.len()),
            // Not room for a whole step: allocate what this batch needs, or fail as full.
            Err(_) => {
                preallocate(&volume.file, volume.allocated, write_end - volume.allocated)
                    .map_err(io_error)?;
                volume.allocated = write_end.max(volume.file.metadata()?.len());
            }
        }
    }
    match &volume.direct {
        Some(direct) => {
            let start = volume.end - volume.pending.prefix as u64;
            let bytes = volume.pending.buf.padded();
            write_all_at(direct, bytes, start).map_err(io_error)?;
        }
        None => {
            write_all_at(&volume.file, volume.pending.records(), volume.end).map_err(io_error)?
        }
    }
    sync_data(&volume.file).map_err(io_error)?;
    Ok(())
}

/// A full disk is `DiskFull`, every other I/O error `Io`.
fn io_error(error: io::Error) -> StorageError {
    if error.kind() == io::ErrorKind::StorageFull {
        StorageError::DiskFull
    } else {
        StorageError::Io(error)
    }
}

/// Counts the whole records in the tail `[end, len)` of an active volume (for the log) and
/// the bytes up to the last of them. Reads headers and bytes until the first bad record.
fn scan_tail(file: &File, end: u64, len: u64) -> (u64, u64) {
    let mut at = end;
    let mut records = 0;
    loop {
        if at + HEADER_FIXED_BYTES as u64 > len {
            break;
        }
        let mut head = vec![0u8; HEADER_FIXED_BYTES + DISH_ID_BYTES_MAX];
        let want = (len - at).min(head.len() as u64) as usize;
        head.truncate(want);
        if read_exact_at(file, &mut head, at).is_err() {
            break;
        }
        let Ok(Some(header)) = RecordHeader::decode(&head) else {
            break;
        };
        let record_len = header.record_len();
        if at + record_len > len {
            break;
        }
        let mut jpeg = vec![0u8; header.jpeg_len as usize];
        if read_exact_at(file, &mut jpeg, at + header.header_len() as u64).is_err()
            || tables::sha256(&jpeg) != header.sha256
        {
            break;
        }
        records += 1;
        at += record_len;
    }
    (records, at - end)
}

/// One record found by walking a volume from its start (verify, sealing, backup).
#[derive(Debug)]
pub(crate) enum Walked {
    /// A record whose header checks; its bytes were not read.
    Record { offset: u64, header: RecordHeader },
    /// Bytes that hold no valid record header, from `offset` to the next one found (or `end`).
    Unreadable { offset: u64, bytes: u64 },
}

/// Walks the records of `[0, end)` of a volume, by headers: a bad header is reported as an
/// unreadable range and the walk goes on at the next offset where a valid header starts.
pub(crate) fn walk(
    volumes: &Volumes,
    volume: u32,
    end: u64,
    visit: &mut dyn FnMut(Walked) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    const HEAD_BYTES: usize = HEADER_FIXED_BYTES + DISH_ID_BYTES_MAX;
    let file = volumes.file(volume)?;
    let mut at = 0u64;
    while at < end {
        let want = (end - at).min(HEAD_BYTES as u64) as usize;
        let mut head = vec![0u8; want];
        read_exact_at(&file, &mut head, at).map_err(io_error)?;
        match RecordHeader::decode(&head) {
            Ok(Some(header)) if at + header.record_len() <= end => {
                let record_len = header.record_len();
                visit(Walked::Record { offset: at, header })?;
                at += record_len;
            }
            _ => {
                let next = find_next_header(&file, at + 1, end)?;
                visit(Walked::Unreadable {
                    offset: at,
                    bytes: next - at,
                })?;
                at = next;
            }
        }
    }
    Ok(())
}

/// The next offset in `[from, end)` where a valid header starts, or `end`.
fn find_next_header(file: &File, from: u64, end: u64) -> Result<u64, StorageError> {
    const CHUNK: usize = 1 << 20;
    const HEAD_BYTES: usize = HEADER_FIXED_BYTES + DISH_ID_BYTES_MAX;
    let mut at = from;
    while at < end {
        let want = (end - at).min((CHUNK + HEAD_BYTES) as u64) as usize;
        let mut chunk = vec![0u8; want];
        read_exact_at(file, &mut chunk, at).map_err(io_error)?;
        let scan = want.saturating_sub(3).min(CHUNK);
        for i in 0..scan {
            if chunk[i..i + 4] == MAGIC {
                if let Ok(Some(header)) = RecordHeader::decode(&chunk[i..]) {
                    if at + i as u64 + header.record_len() <= end {
                        return Ok(at + i as u64);
                    }
                }
            }
        }
        at += scan.max(1) as u64;
    }
    Ok(end)
}

/// The companion file of a sealed volume (`NNNNNNNN.idx`), so the records of a volume can be
/// listed without reading it whole (backup, archive, recovery without the database):
///
/// ```text
/// [4]  magic "ESIX"
/// u8   format (1), [3] reserved
/// u32  volume id
/// u64  the volume's end (bytes of records)
/// u64  number of records
/// then per record: u64 offset, and the record's header as it is in the volume (88 + n bytes)
/// u32  CRC-32 of everything before
/// ```
///
/// It is written to a temporary file, synced and renamed, so it is whole or absent.
pub(crate) const COMPANION_MAGIC: [u8; 4] = *b"ESIX";

/// Writes the sealed volume's companion file from `listed`, the list of its records kept
/// while it filled, or else by walking its headers; returns its records.
pub(crate) fn write_companion(
    volumes: &Volumes,
    id: u32,
    end: u64,
    listed: Option<Listed>,
) -> Result<u64, StorageError> {
    let Listed { body, records } = match listed {
        Some(listed) => listed,
        None => {
            let mut listed = Listed::default();
            walk(volumes, id, end, &mut |walked| {
                if let Walked::Record { offset, header } = walked {
                    listed.push(offset, &header);
                }
                Ok(())
            })?;
            listed
        }
    };
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(&COMPANION_MAGIC);
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&end.to_le_bytes());
    out.extend_from_slice(&records.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let path = volumes.companion_path(id);
    let temporary = path.with_extension("idx.tmp");
    {
        use std::io::Write;
        let mut file = File::create(&temporary)?;
        file.write_all(&out)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, &path)?;
    sync_directory(volumes.dir())?;
    Ok(records)
}

/// Reads a companion file: the volume's end and its records' (offset, header). `Err` with the
/// reason when it is not a whole, valid companion of `id`.
pub(crate) fn read_companion(
    volumes: &Volumes,
    id: u32,
) -> Result<(u64, Vec<(u64, RecordHeader)>), String> {
    let bytes = std::fs::read(volumes.companion_path(id)).map_err(|e| e.to_string())?;
    if bytes.len() < 32 || bytes[..4] != COMPANION_MAGIC || bytes[4] != 1 {
        return Err("not a companion file of format 1".into());
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(content) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("checksum does not match".into());
    }
    if u32_at(content, 8) != id {
        return Err(format!("names volume {}, not {id}", u32_at(content, 8)));
    }
    let end = u64_at(content, 12);
    let count = u64_at(content, 20);
    let mut at = 28;
    let mut records = Vec::new();
    while at < content.len() {
        if at + 8 > content.len() {
            return Err("ends inside a record".into());
        }
        let offset = u64_at(content, at);
        let header = RecordHeader::decode(&content[at + 8..])?
            .ok_or_else(|| "ends inside a record header".to_string())?;
        at += 8 + header.header_len();
        records.push((offset, header));
    }
    if records.len() as u64 != count {
        return Err(format!("lists {} records, says {count}", records.len()));
    }
    Ok((end, records))
}

/// fsync of a directory, so entries created in it survive a power cut.
#[cfg(unix)]
pub(crate) fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn sync_directory(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(dish_id: &str, plane: i32, jpeg: &[u8]) -> RecordHeader {
        RecordHeader {
            dish_key: 7,
            instrument_id: 3,
            dish_id: dish_id.into(),
            well: 2,
            acquired_at_ms: 1_700_000_000_000,
            focal_plane: plane,
            stored_at_ms: 1_700_000_000_500,
            sha256: tables::sha256(jpeg),
            jpeg_len: jpeg.len() as u32,
        }
    }

    fn listed(volumes: &Volumes) -> Vec<ListedVolume> {
        let _ = volumes;
        Vec::new()
    }

    #[test]
    fn header_round_trips_and_every_flipped_bit_is_caught() {
        let jpeg = b"\xff\xd8jpeg\xff\xd9";
        let header = header("D-1", -15, jpeg);
        let mut bytes = Vec::new();
        header.encode_into(&mut bytes);
        assert_eq!(bytes.len(), header.header_len());
        assert_eq!(RecordHeader::decode(&bytes).unwrap(), Some(header.clone()));
        assert_eq!(RecordHeader::decode(&bytes[..40]).unwrap(), None);
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            match RecordHeader::decode(&damaged) {
                Err(_) | Ok(None) => {}
                Ok(Some(decoded)) => panic!("bit {bit} flipped went unnoticed: {decoded:?}"),
            }
        }
    }

    #[test]
    fn appended_records_read_back_checked_and_an_abort_cuts_them_off() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Arc::new(Volumes::new(dir.path()));
        let (mut appender, recovery) =
            Appender::open(Arc::clone(&volumes), 1 << 20, true, &listed(&volumes)).unwrap();
        assert_eq!(recovery, Recovery::default());
        let jpeg: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let h = header("D1", 0, &jpeg);
        let location = appender.append(&h, &jpeg, 1).unwrap();
        assert_eq!(location.offset, 0);
        assert_eq!(appender.pending_header(location), Some(h.clone()));
        let changes = appender.sync(1).unwrap();
        assert_eq!(changes.rows.len(), 1);
        assert_eq!(changes.rows[0].1.end, h.record_len());
        appender.committed(&changes);
        let record = volumes.read_record(location, h.image_key()).unwrap();
        assert_eq!(record.jpeg.as_ref(), jpeg.as_slice());
        // Another key at that location is damage, not another image.
        let other = (7, 2, 1_700_000_000_000, 1);
        assert!(matches!(
            volumes.read_record(location, other),
            Err(ReadFailure::Damaged(_))
        ));
        // An aborted batch leaves the end where it was: its record is overwritten next.
        let second = appender.append(&header("D1", 1, &jpeg), &jpeg, 2).unwrap();
        appender.sync(2).unwrap();
        appender.abort();
        let third = appender.append(&header("D1", 2, &jpeg), &jpeg, 3).unwrap();
        assert_eq!(second.offset, third.offset);
    }

    #[test]
    fn a_full_volume_is_sealed_and_the_next_one_started_within_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Arc::new(Volumes::new(dir.path()));
        let (mut appender, _) = Appender::open(Arc::clone(&volumes), 1 << 20, true, &[]).unwrap();
        let jpeg = vec![0x42u8; 300_000];
        let mut locations = Vec::new();
        for plane in 0..5 {
            let h = header("D1", plane, &jpeg);
            locations.push((appender.append(&h, &jpeg, 1).unwrap(), h));
        }
        let changes = appender.sync(9).unwrap();
        let sealed: Vec<_> = changes.rows.iter().filter(|(_, r)| r.sealed).collect();
        assert_eq!(sealed.len(), 1, "{changes:?}");
        assert_eq!(sealed[0].0, 1);
        assert!(sealed[0].1.end <= 1 << 20);
        appender.committed(&changes);
        assert_eq!(appender.active_volume(), Some(2));
        assert_eq!(
            std::fs::metadata(volumes.path(1)).unwrap().len(),
            sealed[0].1.end,
            "the sealed volume's spare tail is cut off"
        );
        for (location, h) in locations {
            let record = volumes.read_record(location, h.image_key()).unwrap();
            assert_eq!(record.jpeg.len(), jpeg.len());
        }
    }

    #[test]
    fn walk_reports_a_damaged_range_and_finds_the_records_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Arc::new(Volumes::new(dir.path()));
        let (mut appender, _) = Appender::open(Arc::clone(&volumes), 1 << 30, true, &[]).unwrap();
        let jpeg = vec![0x17u8; 10_000];
        let mut locations = Vec::new();
        for plane in 0..4 {
            locations.push(
                appender
                    .append(&header("D9", plane, &jpeg), &jpeg, 1)
                    .unwrap(),
            );
        }
        let changes = appender.sync(1).unwrap();
        let end = changes.rows[0].1.end;
        appender.committed(&changes);
        // Zero the second record's header.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(volumes.path(1))
            .unwrap();
        write_all_at(&file, &[0u8; 60], locations[1].offset).unwrap();
        let mut seen = Vec::new();
        walk(&volumes, 1, end, &mut |w| {
            seen.push(match w {
                Walked::Record { offset, header } => (offset, Some(header.focal_plane)),
                Walked::Unreadable { offset, .. } => (offset, None),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (locations[0].offset, Some(0)),
                (locations[1].offset, None),
                (locations[2].offset, Some(2)),
                (locations[3].offset, Some(3)),
            ]
        );
    }

    #[test]
    fn open_cuts_off_an_unindexed_tail_and_removes_unnamed_volume_files() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Arc::new(Volumes::new(dir.path()));
        let (mut appender, _) = Appender::open(Arc::clone(&volumes), 1 << 30, true, &[]).unwrap();
        let jpeg = vec![1u8; 1000];
        appender.append(&header("D", 0, &jpeg), &jpeg, 1).unwrap();
        let changes = appender.sync(1).unwrap();
        let row = changes.rows[0].1.clone();
        appender.committed(&changes);
        // Two more records written and synced, but their commit never happened.
        appender.append(&header("D", 1, &jpeg), &jpeg, 2).unwrap();
        appender.append(&header("D", 2, &jpeg), &jpeg, 2).unwrap();
        appender.sync(2).unwrap();
        drop(appender);
        std::fs::write(volumes.path(2), b"half a volume").unwrap();
        let listed = vec![ListedVolume {
            id: 1,
            row,
            archived: false,
        }];
        let (appender, recovery) =
            Appender::open(Arc::clone(&volumes), 1 << 30, true, &listed).unwrap();
        assert_eq!(recovery.tail_records_cut, 2);
        assert_eq!(recovery.files_removed, 1);
        assert!(!volumes.path(2).exists());
        assert_eq!(appender.active_volume(), Some(1));
    }

    #[test]
    fn an_active_volume_shorter_than_its_records_is_sealed_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Arc::new(Volumes::new(dir.path()));
        let (mut appender, _) = Appender::open(Arc::clone(&volumes), 1 << 30, true, &[]).unwrap();
        let jpeg = vec![3u8; 5000];
        appender.append(&header("D", 0, &jpeg), &jpeg, 1).unwrap();
        let changes = appender.sync(1).unwrap();
        let row = changes.rows[0].1.clone();
        appender.committed(&changes);
        drop(appender);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(volumes.path(1))
            .unwrap();
        file.set_len(100).unwrap();
        let listed = vec![ListedVolume {
            id: 1,
            row,
            archived: false,
        }];
        let (mut appender, _) =
            Appender::open(Arc::clone(&volumes), 1 << 30, true, &listed).unwrap();
        let location = appender.append(&header("D", 1, &jpeg), &jpeg, 2).unwrap();
        assert_eq!(location.volume, 2, "new images go to a new volume");
        let changes = appender.sync(2).unwrap();
        assert!(
            changes.rows.iter().any(|(id, r)| *id == 1 && r.sealed),
            "{changes:?}"
        );
    }
}
