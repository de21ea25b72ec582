//! Typed errors. Every variant has a stable snake_case code (`code()`) that goes on the wire and
//! into logs; the Display text is for a person and may be reworded, the code may not.

use std::fmt;

/// Errors of opening, reading and verifying the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// redb reported an error (not an I/O error of the disk).
    #[error("database error: {0}")]
    Redb(String),
    /// The file was written by a newer esserver.
    #[error(
        "database schema version {found} is newer than this esserver supports ({supported}); \
         upgrade esserver"
    )]
    SchemaTooNew { found: u64, supported: u64 },
    /// A stored image does not match the SHA-256 stored with it.
    #[error("stored image {key} is damaged: its SHA-256 does not match the bytes")]
    ImageDamaged { key: String },
    /// The change-log cursor points before the oldest retained change; resynchronise.
    #[error("change cursor expired: the oldest retained change is {oldest}; resynchronise")]
    CursorExpired { oldest: u64 },
    /// Stored data breaks an invariant or does not decode.
    #[error("database is corrupt: {0}")]
    Corrupt(String),
    /// Another process (probably a running esserver) holds the database file.
    #[error(
        "database file is in use by another process (is esserver running?); \
         use the control socket or stop the server"
    )]
    Locked,
    /// The disk is full.
    #[error("disk full: free space on the data directory's disk")]
    DiskFull,
    /// An I/O error of the disk or directory.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The database was not closed cleanly and must be recovered by a read-write open first.
    #[error(
        "the database was not closed cleanly and needs the recovery a start does; start \
         esserver (it recovers and listens within a second) and check it through the running \
         server"
    )]
    NeedsRecovery,
    /// The image is in the object store (its volume was archived) and could not be read from
    /// there now; every other image still reads. `reason` says why, for a person.
    #[error("archived image {key} cannot be read now: {reason}")]
    ArchiveUnavailable { key: String, reason: String },
}

impl StorageError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            StorageError::Redb(_) => "storage_error",
            StorageError::SchemaTooNew { .. } => "schema_too_new",
            StorageError::ImageDamaged { .. } => "image_damaged",
            StorageError::CursorExpired { .. } => "cursor_expired",
            StorageError::Corrupt(_) => "database_corrupt",
            StorageError::Locked => "database_locked",
            StorageError::DiskFull => "disk_full",
            StorageError::Io(_) => "io_error",
            StorageError::NeedsRecovery => "database_needs_recovery",
            StorageError::ArchiveUnavailable { .. } => "archive_unavailable",
        }
    }
}

fn from_redb(error: redb::Error) -> StorageError {
    match error {
        redb::Error::DatabaseAlreadyOpen => StorageError::Locked,
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            StorageError::DiskFull
        }
        redb::Error::Io(io) => StorageError::Io(io),
        redb::Error::PreviousIo => StorageError::Io(std::io::Error::other(
            "an earlier I/O error left the database unusable until it is reopened",
        )),
        redb::Error::Corrupted(message) => StorageError::Corrupt(message),
        other => StorageError::Redb(other.to_string()),
    }
}

macro_rules! from_redb_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(error: $t) -> StorageError {
                from_redb(redb::Error::from(error))
            }
        }
    )*};
}

from_redb_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Why one write did not happen. `R` is the operation's own refusal (see `crate::ops`): the
/// rules of that operation said no. The other variants are shared by every operation. An
/// operation that is refused or fails writes nothing (except the audit row some refusals
/// record, which the operation's documentation names).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError<R> {
    /// The operation's rules refused it.
    #[error("{0}")]
    Refused(R),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("disk full: the server cannot store data until space is freed")]
    DiskFull,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl<R: Refusal> WriteError<R> {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::Refused(refusal) => refusal.code(),
            WriteError::InvalidInput(_) => "invalid_input",
            WriteError::DiskFull => "disk_full",
            WriteError::Storage(_) => "storage_error",
            WriteError::ShuttingDown => "shutting_down",
        }
    }
}

impl<R> From<Fault> for WriteError<R> {
    fn from(fault: Fault) -> WriteError<R> {
        match fault {
            Fault::DiskFull => WriteError::DiskFull,
            Fault::Storage(message) => WriteError::Storage(message),
            Fault::ShuttingDown => WriteError::ShuttingDown,
        }
    }
}

/// Why a whole batch of writes failed: every operation of it gets this as its error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("disk full: the server cannot store data until space is freed")]
    DiskFull,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}

impl From<StorageError> for Fault {
    fn from(error: StorageError) -> Fault {
        match error {
            StorageError::DiskFull => Fault::DiskFull,
            other => Fault::Storage(other.to_string()),
        }
    }
}

/// An operation's own refusal: a typed reason with a stable snake_case code.
pub trait Refusal: fmt::Display + fmt::Debug + Send + 'static {
    fn code(&self) -> &'static str;
}

/// The refusal of operations that are never refused by their own rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Never {}

impl fmt::Display for Never {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {}
    }
}

impl Refusal for Never {
    fn code(&self) -> &'static str {
        match *self {}
    }
}

