//! The stable error codes of ERROR frames.

use super::message::Message;
use super::pb;
use crate::session::SessionCode;
use crate::wire_enum::error_codes;

error_codes! {
    "ERROR",
    /// Stable error codes: the number and the snake_case name never change meaning.
    pub enum ErrorCode {
        /// A frame or payload that cannot be decoded (also a length of 0).
        MalformedFrame = 1 => "malformed_frame",
        /// A frame's length field exceeds frame_bytes_max.
        FrameTooLarge = 2 => "frame_too_large",
        /// A type byte that names no message type.
        UnknownMessageType = 3 => "unknown_message_type",
        /// HELLO.protocol_version is not supported by the server.
        UnsupportedVersion = 4 => "unsupported_version",
        /// A request arrived before HELLO.
        HelloRequired = 5 => "hello_required",
        /// The instrument's secret does not match the one on file.
        AuthFailed = 6 => "auth_failed",
        /// An image with the same key but different bytes is already stored; the stored one
        /// is kept.
        ImageConflict = 7 => "image_conflict",
        /// The dish is not registered.
        UnknownDish = 8 => "unknown_dish",
        /// The well is not registered in the dish.
        UnknownWell = 9 => "unknown_well",
        /// A field is missing, too long or out of range.
        InvalidField = 10 => "invalid_field",
        /// A request's seq is not greater than the previous one.
        SequenceError = 11 => "sequence_error",
        /// The server cannot store right now; retry later.
        StorageUnavailable = 12 => "storage_unavailable",
        /// The server's disk is full; retry later.
        DiskFull = 13 => "disk_full",
        /// The server is shutting down; reconnect later.
        ShuttingDown = 14 => "shutting_down",
        /// Another connection with the same serial number took over.
        Superseded = 15 => "superseded",
        /// HELLO did not arrive in time after connecting.
        HandshakeTimeout = 16 => "handshake_timeout",
        /// Nothing was received for too long.
        IdleTimeout = 17 => "idle_timeout",
        /// A bug or unexpected failure in the server; retry later.
        InternalError = 18 => "internal_error",
        /// A message not valid in this state (a second HELLO, a server-to-client type, ...).
        UnexpectedMessage = 19 => "unexpected_message",
        /// The licence's configuration has no room for this instrument (capacity units or
        /// EmbryoScope+/Flex count); the message names the configuration and the current use.
        CapacityExceeded = 20 => "capacity_exceeded",
        /// Answer to HELLO: another connection of this serial number was issued a secret it has
        /// not confirmed yet (by a request or a HELLO presenting it); no other secret is issued
        /// while that connection is open. Retry after a backoff.
        EnrolmentInProgress = 21 => "enrolment_in_progress",
        /// Answer to HELLO: the server enrols new instruments only once an administrator
        /// approved their serial number, and this one is not yet; nothing was stored. Retry
        /// after a backoff (the administrator sees it as pending).
        EnrolmentPending = 22 => "enrolment_pending",
    }
}

impl ErrorCode {
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

impl SessionCode for ErrorCode {
    type ErrorMessage = Message;

    fn error_message(self, seq: u64, text: String) -> Message {
        error_message(seq, self, text)
    }
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
