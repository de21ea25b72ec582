//! The stable error codes of the viewer protocol's `Error` message.

use super::pb;
use crate::session::SessionCode;
use crate::wire_enum::error_codes;

error_codes! {
    "Error",
    /// Stable error codes: the number and the snake_case name never change meaning.
    pub enum ErrorCode {
        /// A payload that is not a valid envelope, or an envelope without a request.
        MalformedFrame = 1 => "malformed_frame",
        /// A frame's length exceeds the limit (64 KiB before login, request_bytes_max after).
        FrameTooLarge = 2 => "frame_too_large",
        /// Login.protocol_version is not supported.
        UnsupportedVersion = 3 => "unsupported_version",
        /// A request other than Login or Resume before the session is established.
        LoginRequired = 4 => "login_required",
        /// Wrong user name or password (which one is not said).
        AuthFailed = 5 => "auth_failed",
        /// Too many failed logins: the account is locked for a while.
        AccountLocked = 6 => "account_locked",
        /// The account is disabled by an administrator.
        AccountDisabled = 7 => "account_disabled",
        /// Resume with a token that is unknown, logged out or expired: log in again.
        SessionExpired = 8 => "session_expired",
        /// The user's rights do not allow the request (a `view` user writing, for example).
        PermissionDenied = 9 => "permission_denied",
        /// A field is missing, too long or out of range.
        InvalidField = 10 => "invalid_field",
        /// A request's seq is not greater than the previous one.
        SequenceError = 11 => "sequence_error",
        /// The patient, treatment, dish, embryo, annotation or image does not exist.
        NotFound = 12 => "not_found",
        /// Someone else changed the row since the version named; the current one is attached.
        Conflict = 13 => "conflict",
        /// A patient or treatment with that id already exists.
        AlreadyExists = 14 => "already_exists",
        /// The server cannot read or store right now; retry later.
        StorageUnavailable = 15 => "storage_unavailable",
        /// The server's disk is full; writes are refused until space is freed, reads go on.
        DiskFull = 16 => "disk_full",
        /// The server is overloaded; retry after a short pause.
        Busy = 17 => "busy",
        /// The server is shutting down; reconnect later (Resume keeps the session).
        ShuttingDown = 18 => "shutting_down",
        /// Nothing was received for too long; send Ping when idle.
        IdleTimeout = 19 => "idle_timeout",
        /// No Login or Resume in time after connecting.
        HandshakeTimeout = 20 => "handshake_timeout",
        /// A bug or unexpected failure in the server.
        InternalError = 21 => "internal_error",
        /// A message not valid in this state (a second Login, for example).
        UnexpectedMessage = 22 => "unexpected_message",
        /// The playback was cancelled by the viewer.
        Cancelled = 23 => "cancelled",
        /// More unanswered requests than inflight_requests_max.
        TooManyRequests = 24 => "too_many_requests",
        /// A stored image failed its SHA-256 check; an administrator must look at it.
        ImageDamaged = 25 => "image_damaged",
        /// The session was resumed on another connection; this one is closed.
        Superseded = 26 => "superseded",
        /// The server has no valid licence (missing, changed, for another server, expired).
        LicenseInvalid = 27 => "license_invalid",
        /// The licence does not name this computer, or its configuration's computers are all
        /// connected.
        ComputerNotLicensed = 28 => "computer_not_licensed",
        /// The viewer fell so far behind that the change notices it had not received were
        /// pruned from the change log; Resume (it answers `resync_required`). Sent with seq 0.
        CursorExpired = 29 => "cursor_expired",
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

impl SessionCode for ErrorCode {
    type ErrorMessage = pb::ServerMessage;

    fn error_message(self, seq: u64, text: String) -> pb::ServerMessage {
        error_message(seq, self, text)
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
        assert_eq!(ErrorCode::from_code(30), None);
    }
}