/// An instrument's HELLO refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloRefusal {
    #[error("instrument authentication failed: the presented secret does not match")]
    AuthFailed,
    /// The HELLO did not present the secret issued to another, still open, connection of the
    /// serial: until that connection confirms it or closes, no other secret is issued.
    #[error(
        "another connection of this instrument was issued a secret it has not confirmed yet; \
         retry once that connection is closed"
    )]
    EnrolmentInProgress,
    /// The server enrols new instruments only when an administrator approves them
    /// (`enrolment = approve`): this serial number waits until then.
    #[error(
        "this instrument is not enrolled on this server: an administrator must approve its \
         serial number first"
    )]
    EnrolmentPending,
}

impl Refusal for HelloRefusal {
    fn code(&self) -> &'static str {
        match self {
            HelloRefusal::AuthFailed => "auth_failed",
            HelloRefusal::EnrolmentInProgress => "enrolment_in_progress",
            HelloRefusal::EnrolmentPending => "enrolment_pending",
        }
    }
}

/// An image refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefusal {
    #[error(
        "an image with this key is already stored with different bytes; the stored one is kept"
    )]
    Conflict,
    #[error("unknown dish: register the dish before sending its images")]
    UnknownDish,
    #[error("unknown well: the well is not registered in this dish")]
    UnknownWell,
    #[error("unknown instrument: send HELLO first")]
    UnknownInstrument,
}

impl Refusal for ImageRefusal {
    fn code(&self) -> &'static str {
        match self {
            ImageRefusal::Conflict => "image_conflict",
            ImageRefusal::UnknownDish => "unknown_dish",
            ImageRefusal::UnknownWell => "unknown_well",
            ImageRefusal::UnknownInstrument => "unknown_instrument",
        }
    }
}

/// A dish registration or telemetry from an instrument the store does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown instrument: send HELLO first")]
pub struct UnknownInstrument;

impl Refusal for UnknownInstrument {
    fn code(&self) -> &'static str {
        "unknown_instrument"
    }
}

/// A clinical edit refused. A stale version is also recorded in the audit trail as a
/// conflict.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EditRefusal {
    /// The client's version is stale: someone else changed the row first.
    #[error(
        "conflict: changed by someone else since version {}; now at version {}",
        .0.expected,
        .0.version
    )]
    Stale(Box<Stale>),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The Idempotency-Key was used before for a different request.
    #[error("Idempotency-Key {0:?} was already used for a different request; use a new key for a new request")]
    IdempotencyKeyReused(String),
}

impl Refusal for EditRefusal {
    fn code(&self) -> &'static str {
        match self {
            EditRefusal::Stale(_) => "conflict",
            EditRefusal::NotFound(_) => "not_found",
            EditRefusal::AlreadyExists(_) => "already_exists",
            EditRefusal::IdempotencyKeyReused(_) => "idempotency_key_reused",
        }
    }
}

/// A stale version: what the client named, what is stored, and the record as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct Stale {
    pub expected: u64,
    pub version: u64,
    pub entity: crate::model::ChangeEntity,
    /// The record as a reader sees it right after the batch that refused the edit committed.
    /// None only when it could not be read then (a storage error, logged).
    pub current: Option<Current>,
    /// Which record, to read it after the commit.
    pub(crate) target: StaleTarget,
}

/// The record a stale edit names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StaleTarget {
    Patient(String),
    Treatment { patient_id: String, name: String },
    Embryo(String),
    Transfer(u64),
}

/// A versioned clinical record, as `Reader` returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum Current {
    Patient(crate::model::PatientRecord),
    Treatment(crate::model::TreatmentRecord),
    Embryo(Box<crate::model::EmbryoRecord>),
    Transfer(crate::model::TransferRecord),
}

impl Current {
    pub fn version(&self) -> u64 {
        match self {
            Current::Patient(record) => record.version,
            Current::Treatment(record) => record.version,
            Current::Embryo(record) => record.version,
            Current::Transfer(record) => record.version,
        }
    }
}

/// A user, API key or instrument change refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminRefusal {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
}

impl Refusal for AdminRefusal {
    fn code(&self) -> &'static str {
        match self {
            AdminRefusal::NotFound(_) => "not_found",
            AdminRefusal::AlreadyExists(_) => "already_exists",
        }
    }
}

/// A request the writer did not take. Both variants hand the submission (the operation and
/// its completion) back, to be submitted again.
pub enum SubmitError {
    /// The bounded queue is full: stop reading the socket that feeds it and retry later.
    Full(crate::writer::Submission),
    /// Shutdown began; the writer accepts nothing more.
    Closed(crate::writer::Submission),
}

impl SubmitError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::Full(..) => "queue_full",
            SubmitError::Closed(..) => "shutting_down",
        }
    }

    /// The submission that was not taken.
    pub fn into_submission(self) -> crate::writer::Submission {
        match self {
            SubmitError::Full(submission) | SubmitError::Closed(submission) => submission,
        }
    }
}

impl fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(submission) => f.debug_tuple("Full").field(submission).finish(),
            SubmitError::Closed(submission) => f.debug_tuple("Closed").field(submission).finish(),
        }
    }
}

impl fmt::Display for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(..) => write!(f, "write queue is full; retry later"),
            SubmitError::Closed(..) => write!(f, "writer is shut down"),
        }
    }
}

impl std::error::Error for SubmitError {}
