//! `es-storage`: esserver's durable store, on redb.
//!
//! # What this crate owns
//!
//! - **The redb schema.** Every table, key and record layout is in ONE file, [`tables`]
//!   (`src/tables.rs`). Records are postcard-encoded; their layout is tied to
//!   [`Store::SCHEMA_VERSION`].
//! - **The single group-commit writer thread** ([`Writer`], thread `es-storage-writer`). It owns
//!   every write transaction: it drains the bounded queue into a batch, applies the batch in one
//!   transaction with `Durability::Immediate`, commits once, and only then completes each
//!   request. A request is acknowledged only after its data is durable.
//! - **Typed reads** ([`Reader`]) from MVCC snapshots; readers never block the writer.
//! - **The change log**: every change has its own gapless sequence number; new image
//!   acquisitions are logged once per acquisition (not per focal plane); entries older than the
//!   retention are pruned and an older cursor gets [`StorageError::CursorExpired`].
//! - **Schema version and migration**: a newer database is refused
//!   ([`StorageError::SchemaTooNew`]), an older one migrated in place on open.
//! - **Image integrity**: every image is stored with its SHA-256, checked on every read
//!   ([`StorageError::ImageDamaged`]) and by [`Store::verify`].
//!
//! # What it does not own
//!
//! Sockets, protocols, event loops, the clock and configuration files. Time is passed in by
//! the caller (`at_ms`: Unix milliseconds UTC); nothing in this crate reads the clock.
//!
//! # Errors
//!
//! [`StorageError`] (opening, reading, verifying) and [`WriteError`] (per write request) are
//! typed, and each has a stable snake_case `code()`.

pub mod ims;
pub mod limits;
pub mod tables;
pub mod volume;

mod apply;
mod error;
mod migrate;
mod model;
mod ops;
mod reader;
mod store;
mod verify;
mod writer;

pub use error::{StorageError, SubmitError, WriteError};
pub use migrate::{fixture_jpeg, write_v1_fixture, write_v4_fixture, FixtureImage};
pub use model::{
    AcquisitionRecord, AcquisitionSync, AnnotationRecord, AnnotationSource, ApiKeyRecord, ApiScope,
    AuditOutcome, AuditRecord, Change, ChangeEntity, DishRecord, DishSyncState, EmbryoRecord, Fate,
    Frame, InstrumentRecord, PatientRecord, PatientSummary, Rights, ScoreRecord, StoreStats,
    TransferOutcome, TransferRecord, TreatmentRecord, UserRecord, VerifyProgress, VerifyReport,
    WellSync,
};
pub use ops::{
    user_name, Actor, AlarmInput, AnnotationInput, ClinicalEdit, DishRegistration, Idempotency,
    ImageBytes, ImsQueueing, PatientRef, ScoreInput, TelemetrySample, UserChange, WellRegistration,
    WriteOp, WriteOutcome,
};
pub use reader::Reader;
pub use store::{
    set_schema_version_for_tests, CommitListener, Store, StoreOptions, DATABASE_FILE_NAME,
};
pub use volume::{Location, Recovery};
pub use writer::{Completion, Writer, WriterOptions, WriterStats};
