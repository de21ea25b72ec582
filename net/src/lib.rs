//! es-net: the network layer of esserver.
//!
//! Owns the hand-tuned mio event loops and the per-NIC worker pools they run in, the
//! listeners, the connection slab with generation-tagged tokens, the TLS (rustls) glue,
//! per-turn work budgets, bounded buffers, timers (handshake and idle timeouts),
//! backpressure, completions from other threads (bounded crossbeam queues plus
//! `mio::Waker`) and graceful shutdown of the loops.
//!
//! It does not know what an embryo is: protocols plug in through the [`Service`] and
//! [`Session`] traits, which see plaintext bytes and a `now`, and never a socket.

pub mod client;
mod event_loop;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
mod limits;
mod pool;
mod slab;
pub mod tls;
mod transport;

pub use event_loop::{
    CloseReason, ConnHandle, Fallback, LoopHandle, Pump, Service, Session, SessionIo, TimeoutKind,
};
pub use limits::{NetLimits, STREAM_OUTPUT_HIGH_BYTES};
pub use pool::{Pool, PoolConfig, PoolStats};
pub use transport::Transport;
