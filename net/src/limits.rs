//! The network layer's limits, in one place, with their units in their names.

use std::time::Duration;

/// A session that streams an answer in parts (a playback, a ZIP, a long JSON answer) writes its
/// next part only while less than this waits to be sent: TCP flow control then paces it, and
/// a peer that stops reading costs the server at most about this much.
pub const STREAM_OUTPUT_HIGH_BYTES: usize = 2 * 1024 * 1024;

/// Bounds of one worker pool. Every buffer, queue and timer of the loops is sized from here.
#[derive(Debug, Clone)]
pub struct NetLimits {
    /// Most connections open at once in the pool; further accepts are closed at once.
    pub connections_max: u32,
    /// Most connections open at once from one IP address, counted across the pool's loops;
    /// a connection over it is closed at accept.
    pub connections_per_address_max: u32,
    /// Most connections of the pool whose handshake (TLS, then the protocol's own: HELLO,
    /// login) has not completed. When a new connection arrives and the bound is reached, the
    /// oldest of them is dropped, not the new one, so idle sockets cannot lock out a device
    /// that connects later. Each of the pool's N loops keeps its own share, `ceil(bound / N)`
    /// (connections are dealt out round robin, so the shares fill evenly).
    pub unauthenticated_max: u32,
    /// Most plaintext bytes buffered from one peer before its session consumes them.
    pub input_bytes_max: usize,
    /// Most plaintext bytes waiting to be sent to one peer; above it, reading from that
    /// peer stops until the peer reads (it is not reading its answers).
    pub output_bytes_max: usize,
    /// Most bytes read from one connection per loop turn, so one busy peer cannot starve
    /// the others on the same loop.
    pub read_bytes_per_turn_max: usize,
    /// A connection whose session has not completed its handshake by then (counted from the
    /// accept, not from its last byte, so a peer dribbling bytes is closed too) is closed.
    pub handshake_timeout: Duration,
    /// A connection that sent nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Capacity of each loop's command queue (completions and new connections).
    pub loop_queue_max: usize,
    /// How long a graceful shutdown waits for in-flight work before closing anyway.
    pub shutdown_timeout: Duration,
}

impl Default for NetLimits {
    fn default() -> Self {
        NetLimits {
            connections_max: 1024,
            connections_per_address_max: 64,
            unauthenticated_max: 256,
            input_bytes_max: 4 * 1024 * 1024 + 64 * 1024,
            output_bytes_max: 8 * 1024 * 1024,
            read_bytes_per_turn_max: 256 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            loop_queue_max: 65_536,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}
