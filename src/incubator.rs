//! The incubator interface (port 3000): one session per connected instrument, turning
//! protocol requests into storage writes and reads, and storage completions into ACK or
//! ERROR frames. An image is acknowledged only when the commit holding it is durable.

use bytes::BytesMut;
use es_net::{CloseReason, ConnHandle, Service, Session, SessionIo, TimeoutKind};
use es_proto::incubator::{
    error_message, patient_list_limit, pb, validate_request, ErrorCode, Message, ServerEvent,
    ServerLimits, ServerSession, PROTOCOL_VERSION,
};
use es_storage::{
    AlarmInput, ConfirmInstrumentSecret, DishRegistration, HelloRefusal, ImageBytes, ImageRefusal,
    InstrumentHello, OpResult, PatientRef, PutImage, PutTelemetry, RegisterDish, Store, Submission,
    SubmitError, TelemetrySample, WellRegistration, WriteError, Writer,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Messages delivered to an incubator connection from other threads.
pub enum IncubatorMsg {
    /// The storage writer finished the HELLO's instrument record.
    HelloDone {
        hello: pb::Hello,
        result: OpResult<InstrumentHello>,
    },
    /// The storage writer finished a request.
    Done { seq: u64, answer: Answer },
    /// A newer connection of the same instrument took over.
    Superseded,
}

/// What the storage writer made of a request, in the terms the answer needs.
pub enum Answer {
    Image {
        duplicate: bool,
    },
    Dish {
        changed: bool,
    },
    Telemetry {
        duplicate: bool,
        withheld: u32,
        dropped: u32,
    },
    Refused {
        code: ErrorCode,
        message: String,
    },
}

impl Answer {
    fn image(result: OpResult<PutImage>) -> Answer {
        match result {
            Ok(stored) => Answer::Image {
                duplicate: stored.duplicate,
            },
            Err(error) => Answer::refused(&error, |refusal| match refusal {
                ImageRefusal::Conflict => ErrorCode::ImageConflict,
                ImageRefusal::UnknownDish => ErrorCode::UnknownDish,
                ImageRefusal::UnknownWell => ErrorCode::UnknownWell,
                ImageRefusal::UnknownInstrument => ErrorCode::InternalError,
            }),
        }
    }

    fn dish(result: OpResult<RegisterDish>) -> Answer {
        match result {
            Ok(registered) => Answer::Dish {
                changed: registered.changed,
            },
            Err(error) => Answer::refused(&error, |_| ErrorCode::InternalError),
        }
    }

    fn telemetry(result: OpResult<PutTelemetry>) -> Answer {
        match result {
            Ok(stored) => Answer::Telemetry {
                duplicate: stored.duplicate,
                withheld: stored.ims_withheld,
                dropped: stored.ims_dropped,
            },
            Err(error) => Answer::refused(&error, |_| ErrorCode::InternalError),
        }
    }

    fn refused<R: es_storage::Refusal>(
        error: &WriteError<R>,
        refusal_code: impl FnOnce(&R) -> ErrorCode,
    ) -> Answer {
        Answer::Refused {
            code: error_code(error, refusal_code),
            message: error.to_string(),
        }
    }
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
    pub handle: ConnHandle<IncubatorMsg>,
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
    /// handle of the older connection it replaces.
    fn admit(
        &self,
        connected: Connected,
        admit: impl FnOnce(&[String]) -> Result<(), String>,
    ) -> Result<Option<ConnHandle<IncubatorMsg>>, String> {
        let mut map = self.by_serial.lock();
        let others: Vec<String> = map
            .values()
            .filter(|c| c.serial != connected.serial)
            .map(|c| c.model.clone())
            .collect();
        admit(&others)?;
        let older = map.insert(connected.serial.clone(), connected);
        Ok(older.map(|older| older.handle))
    }

    /// Counts a refused HELLO of `serial`.
    fn refused(&self, hello: &pb::Hello, code: ErrorCode, peer: SocketAddr) {
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
        entry.at_ms = now_ms();
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
            .is_some_and(|current| current.handle.id() == connection_id)
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
    pub store: Store,
    pub writer: Writer,
    pub registry: Arc<Registry>,
    pub limits: ServerLimits,
    pub disk: Arc<crate::disk_guard::DiskState>,
    pub licensing: Arc<crate::license::Licensing>,
    /// Instrument monitoring: whether telemetry is queued for upload, and the queue's bound.
    pub ims: Arc<crate::ims::ImsShared>,
    /// How a serial number never seen is enrolled.
    pub enrolment: es_storage::Enrolment,
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
        IncubatorSession {
            protocol: ServerSession::new(self.limits),
            store: self.store.clone(),
            writer: self.writer.clone(),
            registry: self.registry.clone(),
            disk: self.disk.clone(),
            licensing: self.licensing.clone(),
            ims: self.ims.clone(),
            enrolment: self.enrolment,
            handle,
            peer,
            instrument: None,
            counters: Arc::new(LiveCounters::default()),
            waiting_for_hello: false,
            blocked: None,
        }
    }
}

struct Instrument {
    id: u64,
    serial: String,
    /// The model its HELLO named: the monitoring upload's allowlist follows it.
    model: String,
    /// The SHA-256 of the secret issued on this connection, until its first request confirms
    /// it (see `confirm_secret`).
    unconfirmed_secret_sha256: Option<[u8; 32]>,
    /// This connection's flag in the registry.
    enrolling: Arc<std::sync::atomic::AtomicBool>,
}

pub struct IncubatorSession {
    protocol: ServerSession,
    store: Store,
    writer: Writer,
    registry: Arc<Registry>,
    disk: Arc<crate::disk_guard::DiskState>,
    licensing: Arc<crate::license::Licensing>,
    ims: Arc<crate::ims::ImsShared>,
    enrolment: es_storage::Enrolment,
    handle: ConnHandle<IncubatorMsg>,
    peer: SocketAddr,
    instrument: Option<Instrument>,
    counters: Arc<LiveCounters>,
    /// The HELLO is with the storage writer; nothing else is read meanwhile.
    waiting_for_hello: bool,
    /// A request the storage queue had no room for; retried before reading more.
    blocked: Option<Submission>,
}

use crate::now_ms;

impl IncubatorSession {
    fn name(&self) -> String {
        match &self.instrument {
            Some(instrument) => format!("incubator {} ({})", instrument.serial, self.peer),
            None => format!("incubator at {}", self.peer),
        }
    }

    /// Answers and closes: a connection-level error.
    fn fail(&mut self, code: ErrorCode, message: String, io: &mut SessionIo<'_>) {
        if code == ErrorCode::HandshakeTimeout {
            // The event loop logs these, rate-limited (a flood of silent peers).
            tracing::debug!(incubator = %self.name(), code = code.name(), "{message}; closing the connection");
        } else {
            tracing::warn!(incubator = %self.name(), code = code.name(), "{message}; closing the connection");
        }
        let mut out = BytesMut::new();
        error_message(0, code, message.clone()).encode(&mut out);
        io.write(&out);
        io.close(CloseReason::Requested(format!(
            "{}: {message}",
            code.name()
        )));
    }

    fn respond(&mut self, message: Message, io: &mut SessionIo<'_>) {
        let mut out = BytesMut::new();
        self.protocol.respond(message, &mut out);
        io.write(&out);
    }

    fn handle_event(&mut self, event: ServerEvent, io: &mut SessionIo<'_>) {
        match event {
            ServerEvent::Hello(hello) => self.start_hello(hello, io),
            ServerEvent::Request(message) => self.handle_request(message, io),
        }
    }

    fn start_hello(&mut self, hello: pb::Hello, io: &mut SessionIo<'_>) {
        let mut secret_bytes = [0u8; 24];
        if getrandom::fill(&mut secret_bytes).is_err() {
            self.fail(
                ErrorCode::InternalError,
                "the server could not generate a secret".into(),
                io,
            );
            return;
        }
        // A HELLO the licence has no room for is refused before it changes anything stored;
        // `finish_hello` checks again when it admits the connection.
        let licensing = self.licensing.clone();
        let capacity = self.registry.would_admit(&hello.serial_number, |others| {
            capacity_check(&licensing, &hello.model, others)
        });
        if let Err(message) = capacity {
            self.registry
                .refused(&hello, ErrorCode::CapacityExceeded, self.peer);
            self.fail(ErrorCode::CapacityExceeded, message, io);
            return;
        }
        let op = InstrumentHello {
            serial: hello.serial_number.clone(),
            model: hello.model.clone(),
            firmware: hello.firmware_version.clone(),
            presented_secret: (!hello.secret.is_empty()).then(|| hello.secret.clone()),
            new_secret: hex::encode(secret_bytes),
            issued_connection_open: self.registry.issued_connection_open(&hello.serial_number),
            enrolment: self.enrolment,
            number: hello.instrument_number,
            at_ms: now_ms(),
        };
        let handle = self.handle.clone();
        let submission = Submission::new(op, move |result| {
            handle.send(IncubatorMsg::HelloDone { hello, result });
        });
        self.waiting_for_hello = true;
        io.pause_reading();
        io.owe();
        self.submit(submission, io);
    }

    fn finish_hello(
        &mut self,
        hello: pb::Hello,
        result: OpResult<InstrumentHello>,
        io: &mut SessionIo<'_>,
    ) {
        self.waiting_for_hello = false;
        let (instrument_id, issued_secret) = match result {
            Ok(accepted) => (accepted.instrument_id, accepted.issued_secret),
            Err(WriteError::Refused(HelloRefusal::AuthFailed)) => {
                let message = format!(
                    "instrument {} presented a wrong secret; an administrator can reset it with \
                     `esserver instrument reset-secret {}`",
                    hello.serial_number, hello.serial_number
                );
                self.registry
                    .refused(&hello, ErrorCode::AuthFailed, self.peer);
                self.fail(ErrorCode::AuthFailed, message, io);
                return;
            }
            Err(WriteError::Refused(HelloRefusal::EnrolmentInProgress)) => {
                let message = format!(
                    "another connection of instrument {} was issued a secret it has not \
                     confirmed yet; nothing was changed; retry once that connection has sent \
                     a request or closed",
                    hello.serial_number
                );
                self.registry
                    .refused(&hello, ErrorCode::EnrolmentInProgress, self.peer);
                self.fail(ErrorCode::EnrolmentInProgress, message, io);
                return;
            }
            Err(WriteError::Refused(HelloRefusal::EnrolmentPending)) => {
                let message = format!(
                    "instrument {} is not enrolled on this server: it waits until an \
                     administrator approves it (web interface, Instruments page, or \
                     `esserver instrument approve {}`); nothing was stored",
                    hello.serial_number, hello.serial_number
                );
                self.registry
                    .refused(&hello, ErrorCode::EnrolmentPending, self.peer);
                self.fail(ErrorCode::EnrolmentPending, message, io);
                return;
            }
            Err(error) => {
                let code = error_code(&error, |_| ErrorCode::AuthFailed);
                self.fail(code, format!("HELLO refused: {error}"), io);
                return;
            }
        };
        let enrolling = Arc::new(std::sync::atomic::AtomicBool::new(issued_secret.is_some()));
        self.instrument = Some(Instrument {
            id: instrument_id,
            serial: hello.serial_number.clone(),
            model: hello.model.clone(),
            unconfirmed_secret_sha256: issued_secret
                .as_deref()
                .map(|secret| es_storage::tables::sha256(secret.as_bytes())),
            enrolling: enrolling.clone(),
        });
        let licensing = self.licensing.clone();
        let model = hello.model.clone();
        let admitted = self.registry.admit(
            Connected {
                handle: self.handle.clone(),
                serial: hello.serial_number.clone(),
                model: hello.model.clone(),
                firmware: hello.firmware_version.clone(),
                peer: self.peer,
                connected_at_ms: now_ms(),
                counters: self.counters.clone(),
                enrolling,
            },
            |others| capacity_check(&licensing, &model, others),
        );
        let older = match admitted {
            Ok(older) => older,
            Err(message) => {
                self.instrument = None;
                self.registry
                    .refused(&hello, ErrorCode::CapacityExceeded, self.peer);
                self.fail(ErrorCode::CapacityExceeded, message, io);
                return;
            }
        };
        if let Some(older) = older {
            if older.id() != self.handle.id() {
                tracing::warn!(incubator = %self.name(),
                    "a second connection of this instrument said HELLO; closing the older one");
                // Never block a loop on another loop's queue; closing is the fallback.
                if !older.try_send(IncubatorMsg::Superseded) {
                    tracing::warn!(incubator = %self.name(), "the older connection's loop is busy; it will be closed by its timers");
                }
            }
        }
        let issued = issued_secret.unwrap_or_default();
        tracing::info!(incubator = %self.name(), model = %hello.model, firmware = %hello.firmware_version,
            tls = io.is_tls(), new_secret_issued = !issued.is_empty(), "incubator connected");
        let reply = pb::HelloOk {
            server_id: self.store.server_id(),
            accepted_version: PROTOCOL_VERSION,
            frame_bytes_max: self.protocol_limits().frame_bytes_max,
            inflight_requests_max: self.protocol_limits().inflight_requests_max,
            issued_secret: issued,
            server_clock_ms: now_ms(),
        };
        let mut out = BytesMut::new();
        self.protocol.accept_hello(reply, &mut out);
        io.write(&out);
        if !io.is_stopping() {
            io.resume_reading();
        }
    }

    fn protocol_limits(&self) -> ServerLimits {
        self.protocol.limits()
    }

    fn instrument_id(&self) -> u64 {
        self.instrument
            .as_ref()
            .map(|i| i.id)
            .expect("requests come only after an accepted HELLO")
    }

    /// The first request on a connection that was issued a secret: the instrument stored it
    /// (it must, before any request), so it becomes the confirmed secret. The registry's flag
    /// clears once that is committed, so no HELLO in between can be issued another secret.
    fn confirm_secret(&mut self) {
        let Some(instrument) = self.instrument.as_mut() else {
            return;
        };
        let Some(secret_sha256) = instrument.unconfirmed_secret_sha256 else {
            return;
        };
        let enrolling = instrument.enrolling.clone();
        let serial = instrument.serial.clone();
        let op = ConfirmInstrumentSecret {
            instrument_id: instrument.id,
            secret_sha256,
        };
        let submitted = self.writer.try_submit(op, move |result| match result {
            Ok(_) => enrolling.store(false, Ordering::Release),
            Err(error) => {
                tracing::warn!(incubator = %serial, %error, "the issued secret could not be confirmed; the next HELLO presenting it confirms it");
            }
        });
        // A full queue: the next request tries again.
        if submitted.is_ok() {
            instrument.unconfirmed_secret_sha256 = None;
        }
    }

    fn handle_request(&mut self, message: Message, io: &mut SessionIo<'_>) {
        self.confirm_secret();
        let seq = message.seq();
        if let Err(error) = validate_request(&message) {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(incubator = %self.name(), seq, code = "invalid_field", "request refused: {error}");
            self.respond(error.to_error(seq), io);
            return;
        }
        let instrument_id = self.instrument_id();
        let at_ms = now_ms();
        let handle = self.handle.clone();
        let submission = match message {
            Message::Image(image) => {
                self.counters
                    .image_bytes
                    .fetch_add(image.jpeg.len() as u64, Ordering::Relaxed);
                let op = PutImage {
                    instrument_id,
                    dish_id: image.dish_id,
                    well: image.well,
                    focal_plane: image.focal_plane,
                    acquired_at_ms: image.acquired_at_ms,
                    jpeg: ImageBytes::new(image.jpeg),
                    at_ms,
                };
                Submission::new(op, move |result| {
                    let answer = Answer::image(result);
                    handle.send(IncubatorMsg::Done { seq, answer });
                })
            }
            Message::RegisterDish(dish) => {
                let op = RegisterDish {
                    instrument_id,
                    dish: dish_registration(dish),
                    at_ms,
                };
                Submission::new(op, move |result| {
                    let answer = Answer::dish(result);
                    handle.send(IncubatorMsg::Done { seq, answer });
                })
            }
            Message::Telemetry(telemetry) => Submission::new(
                PutTelemetry {
                    instrument_id,
                    samples: telemetry
                        .samples
                        .into_iter()
                        .map(|s| TelemetrySample {
                            channel: s.channel,
                            value: s.value,
                            at_ms: s.at_ms,
                        })
                        .collect(),
                    alarms: telemetry
                        .alarms
                        .into_iter()
                        .map(|a| AlarmInput {
                            code: a.code,
                            severity: u8::try_from(a.severity).unwrap_or(0),
                            raised_at_ms: a.raised_at_ms,
                            cleared_at_ms: a.cleared_at_ms,
                            text: a.text,
                        })
                        .collect(),
                    ims: self
                        .instrument
                        .as_ref()
                        .and_then(|instrument| self.ims.queueing(&instrument.model)),
                    at_ms,
                },
                move |result| {
                    let answer = Answer::telemetry(result);
                    handle.send(IncubatorMsg::Done { seq, answer });
                },
            ),
            Message::SyncState(request) => {
                let reply = self.sync_state(seq, instrument_id, &request.dish_id);
                self.respond(reply, io);
                return;
            }
            Message::ListPatients(request) => {
                let reply = self.list_patients(seq, &request);
                self.respond(reply, io);
                return;
            }
            Message::Ping(_) => {
                self.respond(
                    Message::Ack(pb::Ack {
                        seq,
                        duplicate: false,
                    }),
                    io,
                );
                return;
            }
            other => {
                // The protocol session lets only client requests through.
                self.respond(
                    error_message(
                        seq,
                        ErrorCode::UnexpectedMessage,
                        format!("{:?} is not a request", other.message_type()),
                    ),
                    io,
                );
                return;
            }
        };
        if self.disk.is_low() {
            // Keep the reserve for the database's own pages; the incubator keeps its data.
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "the server's disk is below its free-space reserve ({} MB free); not stored, retry later",
                self.disk.free_bytes() / 1_000_000
            );
            self.respond(error_message(seq, ErrorCode::DiskFull, message), io);
            return;
        }
        io.owe();
        self.submit(submission, io);
    }

    /// Hands an owed request to the storage writer (its completion answers it), or keeps it
    /// while the writer's queue is full.
    fn submit(&mut self, submission: Submission, io: &mut SessionIo<'_>) {
        match self.writer.try_resubmit(submission) {
            Ok(()) => {}
            Err(SubmitError::Full(submission)) => {
                // Backpressure: stop reading until the storage queue has room.
                self.blocked = Some(submission);
                io.pause_reading();
            }
            Err(SubmitError::Closed(_)) => {
                // Answered here, not through the completion: that would queue a message to
                // this very loop from this loop.
                self.fail(
                    ErrorCode::ShuttingDown,
                    "the server is shutting down; reconnect later".into(),
                    io,
                );
            }
        }
    }

    fn retry_blocked(&mut self, io: &mut SessionIo<'_>) {
        if let Some(submission) = self.blocked.take() {
            self.submit(submission, io);
        }
        self.update_reading(io);
    }

    /// Reads only when nothing blocks: no pending HELLO, no request waiting for queue room,
    /// below the in-flight limit, not stopping.
    fn update_reading(&mut self, io: &mut SessionIo<'_>) {
        let blocked = self.waiting_for_hello
            || self.blocked.is_some()
            || self.protocol.at_inflight_limit()
            || io.is_stopping();
        if blocked {
            io.pause_reading();
        } else {
            io.resume_reading();
        }
    }

    fn finish_request(&mut self, seq: u64, answer: Answer, io: &mut SessionIo<'_>) {
        let reply = match answer {
            Answer::Image { duplicate } => {
                if duplicate {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.images.fetch_add(1, Ordering::Relaxed);
                }
                Message::Ack(pb::Ack { seq, duplicate })
            }
            Answer::Telemetry {
                duplicate,
                withheld,
                dropped,
            } => {
                if dropped > 0 {
                    tracing::warn!(incubator = %self.name(), dropped,
                        "monitoring (IMS) queue full: its oldest records were dropped to make room; is the upload working?");
                }
                if withheld > 0 {
                    tracing::info!(incubator = %self.name(), withheld,
                        "telemetry stored but not queued for monitoring: a channel or alarm code that is not in the device catalog for this model");
                }
                Message::Ack(pb::Ack { seq, duplicate })
            }
            Answer::Dish { changed } => Message::Ack(pb::Ack {
                seq,
                duplicate: !changed,
            }),
            Answer::Refused { code, message } => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(incubator = %self.name(), seq, code = code.name(), "request refused: {message}");
                error_message(seq, code, message)
            }
        };
        self.respond(reply, io);
    }

    fn sync_state(&self, seq: u64, instrument_id: u64, dish_id: &str) -> Message {
        let state = self
            .store
            .read()
            .and_then(|reader| reader.sync_state(instrument_id, dish_id));
        match state {
            Err(error) => {
                tracing::error!(incubator = %self.name(), "SYNC_STATE failed: {error}");
                error_message(seq, ErrorCode::StorageUnavailable, error.to_string())
            }
            Ok(None) => Message::SyncStateResult(pb::SyncStateResult {
                seq,
                known: false,
                dish_id: dish_id.to_string(),
                wells: Vec::new(),
            }),
            Ok(Some(state)) => Message::SyncStateResult(pb::SyncStateResult {
                seq,
                known: true,
                dish_id: state.dish_id,
                wells: state
                    .wells
                    .into_iter()
                    .map(|well| pb::WellState {
                        well: well.well,
                        embryo_id: well.embryo_id,
                        acquisitions: well
                            .acquisitions
                            .into_iter()
                            .map(|a| pb::AcquisitionState {
                                acquired_at_ms: a.acquired_at_ms,
                                focal_planes: a.focal_planes,
                            })
                            .collect(),
                    })
                    .collect(),
            }),
        }
    }

    fn list_patients(&self, seq: u64, request: &pb::ListPatients) -> Message {
        let limit = patient_list_limit(request);
        let after =
            (!request.after_patient_id.is_empty()).then_some(request.after_patient_id.as_str());
        let patients = self
            .store
            .read()
            .and_then(|reader| reader.list_patients(after, limit));
        match patients {
            Err(error) => error_message(seq, ErrorCode::StorageUnavailable, error.to_string()),
            Ok(patients) => {
                let next_after = if patients.len() as u32 == limit {
                    patients
                        .last()
                        .map(|p| p.patient_id.clone())
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                Message::PatientList(pb::PatientList {
                    seq,
                    patients: patients
                        .into_iter()
                        .map(|p| pb::PatientInfo {
                            patient_id: p.patient_id,
                            first_name: p.first_name,
                            last_name: p.last_name,
                            date_of_birth: p.date_of_birth,
                            treatments: p.treatments,
                        })
                        .collect(),
                    next_after,
                })
            }
        }
    }
}

