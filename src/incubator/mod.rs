//! The incubator interface (port 3000): one session per connected instrument, turning
//! protocol requests into storage writes and reads, and storage completions into ACK or
//! ERROR frames. An image is acknowledged only when the commit holding it is durable.
//!
//! [`core::IncubatorCore`] holds the protocol logic, sans-I/O; [`IncubatorSession`] is its
//! adapter to es-net (bytes, the writer's queue, the connection's lifecycle).

pub mod core;

use bytes::BytesMut;
use es_net::{CloseReason, ConnHandle, Service, Session, SessionIo, TimeoutKind};
use es_proto::incubator::{pb, ErrorCode};
use es_storage::{Submission, SubmitError, Writer};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use self::core::{error_code, Answer};
use self::core::{
    Action, ConnectionInfo, Event, IncubatorCore, IncubatorShared, Supersede, Written,
};
use crate::now_ms;

/// Messages delivered to an incubator connection from other threads.
pub enum IncubatorMsg {
    /// The storage writer finished one of the connection's writes.
    Written(Written),
    /// A newer connection of the same instrument took over.
    Superseded,
}

/// Live figures of one connected instrument, for `esserver status`.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub images: AtomicU64,
    pub image_bytes: AtomicU64,
    pub duplicates: AtomicU64,
    pub errors: AtomicU64,
}

/// One connected instrument in the registry.
pub struct Connected {
    /// The connection's identity (unique in the process for its life).
    pub connection_id: u64,
    /// Closes the connection when a newer one of the same instrument says HELLO.
    pub supersede: Supersede,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub peer: SocketAddr,
    pub connected_at_ms: i64,
    pub counters: Arc<LiveCounters>,
    /// True while this connection holds a secret issued to it and not yet confirmed (it has
    /// sent no request yet): no other secret is issued for the serial meanwhile.
    pub enrolling: Arc<std::sync::atomic::AtomicBool>,
}

/// The instruments connected right now, by serial number.
#[derive(Default)]
pub struct Registry {
    by_serial: Mutex<HashMap<String, Connected>>,
    /// HELLOs refused, by serial number (at most `REFUSED_SERIALS_MAX`), for the dashboard.
    refused: Mutex<HashMap<String, Refused>>,
}

/// Why [`Registry::admit`] refused a connection.
#[derive(Debug)]
enum AdmitRefusal {
    /// The licence has no room for it (the reason).
    Capacity(String),
    /// A newer connection of the same instrument is admitted already.
    NewerConnection,
}

/// Serial numbers whose refused HELLOs are remembered; past it the oldest is forgotten.
const REFUSED_SERIALS_MAX: usize = 256;

/// The HELLOs refused for one serial number since the server started.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Refused {
    pub serial: String,
    /// The model the latest refused HELLO named.
    pub model: String,
    pub count: u64,
    /// The latest refusal's code (`capacity_exceeded`, `auth_failed`, ...), from where, when.
    pub code: &'static str,
    pub peer: String,
    pub at_ms: i64,
}

impl Registry {
    /// Records a connection if `admit` accepts the models connected besides it (checked and
    /// inserted under one lock, so two HELLOs cannot both take the last room); returns the
    /// identity and the supersede call of the older connection it replaces. A connection
    /// whose HELLO completes after a newer connection of the same serial was admitted (the
    /// instrument gave up on it and reconnected) is the stale one: it is refused, and the
    /// newer one stays.
    fn admit(
        &self,
        connected: Connected,
        admit: impl FnOnce(&[String]) -> Result<(), String>,
    ) -> Result<Option<(u64, Supersede)>, AdmitRefusal> {
        let mut map = self.by_serial.lock();
        if map
            .get(&connected.serial)
            .is_some_and(|current| current.connection_id > connected.connection_id)
        {
            return Err(AdmitRefusal::NewerConnection);
        }
        let others: Vec<String> = map
            .values()
            .filter(|c| c.serial != connected.serial)
            .map(|c| c.model.clone())
            .collect();
        admit(&others).map_err(AdmitRefusal::Capacity)?;
        let older = map.insert(connected.serial.clone(), connected);
        Ok(older.map(|older| (older.connection_id, older.supersede)))
    }

    /// Counts a refused HELLO of `serial`.
    fn refused(&self, hello: &pb::Hello, code: ErrorCode, peer: SocketAddr, at_ms: i64) {
        let serial = hello.serial_number.as_str();
        let mut map = self.refused.lock();
        if !map.contains_key(serial) && map.len() >= REFUSED_SERIALS_MAX {
            if let Some(oldest) = map
                .values()
                .min_by_key(|r| r.at_ms)
                .map(|r| r.serial.clone())
            {
                map.remove(&oldest);
            }
        }
        let entry = map.entry(serial.to_string()).or_insert_with(|| Refused {
            serial: serial.to_string(),
            model: String::new(),
            count: 0,
            code: code.name(),
            peer: peer.to_string(),
            at_ms: 0,
        });
        entry.count += 1;
        entry.model.clone_from(&hello.model);
        entry.code = code.name();
        entry.peer = peer.to_string();
        entry.at_ms = at_ms;
    }

