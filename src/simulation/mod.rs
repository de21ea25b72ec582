//! Deterministic simulation of the server's real session cores (tests only).
//!
//! The harness (seeds, byte pipes, totals) is es-proto's (`es_proto::simulation`); the worlds
//! here run esserver's own cores against the real storage writer on a temporary database, so
//! a bug in the server's deduplication, enrolment, versioning or answer bookkeeping shows up
//! as a broken invariant with the seed that replays it. See `docs/reliability.md`, section
//! "Deterministic simulation".

mod incubator;
mod viewer;

use es_storage::{Store, StoreOptions, Writer, WriterOptions};

/// The simulated clock's start (Unix ms), and how far one step moves it.
const CLOCK_START_MS: i64 = 1_767_700_000_000;
const STEP_MS: i64 = 100;

/// A world's storage: redb in memory, image volumes and the licence in a temporary
/// directory (under `/dev/shm` when there is one), removed with it.
struct TempStore {
    dir: tempfile::TempDir,
    store: Store,
    writer: Writer,
}

impl TempStore {
    fn open(seed: u64) -> TempStore {
        let base = std::path::Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::Builder::new()
                .prefix("esserver-sim-")
                .tempdir_in(base)
        } else {
            tempfile::Builder::new().prefix("esserver-sim-").tempdir()
        }
        .expect("a temporary directory for the simulation");
        let options = StoreOptions {
            cache_bytes: 4 * 1024 * 1024,
            volume_bytes_max: 1024 * 1024,
            volume_direct_io: false,
            quick_repair: false,
            ..StoreOptions::default()
        };
        let store = Store::open_with_backend(
            dir.path(),
            &options,
            seed.to_le_bytes().repeat(2).try_into().expect("16 bytes"),
            || Ok(redb::backends::InMemoryBackend::new()),
        )
        .expect("the simulation's store opens");
        let writer = store.start_writer(WriterOptions::default());
        TempStore { dir, store, writer }
    }

    /// A DEMO licence of this store's server id.
    fn licensing(&self) -> crate::license::Licensing {
        crate::license::Licensing::load(
            self.dir.path(),
            &[],
            &self.store.server_id(),
            CLOCK_START_MS,
        )
        .expect("a demo licence")
    }
}