fn dish_registration(dish: pb::RegisterDish) -> DishRegistration {
    let patient = dish.patient.unwrap_or_default();
    DishRegistration {
        dish_id: dish.dish_id,
        slot: dish.slot,
        patient: PatientRef {
            patient_id: patient.patient_id,
            first_name: patient.first_name,
            last_name: patient.last_name,
            date_of_birth: patient.date_of_birth,
            patient_idx: String::new(),
        },
        treatment_name: dish.treatment_name,
        insemination_at_ms: dish.insemination_time_ms,
        wells: dish
            .wells
            .into_iter()
            .map(|w| WellRegistration {
                well: w.well,
                embryo_id: w.embryo_id,
                label: w.label,
            })
            .collect(),
        fertilization_method: dish.fertilization_method,
    }
}

/// Whether the licence's configuration has room for one more instrument of `model` beside
/// those connected, by the capacity planner's rules. Without a valid licence every
/// instrument is admitted: culture data is never turned away.
fn capacity_check(
    licensing: &crate::license::Licensing,
    model: &str,
    others: &[String],
) -> Result<(), String> {
    use es_perf::catalog::DeviceModel;
    use es_perf::config_rules;
    let Ok(license) = licensing.current(now_ms()) else {
        return Ok(());
    };
    // A model the catalog does not know counts as one unit, like the smaller instruments.
    let parse = |name: &str| {
        name.parse::<DeviceModel>()
            .unwrap_or(DeviceModel::EmbryoScope8)
    };
    let mut devices: Vec<(DeviceModel, u32)> = Vec::new();
    for name in others.iter().map(String::as_str).chain([model]) {
        let device = parse(name);
        match devices.iter_mut().find(|(m, _)| *m == device) {
            Some((_, count)) => *count += 1,
            None => devices.push((device, 1)),
        }
    }
    let violations = config_rules::violations(license.configuration, &devices, 0);
    if violations.is_empty() {
        return Ok(());
    }
    let used = config_rules::usage(license.configuration, &devices, 0);
    let reasons: Vec<String> = violations.iter().map(ToString::to_string).collect();
    Err(format!(
        "no room for this {model} in the licence's {} configuration: {}; with it, {} of {} capacity units would be used by {} instrument(s)",
        license.configuration.name(),
        reasons.join("; "),
        used.units_used,
        used.units_max,
        others.len() + 1
    ))
}