    /// The refused HELLOs, most recent first.
    pub fn refusals(&self) -> Vec<Refused> {
        let mut list: Vec<Refused> = self.refused.lock().values().cloned().collect();
        list.sort_by_key(|r| std::cmp::Reverse(r.at_ms));
        list
    }

    /// Serial numbers whose latest HELLO waits for an administrator's approval
    /// (`enrolment = approve`), most recent first.
    pub fn pending(&self) -> Vec<Refused> {
        let mut list = self.refusals();
        list.retain(|r| r.code == ErrorCode::EnrolmentPending.name());
        list
    }

    /// Forgets the refusals of `serial` (it was approved: it is no longer pending).
    pub fn forget_refusals(&self, serial: &str) {
        self.refused.lock().remove(serial);
    }

    /// True when an open connection of `serial` holds an issued, unconfirmed secret.
    fn issued_connection_open(&self, serial: &str) -> bool {
        self.by_serial
            .lock()
            .get(serial)
            .is_some_and(|c| c.enrolling.load(Ordering::Acquire))
    }

    /// The capacity check `admit` makes, without admitting: a HELLO the licence has no room
    /// for is refused before anything is stored.
    fn would_admit(
        &self,
        serial: &str,
        admit: impl FnOnce(&[String]) -> Result<(), String>,
    ) -> Result<(), String> {
        let map = self.by_serial.lock();
        let others: Vec<String> = map
            .values()
            .filter(|c| c.serial != serial)
            .map(|c| c.model.clone())
            .collect();
        admit(&others)
    }

    /// Why the instruments connected now exceed the licence's configuration, if they do
    /// (after a smaller licence was installed, say): they keep their connections, but those
    /// that reconnect beyond it are refused.
    pub fn over_limit(&self, licensing: &crate::license::Licensing) -> Option<String> {
        use es_perf::catalog::DeviceModel;
        use es_perf::config_rules;
        let license = licensing.current(now_ms()).ok()?;
        let mut devices: Vec<(DeviceModel, u32)> = Vec::new();
        for connected in self.by_serial.lock().values() {
            let model = connected
                .model
                .parse::<DeviceModel>()
                .unwrap_or(DeviceModel::EmbryoScope8);
            match devices.iter_mut().find(|(m, _)| *m == model) {
                Some((_, count)) => *count += 1,
                None => devices.push((model, 1)),
            }
        }
        let violations = config_rules::violations(license.configuration, &devices, 0);
        if violations.is_empty() {
            return None;
        }
        let used = config_rules::usage(license.configuration, &devices, 0);
        let reasons: Vec<String> = violations.iter().map(ToString::to_string).collect();
        Some(format!(
            "the instruments connected now exceed the licence's {} configuration ({}): {} of {} \
             capacity units, {} of {} EmbryoScope+/Flex; they keep their connections, but those \
             that reconnect beyond it are refused (capacity_exceeded)",
            license.configuration.name(),
            reasons.join("; "),
            used.units_used,
            used.units_max,
            used.plus_flex_used,
            used.plus_flex_max
        ))
    }

    fn remove_if_current(&self, serial: &str, connection_id: u64) {
        let mut map = self.by_serial.lock();
        if map
            .get(serial)
            .is_some_and(|current| current.connection_id == connection_id)
        {
            map.remove(serial);
        }
    }

