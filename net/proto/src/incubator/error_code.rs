//! The stable error codes of ERROR frames.

use super::message::Message;
use super::pb;

/// Stable error codes: the number and the snake_case name never change meaning.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    /// A frame or payload that cannot be decoded (also a length of 0).
    MalformedFrame = 1,
    /// A frame's length field exceeds frame_bytes_max.
    FrameTooLarge = 2,
    /// A type byte that names no message type.
    UnknownMessageType = 3,
    /// HELLO.protocol_version is not supported by the server.
    UnsupportedVersion = 4,
    /// A request arrived before HELLO.
    HelloRequired = 5,
    /// The instrument's secret does not match the one on file.
    AuthFailed = 6,
    /// An image with the same key but different bytes is already stored; the stored one is kept.
    ImageConflict = 7,
    /// The dish is not registered.
    UnknownDish = 8,
    /// The well is not registered in the dish.
    UnknownWell = 9,
    /// A field is missing, too long or out of range.
    InvalidField = 10,
    /// A request's seq is not greater than the previous one.
    SequenceError = 11,
    /// The server cannot store right now; retry later.
    StorageUnavailable = 12,
    /// The server's disk is full; retry later.
    DiskFull = 13,
    /// The server is shutting down; reconnect later.
    ShuttingDown = 14,
    /// Another connection with the same serial number took over.
    Superseded = 15,
    /// HELLO did not arrive in time after connecting.
    HandshakeTimeout = 16,
    /// Nothing was received for too long.
    IdleTimeout = 17,
    /// A bug or unexpected failure in the server; retry later.
    InternalError = 18,
    /// A message not valid in this state (a second HELLO, a server-to-client type, ...).
    UnexpectedMessage = 19,
    /// The licence's configuration has no room for this instrument (capacity units or
    /// EmbryoScope+/Flex count); the message names the configuration and the current use.
    CapacityExceeded = 20,
    /// Answer to HELLO: another connection of this serial number was issued a secret it has
    /// not confirmed yet (by a request or a HELLO presenting it); no other secret is issued
    /// while that connection is open. Retry after a backoff.
    EnrolmentInProgress = 21,
    /// Answer to HELLO: the server enrols new instruments only once an administrator
    /// approved their serial number, and this one is not yet; nothing was stored. Retry
    /// after a backoff (the administrator sees it as pending).
    EnrolmentPending = 22,
}

impl ErrorCode {
    /// Every code, ascending.
    pub const ALL: [ErrorCode; 22] = [
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownMessageType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::HelloRequired,
        ErrorCode::AuthFailed,
        ErrorCode::ImageConflict,
        ErrorCode::UnknownDish,
        ErrorCode::UnknownWell,
        ErrorCode::InvalidField,
        ErrorCode::SequenceError,
        ErrorCode::StorageUnavailable,
        ErrorCode::DiskFull,
        ErrorCode::ShuttingDown,
        ErrorCode::Superseded,
        ErrorCode::HandshakeTimeout,
        ErrorCode::IdleTimeout,
        ErrorCode::InternalError,
        ErrorCode::UnexpectedMessage,
        ErrorCode::CapacityExceeded,
        ErrorCode::EnrolmentInProgress,
        ErrorCode::EnrolmentPending,
    ];

    /// The number on the wire (ERROR.code).
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The stable snake_case name (ERROR.name).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::HelloRequired => "hello_required",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::ImageConflict => "image_conflict",
            ErrorCode::UnknownDish => "unknown_dish",
            ErrorCode::UnknownWell => "unknown_well",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::SequenceError => "sequence_error",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::DiskFull => "disk_full",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Superseded => "superseded",
            ErrorCode::HandshakeTimeout => "handshake_timeout",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::UnexpectedMessage => "unexpected_message",
            ErrorCode::CapacityExceeded => "capacity_exceeded",
            ErrorCode::EnrolmentInProgress => "enrolment_in_progress",
            ErrorCode::EnrolmentPending => "enrolment_pending",
        }
    }

    /// The code with this number, if any.
    pub fn from_code(code: u32) -> Option<ErrorCode> {
        let index = usize::try_from(code).ok()?.checked_sub(1)?;
        ErrorCode::ALL.get(index).copied()
    }

    /// The code with this name, if any.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|code| code.name() == name)
    }

    /// True when the server closes the connection after sending this error (with seq 0).
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::MalformedFrame
                | ErrorCode::FrameTooLarge
                | ErrorCode::UnknownMessageType
                | ErrorCode::UnsupportedVersion
                | ErrorCode::HelloRequired
                | ErrorCode::AuthFailed
                | ErrorCode::SequenceError
                | ErrorCode::ShuttingDown
                | ErrorCode::Superseded
                | ErrorCode::HandshakeTimeout
                | ErrorCode::IdleTimeout
                | ErrorCode::UnexpectedMessage
                | ErrorCode::CapacityExceeded
                | ErrorCode::EnrolmentInProgress
                | ErrorCode::EnrolmentPending
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// An ERROR message for request `seq` (0 = the whole connection).
pub fn error_message(seq: u64, code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error(pb::Error {
        seq,
        code: code.code(),
        name: code.name().to_owned(),
        message: message.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_dense() {
        for (index, code) in ErrorCode::ALL.into_iter().enumerate() {
            assert_eq!(code.code() as usize, index + 1);
            assert_eq!(ErrorCode::from_code(code.code()), Some(code));
            assert_eq!(ErrorCode::from_name(code.name()), Some(code));
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(23), None);
        assert_eq!(ErrorCode::EnrolmentPending.code(), 22);
        assert_eq!(ErrorCode::EnrolmentInProgress.code(), 21);
        assert_eq!(ErrorCode::ImageConflict.code(), 7);
        assert_eq!(ErrorCode::UnexpectedMessage.name(), "unexpected_message");
    }

    #[test]
    fn closing_codes_match_the_specification() {
        let closing: Vec<u32> = ErrorCode::ALL
            .into_iter()
            .filter(|code| code.closes_connection())
            .map(ErrorCode::code)
            .collect();
        assert_eq!(
            closing,
            vec![1, 2, 3, 4, 5, 6, 11, 14, 15, 16, 17, 19, 20, 21, 22]
        );
    }

    #[test]
    fn error_message_carries_code_and_name() {
        let Message::Error(error) = error_message(9, ErrorCode::UnknownDish, "dish D1") else {
            panic!("not an ERROR");
        };
        assert_eq!((error.seq, error.code), (9, 8));
        assert_eq!(error.name, "unknown_dish");
        assert_eq!(error.message, "dish D1");
    }
}
