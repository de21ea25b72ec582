//! The stable error codes of the viewer protocol's `Error` message.

use super::pb;

/// Stable error codes: the number and the snake_case name never change meaning.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// A payload that is not a valid envelope, or an envelope without a request.
    MalformedFrame = 1,
    /// A frame's length exceeds the limit (64 KiB before login, request_bytes_max after).
    FrameTooLarge = 2,
    /// Login.protocol_version is not supported.
    UnsupportedVersion = 3,
    /// A request other than Login or Resume before the session is established.
    LoginRequired = 4,
    /// Wrong user name or password (which one is not said).
    AuthFailed = 5,
    /// Too many failed logins: the account is locked for a while.
    AccountLocked = 6,
    /// The account is disabled by an administrator.
    AccountDisabled = 7,
    /// Resume with a token that is unknown, logged out or expired: log in again.
    SessionExpired = 8,
    /// The user's rights do not allow the request (a `view` user writing, for example).
    PermissionDenied = 9,
    /// A field is missing, too long or out of range.
    InvalidField = 10,
    /// A request's seq is not greater than the previous one.
    SequenceError = 11,
    /// The patient, treatment, dish, embryo, annotation or image does not exist.
    NotFound = 12,
    /// Someone else changed the row since the version named; the current one is attached.
    Conflict = 13,
    /// A patient or treatment with that id already exists.
    AlreadyExists = 14,
    /// The server cannot read or store right now; retry later.
    StorageUnavailable = 15,
    /// The server's disk is full; writes are refused until space is freed, reads go on.
    DiskFull = 16,
    /// The server is overloaded; retry after a short pause.
    Busy = 17,
    /// The server is shutting down; reconnect later (Resume keeps the session).
    ShuttingDown = 18,
    /// Nothing was received for too long; send Ping when idle.
    IdleTimeout = 19,
    /// No Login or Resume in time after connecting.
    HandshakeTimeout = 20,
    /// A bug or unexpected failure in the server.
    InternalError = 21,
    /// A message not valid in this state (a second Login, for example).
    UnexpectedMessage = 22,
    /// The playback was cancelled by the viewer.
    Cancelled = 23,
    /// More unanswered requests than inflight_requests_max.
    TooManyRequests = 24,
    /// A stored image failed its SHA-256 check; an administrator must look at it.
    ImageDamaged = 25,
    /// The session was resumed on another connection; this one is closed.
    Superseded = 26,
    /// The server has no valid licence (missing, changed, for another server, expired).
    LicenseInvalid = 27,
    /// The licence does not name this computer, or its configuration's computers are all
    /// connected.
    ComputerNotLicensed = 28,
}

impl ErrorCode {
    /// Every code, ascending.
    pub const ALL: [ErrorCode; 28] = [
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::LoginRequired,
        ErrorCode::AuthFailed,
        ErrorCode::AccountLocked,
        ErrorCode::AccountDisabled,
        ErrorCode::SessionExpired,
        ErrorCode::PermissionDenied,
        ErrorCode::InvalidField,
        ErrorCode::SequenceError,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::AlreadyExists,
        ErrorCode::StorageUnavailable,
        ErrorCode::DiskFull,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::IdleTimeout,
        ErrorCode::HandshakeTimeout,
        ErrorCode::InternalError,
        ErrorCode::UnexpectedMessage,
        ErrorCode::Cancelled,
        ErrorCode::TooManyRequests,
        ErrorCode::ImageDamaged,
        ErrorCode::Superseded,
        ErrorCode::LicenseInvalid,
        ErrorCode::ComputerNotLicensed,
    ];

    /// The number on the wire (Error.code).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The stable snake_case name (Error.name).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::LoginRequired => "login_required",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::AccountLocked => "account_locked",
            ErrorCode::AccountDisabled => "account_disabled",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::SequenceError => "sequence_error",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::Busy => "busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::TooManyRequests => "too_many_requests",
            ErrorCode::ImageDamaged => "image_damaged",
            ErrorCode::Superseded => "superseded",
            ErrorCode::LicenseInvalid => "license_invalid",
            ErrorCode::ComputerNotLicensed => "computer_not_licensed",
        }
    }

    /// The code with this number, if any.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    /// The code with this name, if any.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An `Error` answer to request `seq` (0: a connection-level error before closing).
pub fn error_message(seq: u64, code: ErrorCode, message: impl Into<String>) -> pb::ServerMessage {
    pb::ServerMessage {
        seq,
        body: Some(pb::server_message::Body::Error(pb::Error {
            code: code.code(),
            name: code.name().to_string(),
            message: message.into(),
            current_version: 0,
            current_json: String::new(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_numbered_from_1_without_gaps_and_named_uniquely() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.code() as usize, index + 1);
            assert_eq!(ErrorCode::from_code(code.code()), Some(*code));
            assert_eq!(ErrorCode::from_name(code.name()), Some(*code));
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(29), None);
    }
}
