//! The network layer's limits, in one place, with their units in their names.

use std::time::Duration;

/// Bounds of one worker pool. Every buffer, queue and timer of the loops is sized from here.
#[derive(Debug, Clone)]
pub struct NetLimits {
    /// Most connections open at once in the pool; further accepts are closed at once.
    pub connections_max: u32,
    /// Most plaintext bytes buffered from one peer before its session consumes them.
    pub input_bytes_max: usize,
    /// Most plaintext bytes waiting to be sent to one peer; above it, reading from that
    /// peer stops until the peer reads (it is not reading its answers).
    pub output_bytes_max: usize,
    /// Most bytes read from one connection per loop turn, so one busy peer cannot starve
    /// the others on the same loop.
    pub read_bytes_per_turn_max: usize,
    /// A connection whose session has not completed its handshake by then is closed.
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
