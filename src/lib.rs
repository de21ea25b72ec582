//! esserver: the central data server of an IVF clinic's time-lapse embryo culture system.
//!
//! This crate owns the configuration (`EmbryoServer.ini`), the services (the incubator and
//! viewer interfaces, the public API, the web interface; instrument monitoring as it lands),
//! licences, the
//! domain logic that maps protocol requests onto storage, the admin commands and the
//! command line. It holds no socket loops (es-net) and no redb details (es-storage).

pub mod accounts;
pub mod activity;
pub mod admin;
pub mod api;
pub mod archive;
pub mod backup;
pub mod config;
pub mod control;
pub mod disk_guard;
pub mod edits;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod ims;
pub mod incubator;
pub mod license;
pub mod logging;
pub mod os;
pub mod server;
pub mod service;
#[cfg(test)]
mod simulation;
pub mod times;
pub mod viewer;
pub mod viewer_tool;
pub mod warnings;
pub mod web;
pub mod workers;

/// The server's version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit it was built from (`build.rs`): 12 hex digits, or "unknown".
pub const COMMIT: &str = env!("ESSERVER_COMMIT");
/// "0.1.0 (commit 1a2b3c4d5e6f)", for `--version` and the logs.
pub const VERSION_TEXT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ESSERVER_COMMIT"),
    ")"
);

/// Now, as Unix milliseconds UTC (the time every stored instant uses).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Fills a buffer with secure random bytes; false when the system has none to give. The
/// session cores take one, so the simulation can give them a seeded one.
pub type Entropy = Box<dyn FnMut(&mut [u8]) -> bool + Send>;

/// The system's random source.
pub fn system_entropy() -> Entropy {
    Box::new(|buffer| getrandom::fill(buffer).is_ok())
}
