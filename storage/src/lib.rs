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
//! [`StorageError`] (opening, reading, verifying) and [`WriteError`] (per write operation) are
//! typed, and each has a stable snake_case `code()`. Every write is its own type implementing
//! [`Operation`], with its own outcome and refusal (`WriteError::Refused(R)`, where `R` is,
//! say, [`ImageRefusal`] for [`PutImage`] or [`EditRefusal`] for [`Edit`]); records, never
//! JSON, cross the storage boundary.

pub mod ims;
pub mod limits;
pub mod tables;
pub mod volume;

pub mod activity;
mod apply;
pub mod archive;
pub mod backup;
pub mod devices;
mod error;
mod migrate;
mod model;
mod ops;
mod reader;
mod store;
mod verify;
mod writer;

pub use error::{
    AdminRefusal, Current, EditRefusal, Fault, HelloRefusal, ImageRefusal, Never, Refusal, Stale,
    StorageError, SubmitError, UnknownInstrument, WriteError,
};
pub use migrate::{fixture_jpeg, write_v1_fixture, write_v4_fixture, FixtureImage};
pub use model::{
    AcquisitionRecord, AcquisitionSync, AnnotationRecord, AnnotationSource, ApiKeyRecord, ApiScope,
    AuditOutcome, AuditRecord, Change, ChangeEntity, DishRecord, DishSyncState, EmbryoRecord, Fate,
    Frame, FrameChunk, InstrumentActivity, InstrumentRecord, ModelRecord, ModelResultRecord,
    PatientDifference, PatientRecord, PatientSummary, Rights, ScoreRecord, StoreStats, TableSpace,
    TransferOutcome, TransferRecord, TreatmentRecord, UserRecord, VerifyProgress, VerifyReport,
    WellSync,
};
/// The writer's open transaction, as `Operation::apply` receives it: opaque outside this crate.
#[doc(hidden)]
pub use ops::Batch;
pub use ops::{
    user_name, Actor, AlarmInput, AnnotationInput, ApiKeyCreate, ApiKeyRevoke, Applied,
    AuditDenied, ClinicalEdit, ConfirmInstrumentSecret, DishRegistered, DishRegistration, Edit,
    Edited, Enrolment, Idempotency, ImageBytes, ImageStored, ImsQueueing, ImsRemove, ImsRemoved,
    InstrumentAccepted, InstrumentApprove, InstrumentHello, InstrumentRename, InstrumentRenumber,
    Lane, LoginAttempt, LoginRecorded, ModelImport, ModelImported, OpResult, Operation, PatientRef,
    PutImage, PutTelemetry, RegisterDish, ResetInstrumentSecret, ScoreInput, SecretConfirmed,
    SecretReset, TelemetrySample, TelemetryStored, UserAdd, UserChange, UserUpdate,
    WellRegistration,
};
pub use reader::{next_page_after, Reader};

/// Runs a storage read, turning a panic inside it (a dependency meeting damaged data, say)
/// into `StorageError::Corrupt` that says what was being read and what the panic said, so
/// the request ends with an error instead of never being answered. Logged at ERROR.
pub fn guarded<T>(
    what: &str,
    read: impl FnOnce() -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            tracing::error!(what, panic = %message, "a storage read panicked");
            Err(StorageError::Corrupt(format!(
                "reading {what} failed inside the storage engine (panic: {message})"
            )))
        }
    }
}
pub use store::{
    set_schema_version_for_tests, CommitListener, Store, StoreOptions, DATABASE_FILE_NAME,
};
pub use volume::{Location, Recovery};
pub use writer::{Completion, Submission, Writer, WriterOptions, WriterStats};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_read_becomes_database_corrupt_naming_what_was_read() {
        let result: Result<u32, StorageError> =
            guarded("frames of embryo E1", || panic!("index page 7 is garbage"));
        let error = result.unwrap_err();
        assert_eq!(error.code(), "database_corrupt");
        let text = error.to_string();
        assert!(text.contains("frames of embryo E1"), "{text}");
        assert!(text.contains("index page 7 is garbage"), "{text}");
        assert_eq!(guarded("x", || Ok(5)).unwrap(), 5);
    }

    #[test]
    fn a_store_opened_read_only_reads_and_refuses_to_write() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &StoreOptions::default(), [3; 16]).unwrap());
        let store = Store::open_read_only(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(store.server_id(), hex::encode([3u8; 16]));
        assert!(store.verify(&mut |_| {}).unwrap().is_clean());
        let writer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store.start_writer(WriterOptions::default())
        }));
        assert!(writer.is_err(), "a read-only store has no writer");
        // Nothing was changed: the store opens for writing as before.
        drop(store);
        assert!(Store::open(dir.path(), &StoreOptions::default(), [4; 16]).is_ok());
    }
}