    /// A snapshot for status reports.
    pub fn snapshot(&self) -> Vec<ConnectedSnapshot> {
        let map = self.by_serial.lock();
        let mut list: Vec<_> = map
            .values()
            .map(|c| ConnectedSnapshot {
                serial: c.serial.clone(),
                model: c.model.clone(),
                firmware: c.firmware.clone(),
                peer: c.peer.to_string(),
                connected_at_ms: c.connected_at_ms,
                images: c.counters.images.load(Ordering::Relaxed),
                image_bytes: c.counters.image_bytes.load(Ordering::Relaxed),
                duplicates: c.counters.duplicates.load(Ordering::Relaxed),
                errors: c.counters.errors.load(Ordering::Relaxed),
            })
            .collect();
        list.sort_by(|a, b| a.serial.cmp(&b.serial));
        list
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnectedSnapshot {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub peer: String,
    pub connected_at_ms: i64,
    pub images: u64,
    pub image_bytes: u64,
    pub duplicates: u64,
    pub errors: u64,
}

pub struct IncubatorService {
    pub shared: Arc<IncubatorShared>,
    pub writer: Writer,
}

impl Service for IncubatorService {
    type Msg = IncubatorMsg;
    type Session = IncubatorSession;

    fn name(&self) -> &'static str {
        "incubator"
    }

    fn open(
        &self,
        peer: SocketAddr,
        handle: ConnHandle<IncubatorMsg>,
        _now: Instant,
    ) -> IncubatorSession {
        let older = handle.clone();
        let connection = ConnectionInfo {
            id: handle.id(),
            peer,
            tls: false,
            supersede: Arc::new(move || older.try_send(IncubatorMsg::Superseded)),
        };
        IncubatorSession {
            core: IncubatorCore::new(self.shared.clone(), connection, crate::system_entropy()),
            writer: self.writer.clone(),
            handle,
            blocked: VecDeque::new(),
            tls_noted: false,
        }
    }
}

/// The adapter of an [`IncubatorCore`] to es-net: it feeds the core bytes, the writer's
/// completions and the loop's timers, performs its actions, keeps a write the writer's queue
/// had no room for, and tells the loop what is owed and when to read.
pub struct IncubatorSession {
    core: IncubatorCore,
    writer: Writer,
    handle: ConnHandle<IncubatorMsg>,
    /// Writes the storage queue had no room for, in order (at most the two one request
    /// makes: a secret's confirmation and the request's own write); retried before reading
    /// more.
    blocked: VecDeque<Submission>,
    /// The core was told whether the connection is TLS (known once input flows).
    tls_noted: bool,
}

impl IncubatorSession {
    /// Performs the core's actions, in order.
    fn perform(&mut self, io: &mut SessionIo<'_>) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Send(bytes) => io.write(&bytes),
                Action::Close(reason) => io.close(CloseReason::Requested(reason)),
                Action::Write(write) => {
                    if write.owes_answer() {
                        io.owe();
                    }
                    let handle = self.handle.clone();
                    let submission = write.into_submission(move |written| {
                        handle.send(IncubatorMsg::Written(written));
                    });
                    self.submit(submission, io);
                }
            }
        }
    }

    /// Hands a write to the storage writer, or keeps it while the writer's queue is full.
    fn submit(&mut self, submission: Submission, io: &mut SessionIo<'_>) {
        if !self.blocked.is_empty() {
            // Order is kept: nothing overtakes a write already waiting for room.
            self.blocked.push_back(submission);
            return;
        }
        match self.writer.try_resubmit(submission) {
            Ok(()) => {}
            Err(SubmitError::Full(submission)) => {
                // Backpressure: stop reading until the storage queue has room.
                self.blocked.push_back(submission);
                io.pause_reading();
            }
            Err(SubmitError::Closed(_)) => {
                // Answered here, not through the completion: that would queue a message to
                // this very loop from this loop.
                self.core.handle(Event::StorageClosed, now_ms());
                self.perform(io);
            }
        }
    }

    fn retry_blocked(&mut self, io: &mut SessionIo<'_>) {
        while let Some(submission) = self.blocked.pop_front() {
            match self.writer.try_resubmit(submission) {
                Ok(()) => {}
                Err(SubmitError::Full(submission)) => {
                    self.blocked.push_front(submission);
                    break;
                }
                Err(SubmitError::Closed(_)) => {
                    self.blocked.clear();
                    self.core.handle(Event::StorageClosed, now_ms());
                    self.perform(io);
                }
            }
        }
        self.update_reading(io);
    }

    /// Reads only when nothing blocks: the core takes input, no write waits for queue room,
    /// not stopping.
    fn update_reading(&mut self, io: &mut SessionIo<'_>) {
        if self.core.wants_input() && self.blocked.is_empty() && !io.is_stopping() {
            io.resume_reading();
        } else {
            io.pause_reading();
        }
    }
}

impl Session for IncubatorSession {
    type Msg = IncubatorMsg;

    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        if !self.tls_noted {
            self.tls_noted = true;
            self.core.note_tls(io.is_tls());
        }
        while !io.is_reading_paused() && !io.is_closing() {
            let progressed = self.core.poll_input(input, now_ms());
            self.perform(io);
            self.update_reading(io);
            if !progressed {
                break;
            }
        }
    }

    fn on_message(&mut self, message: IncubatorMsg, io: &mut SessionIo<'_>) {
        match message {
            IncubatorMsg::Written(written) => {
                if written.owed() {
                    io.answered();
                }
                self.core.handle(Event::Written(written), now_ms());
            }
            IncubatorMsg::Superseded => self.core.handle(Event::Superseded, now_ms()),
        }
        self.perform(io);
        // With input still buffered (requests sent before a half-close), reading resumes and
        // the loop hands them over.
        self.retry_blocked(io);
    }

    fn on_tick(&mut self, io: &mut SessionIo<'_>) {
        if !self.blocked.is_empty() {
            self.retry_blocked(io);
        }
    }

    fn on_timeout(&mut self, kind: TimeoutKind, io: &mut SessionIo<'_>) {
        self.core.handle(Event::Timeout(kind), now_ms());
        self.perform(io);
    }

    fn on_shutdown_done(&mut self, io: &mut SessionIo<'_>) {
        self.core.handle(Event::ShutdownDone, now_ms());
        self.perform(io);
    }

    fn on_closed(&mut self, reason: &CloseReason) {
        let reason = reason.to_string();
        self.core.handle(Event::Closed { reason }, now_ms());
    }

    fn is_established(&self) -> bool {
        self.core.is_established()
    }
}
