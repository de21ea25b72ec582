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

/// The requests of one session, as both protocols count them: seqs strictly increasing, and
/// those not answered yet (with what the protocol keeps of each, `T`), at most `max`.
#[derive(Debug, Clone)]
pub struct Requests<T> {
    last_seq: u64,
    unanswered: std::collections::BTreeMap<u64, T>,
    max: u32,
}

impl<T> Requests<T> {
    /// No request yet; at most `max` unanswered (at least 1).
    pub fn new(max: u32) -> Self {
        Requests {
            last_seq: 0,
            unanswered: std::collections::BTreeMap::new(),
            max: max.max(1),
        }
    }

    /// Takes `seq` as the next request's: `Err(last)` when it does not come after the last
    /// one taken (`last`), which ends the session with `sequence_error`.
    pub fn take_seq(&mut self, seq: u64) -> Result<(), u64> {
        if seq <= self.last_seq {
            return Err(self.last_seq);
        }
        self.last_seq = seq;
        Ok(())
    }

    /// Request `seq` now waits for its answer.
    pub fn open(&mut self, seq: u64, kept: T) {
        let earlier = self.unanswered.insert(seq, kept);
        debug_assert!(earlier.is_none(), "request seq {seq} opened twice");
    }

    /// Request `seq` is answered: what was kept of it, None when it was not unanswered.
    pub fn close(&mut self, seq: u64) -> Option<T> {
        self.unanswered.remove(&seq)
    }

    /// True while request `seq` waits for (more of) its answer.
    pub fn is_open(&self, seq: u64) -> bool {
        self.unanswered.contains_key(&seq)
    }

    /// Requests not answered yet.
    pub fn unanswered(&self) -> u32 {
        u32::try_from(self.unanswered.len()).unwrap_or(u32::MAX)
    }

    /// True when the peer has as many unanswered requests as it may: read no further.
    pub fn is_full(&self) -> bool {
        self.unanswered() >= self.max
    }
}
