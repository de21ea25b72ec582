//! The service manager's side of the server: systemd's notify protocol (`Type=notify`). The
//! server says when it is ready (every listener bound, the database open), when it reloads
//! (SIGHUP) and when it stops, and pings the watchdog (`WatchdogSec`) from its main loop
//! while it is healthy. Without `NOTIFY_SOCKET` (started by hand, or on a platform without
//! systemd) every call does nothing.
//!
//! Windows later: the same points (ready, stopping) map to a Windows service's
//! `SetServiceStatus`; docs/operations.md lists what is platform-specific.

use std::time::{Duration, Instant};

/// What the service manager is told, and when the watchdog is due.
pub struct ServiceManager {
    /// Half the watchdog interval systemd asked for (`WATCHDOG_USEC`), when it asked.
    ping_every: Option<Duration>,
    last_ping: Instant,
}

impl ServiceManager {
    /// From the environment systemd gives a `Type=notify` service.
    pub fn from_env() -> ServiceManager {
        ServiceManager {
            ping_every: watchdog_interval().map(|interval| interval / 2),
            last_ping: Instant::now(),
        }
    }

    /// How long the main loop may wait before it must look at the watchdog again.
    pub fn tick(&self) -> Duration {
        self.ping_every.map_or(Duration::from_secs(1), |every| {
            every.min(Duration::from_secs(1))
        })
    }

    /// Every listener is bound and the database open.
    pub fn ready(&mut self, status: &str) {
        send(&[Message::Ready, Message::Status(status)]);
        self.last_ping = Instant::now();
    }

    /// A reload (SIGHUP) begins; [`ServiceManager::ready`] ends it.
    pub fn reloading(&self) {
        send(&[Message::Reloading, Message::MonotonicNow]);
    }

    pub fn stopping(&self) {
        send(&[Message::Stopping, Message::Status("stopping")]);
    }

    /// Pings the watchdog when half its interval has passed and `healthy` says the server
    /// works; an unhealthy server lets it expire, and systemd restarts it.
    pub fn watchdog(&mut self, healthy: impl FnOnce() -> bool) {
        let Some(every) = self.ping_every else {
            return;
        };
        if self.last_ping.elapsed() < every {
            return;
        }
        if healthy() {
            send(&[Message::Watchdog]);
            self.last_ping = Instant::now();
        }
    }
}

/// `WATCHDOG_USEC`, unless `WATCHDOG_PID` names another process (as `sd_watchdog_enabled`).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

enum Message<'a> {
    Ready,
    Reloading,
    Stopping,
    Watchdog,
    Status(&'a str),
    MonotonicNow,
}

#[cfg(unix)]
fn send(messages: &[Message<'_>]) {
    use sd_notify::NotifyState;
    let mut states = Vec::with_capacity(messages.len());
    for message in messages {
        states.push(match message {
            Message::Ready => NotifyState::Ready,
            Message::Reloading => NotifyState::Reloading,
            Message::Stopping => NotifyState::Stopping,
            Message::Watchdog => NotifyState::Watchdog,
            Message::Status(text) => NotifyState::Status(text),
            Message::MonotonicNow => match NotifyState::monotonic_usec_now() {
                Ok(state) => state,
                Err(_) => continue,
            },
        });
    }
    if let Err(error) = sd_notify::notify(false, &states) {
        tracing::warn!(%error, "cannot notify the service manager");
    }
}

#[cfg(not(unix))]
fn send(_messages: &[Message<'_>]) {}
