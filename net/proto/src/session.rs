//! What the sessions of both protocols share: the error that ends a session.

use std::fmt;

/// An error code that can build its protocol's error message (the incubator's ERROR frame,
/// the viewer's `Error` answer).
pub trait SessionCode: Copy + fmt::Display {
    /// The message that carries an error to the peer.
    type ErrorMessage;

    /// The error message with this code and `text` for request `seq` (0: the whole
    /// connection), with the code's number and stable name filled in.
    fn error_message(self, seq: u64, text: String) -> Self::ErrorMessage;
}

/// An error that ends a session with a code of its protocol: a frame that cannot be decoded
/// (`incubator::ProtoError`, `viewer::FrameError`). It converts into [`SessionError`] with its
/// code and its text.
pub trait ClosingError: fmt::Display {
    /// The protocol's error code type.
    type Code: SessionCode;

    /// The code to send (with seq 0) before closing the connection.
    fn error_code(&self) -> Self::Code;
}

/// A protocol violation that ends the session: send [`SessionError::to_message`] (the
/// connection-level error, seq 0), then close the connection.
///
/// Each protocol names its own: `incubator::SessionError` and `viewer::SessionError` are this
/// type over their [`SessionCode`]. It displays as `{code}: {message}`, the code as its
/// protocol displays it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SessionError<C: SessionCode> {
    /// The stable code to report.
    pub code: C,
    /// A readable explanation.
    pub message: String,
}

impl<C: SessionCode> SessionError<C> {
    /// A session error with this code and text.
    pub fn new(code: C, message: impl Into<String>) -> Self {
        SessionError {
            code,
            message: message.into(),
        }
    }

    /// The connection-level error message (seq 0) that reports this error.
    pub fn to_message(&self) -> C::ErrorMessage {
        self.code.error_message(0, self.message.clone())
    }
}

impl<E: ClosingError> From<E> for SessionError<E::Code> {
    fn from(error: E) -> Self {
        SessionError::new(error.error_code(), error.to_string())
    }
}
