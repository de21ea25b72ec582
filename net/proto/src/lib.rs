//! es-proto owns the wire protocols of esserver: the messages generated from
//! `docs/protocol/*.proto`, the error codes, the framing codec, and the sans-I/O client and
//! server sessions of the incubator protocol (`docs/protocol/incubator.md`) and the viewer
//! protocol (`docs/protocol/viewer.md`).
//!
//! It does no I/O and touches no database: sessions take bytes (and, where time matters, a
//! `now` passed in) and produce events and bytes. The event loops of `es-net` move the bytes;
//! the services of `esserver` decide what a request means. Limits carry their unit in the name
//! (`frame_bytes_max`), errors are typed with stable codes, and no input can make it panic.
//!
//! The two protocols share one implementation of what they have in common: the
//! length-prefixed frame decoder ([`frame`]), the error that ends a session ([`session`]),
//! and the tables of stable numbers and names (error codes, message types), each protocol
//! declaring only its own table.

mod wire_enum;

pub mod frame;
pub mod incubator;
pub mod session;
pub mod viewer;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod simulation;