/// The wire code of a storage error; `refusal_code` names the operation's own refusals.
pub fn error_code<R>(
    error: &WriteError<R>,
    refusal_code: impl FnOnce(&R) -> ErrorCode,
) -> ErrorCode {
    match error {
        WriteError::Refused(refusal) => refusal_code(refusal),
        WriteError::InvalidInput(_) => ErrorCode::InvalidField,
        WriteError::DiskFull => ErrorCode::DiskFull,
        WriteError::Storage(_) => ErrorCode::StorageUnavailable,
        WriteError::ShuttingDown => ErrorCode::ShuttingDown,
    }
}

impl Session for IncubatorSession {
    type Msg = IncubatorMsg;

    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        while !io.is_reading_paused() && !io.is_closing() {
            match self.protocol.poll_event(input) {
                Ok(None) => break,
                Ok(Some(event)) => {
                    self.handle_event(event, io);
                    self.update_reading(io);
                }
                Err(error) => {
                    self.fail(error.code, error.message, io);
                    break;
                }
            }
        }
    }

    fn on_message(&mut self, message: IncubatorMsg, io: &mut SessionIo<'_>) {
        match message {
            IncubatorMsg::HelloDone { hello, result } => {
                io.answered();
                self.finish_hello(hello, result, io);
            }
            IncubatorMsg::Done { seq, answer } => {
                io.answered();
                self.finish_request(seq, answer, io);
            }
            IncubatorMsg::Superseded => {
                let message =
                    "another connection of this instrument said HELLO; this one is closed"
                        .to_string();
                self.fail(ErrorCode::Superseded, message, io);
                return;
            }
        }
        // With input still buffered (requests sent before a half-close), reading resumes and
        // the loop hands them over.
        self.retry_blocked(io);
    }

    fn on_tick(&mut self, io: &mut SessionIo<'_>) {
        if self.blocked.is_some() {
            self.retry_blocked(io);
        }
    }

    fn on_timeout(&mut self, kind: TimeoutKind, io: &mut SessionIo<'_>) {
        let (code, message) = match kind {
            TimeoutKind::Handshake => (ErrorCode::HandshakeTimeout, "no HELLO in time".to_string()),
            TimeoutKind::Idle => (
                ErrorCode::IdleTimeout,
                "nothing received for too long; send PING when idle".to_string(),
            ),
        };
        self.fail(code, message, io);
    }

    fn on_shutdown_done(&mut self, io: &mut SessionIo<'_>) {
        self.fail(
            ErrorCode::ShuttingDown,
            "the server is shutting down; reconnect later".into(),
            io,
        );
    }

    fn on_closed(&mut self, reason: &CloseReason) {
        if let Some(instrument) = &self.instrument {
            self.registry
                .remove_if_current(&instrument.serial, self.handle.id());
            tracing::info!(incubator = %self.name(), %reason, "incubator disconnected");
        }
    }

    fn is_established(&self) -> bool {
        self.protocol.is_established()
    }
}
