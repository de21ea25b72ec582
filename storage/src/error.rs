//! Typed errors. Every variant has a stable snake_case code (`code()`) that goes on the wire and
//! into logs; the Display text is for a person and may be reworded, the code may not.

use crate::ops::WriteOp;
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

/// The result of one write request that did not succeed. An op that fails validation wrote
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    #[error("instrument authentication failed: the presented secret does not match")]
    AuthFailed,
    #[error(
        "an image with this key is already stored with different bytes; the stored one is kept"
    )]
    ImageConflict,
    #[error("unknown dish: register the dish before sending its images")]
    UnknownDish,
    #[error("unknown well: the well is not registered in this dish")]
    UnknownWell,
    #[error("unknown instrument: send HELLO first")]
    UnknownInstrument,
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("disk full: the server cannot store data until space is freed")]
    DiskFull,
    #[error("storage error: {0}")]
    Storage(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The client's version is stale: someone else changed the row first. Carries the
    /// current version and state (JSON), so the client can show it and decide.
    #[error(
        "conflict: changed by someone else since version {expected}; now at version {version}"
    )]
    Conflict {
        expected: u64,
        version: u64,
        current: String,
    },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The Idempotency-Key was used before for a different request.
    #[error("Idempotency-Key {0:?} was already used for a different request; use a new key for a new request")]
    IdempotencyKeyReused(String),
}

impl WriteError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::AuthFailed => "auth_failed",
            WriteError::ImageConflict => "image_conflict",
            WriteError::UnknownDish => "unknown_dish",
            WriteError::UnknownWell => "unknown_well",
            WriteError::UnknownInstrument => "unknown_instrument",
            WriteError::InvalidInput(_) => "invalid_input",
            WriteError::DiskFull => "disk_full",
            WriteError::Storage(_) => "storage_error",
            WriteError::ShuttingDown => "shutting_down",
            WriteError::Conflict { .. } => "conflict",
            WriteError::NotFound(_) => "not_found",
            WriteError::AlreadyExists(_) => "already_exists",
            WriteError::IdempotencyKeyReused(_) => "idempotency_key_reused",
        }
    }
}

impl From<StorageError> for WriteError {
    fn from(error: StorageError) -> WriteError {
        match error {
            StorageError::DiskFull => WriteError::DiskFull,
            other => WriteError::Storage(other.to_string()),
        }
    }
}

/// A request the writer did not take. Both variants hand the op and its completion back.
pub enum SubmitError {
    /// The bounded queue is full: stop reading the socket that feeds it and retry later.
    Full(WriteOp, crate::writer::Completion),
    /// Shutdown began; the writer accepts nothing more.
    Closed(WriteOp, crate::writer::Completion),
}

impl SubmitError {
    /// Stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            SubmitError::Full(..) => "queue_full",
            SubmitError::Closed(..) => "shutting_down",
        }
    }

    /// The op and completion that were not submitted.
    pub fn into_parts(self) -> (WriteOp, crate::writer::Completion) {
        match self {
            SubmitError::Full(op, done) | SubmitError::Closed(op, done) => (op, done),
        }
    }
}

impl fmt::Debug for SubmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitError::Full(op, _) => f.debug_tuple("Full").field(op).finish(),
            SubmitError::Closed(op, _) => f.debug_tuple("Closed").field(op).finish(),
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
