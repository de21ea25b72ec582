//! The local cache of records read back from the object store: one file per record under
//! `<data>/archive-cache/`, at most `[Archive] cache_bytes_max` bytes, least recently used out
//! first. Emptied at every start (it is a cache: the object store holds the records). Each
//! entry's SHA-256 is kept in memory and checked at every hit, so a damaged cache file is
//! fetched again rather than served (storage checks every record once more anyway).

use bytes::Bytes;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The cache's directory inside the data directory.
pub const CACHE_DIR_NAME: &str = "archive-cache";

/// (volume, offset)
type Key = (u32, u64);

struct Entry {
    length: u32,
    sha256: [u8; 32],
    used: u64,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Last use -> key: the least recently used first.
    by_use: BTreeMap<u64, Key>,
    tick: u64,
    bytes: u64,
}

/// Counters for `status` and `/metrics`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CacheStats {
    pub records: u64,
    pub bytes: u64,
    pub bytes_max: u64,
}

pub struct RecordCache {
    dir: PathBuf,
    bytes_max: u64,
    state: Mutex<State>,
}

impl RecordCache {
    /// Empties (or makes) `<data_dir>/archive-cache`.
    pub fn open(data_dir: &Path, bytes_max: u64) -> std::io::Result<RecordCache> {
        let dir = data_dir.join(CACHE_DIR_NAME);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        std::fs::create_dir_all(&dir)?;
        Ok(RecordCache {
            dir,
            bytes_max,
            state: Mutex::new(State::default()),
        })
    }

    fn path(&self, (volume, offset): Key) -> PathBuf {
        self.dir.join(format!("{volume:08}-{offset:016x}.rec"))
    }

    /// The cached record, when it is there whole and `length` long.
    pub fn get(&self, volume: u32, offset: u64, length: u32) -> Option<Bytes> {
        let key = (volume, offset);
        let sha256 = {
            let mut state = self.state.lock();
            let state = &mut *state;
            let entry = state.entries.get_mut(&key)?;
            if entry.length != length {
                return None;
            }
            state.tick += 1;
            state.by_use.remove(&entry.used);
            entry.used = state.tick;
            state.by_use.insert(entry.used, key);
            entry.sha256
        };
        match std::fs::read(self.path(key)) {
            Ok(bytes) if <[u8; 32]>::from(Sha256::digest(&bytes)) == sha256 => {
                Some(Bytes::from(bytes))
            }
            Ok(_) | Err(_) => {
                tracing::warn!(
                    volume,
                    offset,
                    "a cached archive record is damaged or gone: fetching it again"
                );
                self.remove(key);
                None
            }
        }
    }

    /// Keeps `bytes` as the record at (volume, offset), evicting the least recently used.
    pub fn put(&self, volume: u32, offset: u64, bytes: &[u8]) {
        let length = bytes.len() as u64;
        if length > self.bytes_max / 4 {
            return;
        }
        let key = (volume, offset);
        if let Err(error) = std::fs::write(self.path(key), bytes) {
            tracing::warn!(%error, dir = %self.dir.display(), "cannot write to the archive cache");
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut state = self.state.lock();
            let state = &mut *state;
            state.tick += 1;
            let entry = Entry {
                length: bytes.len() as u32,
                sha256: Sha256::digest(bytes).into(),
                used: state.tick,
            };
            if let Some(old) = state.entries.insert(key, entry) {
                state.by_use.remove(&old.used);
                state.bytes -= u64::from(old.length);
            }
            state.by_use.insert(state.tick, key);
            state.bytes += length;
            while state.bytes > self.bytes_max {
                let Some((_, oldest)) = state.by_use.pop_first() else {
                    break;
                };
                if let Some(entry) = state.entries.remove(&oldest) {
                    state.bytes -= u64::from(entry.length);
                }
                evicted.push(oldest);
            }
        }
        for key in evicted {
            let _ = std::fs::remove_file(self.path(key));
        }
    }

    /// Forgets the record at (volume, offset).
    pub fn discard(&self, volume: u32, offset: u64) {
        self.remove((volume, offset));
    }

    fn remove(&self, key: Key) {
        {
            let mut state = self.state.lock();
            if let Some(entry) = state.entries.remove(&key) {
                state.by_use.remove(&entry.used);
                state.bytes -= u64::from(entry.length);
            }
        }
        let _ = std::fs::remove_file(self.path(key));
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.state.lock();
        CacheStats {
            records: state.entries.len() as u64,
            bytes: state.bytes,
            bytes_max: self.bytes_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_within_its_bound_and_drops_the_least_recently_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RecordCache::open(dir.path(), 1000).unwrap();
        cache.put(1, 0, &[1; 200]);
        cache.put(1, 200, &[2; 200]);
        cache.put(1, 400, &[3; 200]);
        assert_eq!(cache.get(1, 0, 200).as_deref(), Some(&[1u8; 200][..]));
        // Two more: 1000 bytes hold 5 records; a sixth evicts the least recently used (200).
        cache.put(1, 600, &[4; 200]);
        cache.put(1, 800, &[5; 200]);
        cache.put(1, 1000, &[6; 200]);
        assert!(cache.get(1, 200, 200).is_none());
        assert!(cache.get(1, 0, 200).is_some());
        let stats = cache.stats();
        assert!(stats.bytes <= 1000, "{stats:?}");
        assert_eq!(stats.records, 5);
        let files = std::fs::read_dir(dir.path().join(CACHE_DIR_NAME))
            .unwrap()
            .count();
        assert_eq!(files, 5);
        // A record larger than a quarter of the bound is not cached.
        cache.put(2, 0, &[7; 300]);
        assert!(cache.get(2, 0, 300).is_none());
        // The wrong length is a miss.
        assert!(cache.get(1, 0, 199).is_none());
    }

    #[test]
    fn a_damaged_cache_file_is_a_miss_and_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = RecordCache::open(dir.path(), 10_000).unwrap();
        cache.put(3, 64, b"record bytes");
        let path = dir
            .path()
            .join(CACHE_DIR_NAME)
            .join(format!("{:08}-{:016x}.rec", 3, 64));
        std::fs::write(&path, b"record bytez").unwrap();
        assert!(cache.get(3, 64, 12).is_none());
        assert_eq!(cache.stats().records, 0);
        // A new start empties it.
        cache.put(3, 0, b"x");
        drop(cache);
        let cache = RecordCache::open(dir.path(), 10_000).unwrap();
        assert_eq!(cache.stats().records, 0);
        assert_eq!(
            std::fs::read_dir(dir.path().join(CACHE_DIR_NAME))
                .unwrap()
                .count(),
            0
        );
    }
}
