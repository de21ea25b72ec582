//! The incubator session's core, sans-I/O (quinn-proto's split): it takes events (bytes
//! received, the storage writer's answers, timeouts) together with the time, and returns
//! actions (bytes to send, writes for the storage writer, close). It owns no socket, no
//! clock, no writer queue and no random source; [`super::IncubatorSession`] is the thin
//! adapter to es-net, and the deterministic simulation (`src/simulation/`) drives the same
//! core against the real storage writer.
//!
//! # Contract
//!
//! - [`IncubatorCore::poll_input`] takes at most one protocol event (one frame's worth) from
//!   the bytes received; call it only while [`IncubatorCore::wants_input`] and the caller's
//!   own conditions (no write waiting for queue room, not stopping) allow reading.
//! - After every call, drain [`IncubatorCore::poll_action`] and perform the actions in order.
//!   A [`Write`] is handed to the storage writer; its completion comes back as
//!   [`Event::Written`] (exactly once per write). A write that [`Write::owes_answer`] is an
//!   answer the connection owes its peer until that event arrives.
//! - After [`Action::Close`] the core takes no more input and produces nothing but the
//!   bookkeeping of [`Event::Closed`].
//! - Shared state the core reads or updates in place (the registry of connected
//!   instruments, the disk state, the licence, the read-only store) is the server's; the
//!   core takes no lock across calls.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use es_proto::incubator::{
    error_message, patient_list_limit, pb, validate_request, ErrorCode, Message, ServerEvent,
    ServerLimits, ServerSession, PROTOCOL_VERSION,
};
use es_storage::{
    AlarmInput, ConfirmInstrumentSecret, DishRegistration, HelloRefusal, ImageBytes, ImageRefusal,
    InstrumentHello, OpResult, PatientRef, PutImage, PutTelemetry, RegisterDish, Store, Submission,
    TelemetrySample, WellRegistration, WriteError,
};

use super::{AdmitRefusal, Connected, LiveCounters, Registry};
use crate::Entropy;

/// Bytes of the secret issued to a new instrument (sent as hex).
const SECRET_BYTES: usize = 24;

/// What every incubator connection's core reads: the server's shared state.
pub struct IncubatorShared {
    pub store: Store,
    pub registry: Arc<Registry>,
    pub limits: ServerLimits,
    pub disk: Arc<crate::disk_guard::DiskState>,
    pub licensing: Arc<crate::license::Licensing>,
    /// Instrument monitoring: whether telemetry is queued for upload, and the queue's bound.
    pub ims: Arc<crate::ims::ImsShared>,
    /// How a serial number never seen is enrolled.
    pub enrolment: es_storage::Enrolment,
}

/// Tells an older connection of the same instrument that a newer one took over; false when
/// it could not be told (its loop is busy or gone: its timers close it).
pub type Supersede = Arc<dyn Fn() -> bool + Send + Sync>;

/// Who this connection is, for the registry and the logs.
pub struct ConnectionInfo {
    /// Unique in the process for the connection's life (the registry's identity), and
    /// increasing in the order connections were accepted: of two connections of one
    /// instrument, the larger id is the newer.
    pub id: u64,
    pub peer: SocketAddr,
    pub tls: bool,
    pub supersede: Supersede,
}

/// What happened to the connection, besides bytes received.
pub enum Event {
    /// The storage writer finished a [`Write`].
    Written(Written),
    /// A newer connection of the same instrument took over.
    Superseded,
    /// The storage writer takes no more writes (the server is shutting down).
    StorageClosed,
    /// No HELLO in time, or nothing received for too long.
    Timeout(es_net::TimeoutKind),
    /// The server is shutting down and nothing is owed any more.
    ShutdownDone,
    /// The connection is gone (`reason` for the log).
    Closed { reason: String },
}

/// The storage writer's answer to one [`Write`].
pub enum Written {
    Hello {
        hello: pb::Hello,
        result: OpResult<InstrumentHello>,
    },
    Request {
        seq: u64,
        answer: Answer,
    },
    /// The issued secret is confirmed (or could not be: the next HELLO presenting it does).
    SecretConfirmed {
        error: Option<String>,
    },
}

impl Written {
    /// True when this answers a write that owed the peer an answer.
    pub fn owed(&self) -> bool {
        !matches!(self, Written::SecretConfirmed { .. })
    }
}

/// What the core asks of its adapter.
// A write is moved once through the action queue; boxing it would cost an allocation per
// image for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    /// Bytes for the peer, in order.
    Send(BytesMut),
    /// Hand to the storage writer; its completion comes back as [`Event::Written`].
    Write(Write),
    /// Close the connection after what was sent (`reason` for the log).
    Close(String),
}

/// A storage write of this connection.
pub enum Write {
    Hello(InstrumentHello, pb::Hello),
    Image(u64, PutImage),
    Dish(u64, RegisterDish),
    Telemetry(u64, PutTelemetry),
    ConfirmSecret(ConfirmInstrumentSecret),
}

impl Write {
    /// True when the peer waits for this write's answer.
    pub fn owes_answer(&self) -> bool {
        !matches!(self, Write::ConfirmSecret(_))
    }

    /// The writer's submission, whose completion calls `deliver` once (on the writer thread:
    /// it must not block).
    pub fn into_submission(self, deliver: impl FnOnce(Written) + Send + 'static) -> Submission {
        match self {
            Write::Hello(op, hello) => Submission::new(op, move |result| {
                deliver(Written::Hello { hello, result });
            }),
            Write::Image(seq, op) => Submission::new(op, move |result| {
                let answer = Answer::image(result);
                deliver(Written::Request { seq, answer });
            }),
            Write::Dish(seq, op) => Submission::new(op, move |result| {
                let answer = Answer::dish(result);
                deliver(Written::Request { seq, answer });
            }),
            Write::Telemetry(seq, op) => Submission::new(op, move |result| {
                let answer = Answer::telemetry(result);
                deliver(Written::Request { seq, answer });
            }),
            Write::ConfirmSecret(op) => Submission::new(op, move |result| {
                let error = result.err().map(|error| error.to_string());
                deliver(Written::SecretConfirmed { error });
            }),
        }
    }
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

struct Instrument {
    id: u64,
    serial: String,
    /// The model its HELLO named: the monitoring upload's allowlist follows it.
    model: String,
    /// The SHA-256 of the secret issued on this connection, until its first request confirms
    /// it (see `confirm_secret`).
    unconfirmed_secret_sha256: Option<[u8; 32]>,
    /// This connection's flag in the registry.
    enrolling: Arc<AtomicBool>,
}

/// One incubator connection's protocol logic.
pub struct IncubatorCore {
    protocol: ServerSession,
    shared: Arc<IncubatorShared>,
    connection: ConnectionInfo,
    entropy: Entropy,
    instrument: Option<Instrument>,
    counters: Arc<LiveCounters>,
    /// The HELLO is with the storage writer; nothing else is read meanwhile.
    waiting_for_hello: bool,
    /// A Close action was issued: nothing more is read or answered.
    closed: bool,
    actions: VecDeque<Action>,
}

impl IncubatorCore {
    pub fn new(
        shared: Arc<IncubatorShared>,
        connection: ConnectionInfo,
        entropy: Entropy,
    ) -> IncubatorCore {
        IncubatorCore {
            protocol: ServerSession::new(shared.limits),
            shared,
            connection,
            entropy,
            instrument: None,
            counters: Arc::new(LiveCounters::default()),
            waiting_for_hello: false,
            closed: false,
            actions: VecDeque::new(),
        }
    }

    /// The next action to perform, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// False while the core takes no input: a HELLO is with the writer, the protocol is at
    /// its in-flight limit, or the connection is closed.
    pub fn wants_input(&self) -> bool {
        !self.waiting_for_hello && !self.protocol.at_inflight_limit() && !self.closed
    }

    /// Whether the connection runs over TLS (for the log; the adapter knows it once the
    /// first bytes arrive).
    pub fn note_tls(&mut self, tls: bool) {
        self.connection.tls = tls;
    }

    /// Requests read and not answered yet.
    pub fn inflight(&self) -> u32 {
        self.protocol.inflight()
    }

    /// HELLO accepted.
    pub fn is_established(&self) -> bool {
        self.protocol.is_established()
    }

    /// Takes at most one protocol event from `input`; false when `input` holds no whole
    /// frame (or the core takes no input).
    pub fn poll_input(&mut self, input: &mut BytesMut, now_ms: i64) -> bool {
        if !self.wants_input() {
            return false;
        }
        match self.protocol.poll_event(input) {
            Ok(None) => false,
            Ok(Some(ServerEvent::Hello(hello))) => {
                self.start_hello(hello, now_ms);
                true
            }
            Ok(Some(ServerEvent::Request(message))) => {
                self.handle_request(message, now_ms);
                true
            }
            Err(error) => {
                self.fail(error.code, error.message);
                false
            }
        }
    }

    /// Handles everything but bytes received.
    pub fn handle(&mut self, event: Event, now_ms: i64) {
        match event {
            Event::Written(Written::Hello { hello, result }) => {
                self.finish_hello(hello, result, now_ms);
            }
            Event::Written(Written::Request { seq, answer }) => self.finish_request(seq, answer),
            Event::Written(Written::SecretConfirmed { error }) => match error {
                None => {
                    if let Some(instrument) = &self.instrument {
                        instrument.enrolling.store(false, Ordering::Release);
                    }
                }
                Some(error) => {
                    tracing::warn!(incubator = %self.name(), %error, "the issued secret could not be confirmed; the next HELLO presenting it confirms it");
                }
            },
            Event::Superseded => self.fail(
                ErrorCode::Superseded,
                "another connection of this instrument said HELLO; this one is closed".into(),
            ),
            Event::StorageClosed | Event::ShutdownDone => self.fail(
                ErrorCode::ShuttingDown,
                "the server is shutting down; reconnect later".into(),
            ),
            Event::Timeout(kind) => {
                let (code, message) = match kind {
                    es_net::TimeoutKind::Handshake => {
                        (ErrorCode::HandshakeTimeout, "no HELLO in time".to_string())
                    }
                    es_net::TimeoutKind::Idle => (
                        ErrorCode::IdleTimeout,
                        "nothing received for too long; send PING when idle".to_string(),
                    ),
                };
                self.fail(code, message);
            }
            Event::Closed { reason } => {
                self.closed = true;
                if let Some(instrument) = &self.instrument {
                    self.shared
                        .registry
                        .remove_if_current(&instrument.serial, self.connection.id);
                    tracing::info!(incubator = %self.name(), %reason, "incubator disconnected");
                }
            }
        }
    }

    fn name(&self) -> String {
        match &self.instrument {
            Some(instrument) => {
                format!("incubator {} ({})", instrument.serial, self.connection.peer)
            }
            None => format!("incubator at {}", self.connection.peer),
        }
    }

    /// Answers and closes: a connection-level error.
    fn fail(&mut self, code: ErrorCode, message: String) {
        if self.closed {
            return;
        }
        if code == ErrorCode::HandshakeTimeout {
            // The event loop logs these, rate-limited (a flood of silent peers).
            tracing::debug!(incubator = %self.name(), code = code.name(), "{message}; closing the connection");
        } else {
            tracing::warn!(incubator = %self.name(), code = code.name(), "{message}; closing the connection");
        }
        let mut out = BytesMut::new();
        error_message(0, code, message.clone()).encode(&mut out);
        self.actions.push_back(Action::Send(out));
        self.actions
            .push_back(Action::Close(format!("{}: {message}", code.name())));
        self.closed = true;
    }

    fn respond(&mut self, message: Message) {
        let mut out = BytesMut::new();
        self.protocol.respond(message, &mut out);
        self.actions.push_back(Action::Send(out));
    }

    fn refuse_hello(&mut self, hello: &pb::Hello, code: ErrorCode, message: String, now_ms: i64) {
        self.shared
            .registry
            .refused(hello, code, self.connection.peer, now_ms);
        self.fail(code, message);
    }

    fn start_hello(&mut self, hello: pb::Hello, now_ms: i64) {
        let mut secret_bytes = [0u8; SECRET_BYTES];
        if !(self.entropy)(&mut secret_bytes) {
            self.fail(
                ErrorCode::InternalError,
                "the server could not generate a secret".into(),
            );
            return;
        }
        // A HELLO the licence has no room for is refused before it changes anything stored;
        // `finish_hello` checks again when it admits the connection.
        let shared = self.shared.clone();
        let capacity = shared.registry.would_admit(&hello.serial_number, |others| {
            capacity_check(&shared.licensing, &hello.model, others, now_ms)
        });
        if let Err(message) = capacity {
            self.refuse_hello(&hello, ErrorCode::CapacityExceeded, message, now_ms);
            return;
        }
        let op = InstrumentHello {
            serial: hello.serial_number.clone(),
            model: hello.model.clone(),
            firmware: hello.firmware_version.clone(),
            presented_secret: (!hello.secret.is_empty()).then(|| hello.secret.clone()),
            new_secret: hex::encode(secret_bytes),
            issued_connection_open: shared.registry.issued_connection_open(&hello.serial_number),
            enrolment: shared.enrolment,
            number: hello.instrument_number,
            at_ms: now_ms,
        };
        self.waiting_for_hello = true;
        self.actions
            .push_back(Action::Write(Write::Hello(op, hello)));
    }

    fn finish_hello(&mut self, hello: pb::Hello, result: OpResult<InstrumentHello>, now_ms: i64) {
        self.waiting_for_hello = false;
        if self.closed {
            return;
        }
        let (instrument_id, issued_secret) = match result {
            Ok(accepted) => (accepted.instrument_id, accepted.issued_secret),
            Err(WriteError::Refused(HelloRefusal::AuthFailed)) => {
                let message = format!(
                    "instrument {} presented a wrong secret; an administrator can reset it with \
                     `esserver instrument reset-secret {}`",
                    hello.serial_number, hello.serial_number
                );
                self.refuse_hello(&hello, ErrorCode::AuthFailed, message, now_ms);
                return;
            }
            Err(WriteError::Refused(HelloRefusal::EnrolmentInProgress)) => {
                let message = format!(
                    "another connection of instrument {} was issued a secret it has not \
                     confirmed yet; nothing was changed; retry once that connection has sent \
                     a request or closed",
                    hello.serial_number
                );
                self.refuse_hello(&hello, ErrorCode::EnrolmentInProgress, message, now_ms);
                return;
            }
            Err(WriteError::Refused(HelloRefusal::EnrolmentPending)) => {
                let message = format!(
                    "instrument {} is not enrolled on this server: it waits until an \
                     administrator approves it (web interface, Instruments page, or \
                     `esserver instrument approve {}`); nothing was stored",
                    hello.serial_number, hello.serial_number
                );
                self.refuse_hello(&hello, ErrorCode::EnrolmentPending, message, now_ms);
                return;
            }
            Err(error) => {
                let code = error_code(&error, |_| ErrorCode::AuthFailed);
                self.fail(code, format!("HELLO refused: {error}"));
                return;
            }
        };
        let enrolling = Arc::new(AtomicBool::new(issued_secret.is_some()));
        self.instrument = Some(Instrument {
            id: instrument_id,
            serial: hello.serial_number.clone(),
            model: hello.model.clone(),
            unconfirmed_secret_sha256: issued_secret
                .as_deref()
                .map(|secret| es_storage::tables::sha256(secret.as_bytes())),
            enrolling: enrolling.clone(),
        });
        let shared = self.shared.clone();
        let admitted = shared.registry.admit(
            Connected {
                connection_id: self.connection.id,
                supersede: self.connection.supersede.clone(),
                serial: hello.serial_number.clone(),
                model: hello.model.clone(),
                firmware: hello.firmware_version.clone(),
                peer: self.connection.peer,
                connected_at_ms: now_ms,
                counters: self.counters.clone(),
                enrolling,
            },
            |others| capacity_check(&shared.licensing, &hello.model, others, now_ms),
        );
        let older = match admitted {
            Ok(older) => older,
            Err(AdmitRefusal::Capacity(message)) => {
                self.instrument = None;
                self.refuse_hello(&hello, ErrorCode::CapacityExceeded, message, now_ms);
                return;
            }
            Err(AdmitRefusal::NewerConnection) => {
                // This HELLO completed after the instrument had reconnected: the newer
                // connection stays, this one is closed as if it had been superseded.
                self.instrument = None;
                self.fail(
                    ErrorCode::Superseded,
                    "a newer connection of this instrument is open; this one is closed".into(),
                );
                return;
            }
        };
        if let Some((older_id, supersede)) = older {
            if older_id != self.connection.id {
                tracing::warn!(incubator = %self.name(),
                    "a second connection of this instrument said HELLO; closing the older one");
                // Never block a loop on another loop's queue; closing is the fallback.
                if !supersede() {
                    tracing::warn!(incubator = %self.name(), "the older connection's loop is busy; it will be closed by its timers");
                }
            }
        }
        let issued = issued_secret.unwrap_or_default();
        tracing::info!(incubator = %self.name(), model = %hello.model, firmware = %hello.firmware_version,
            tls = self.connection.tls, new_secret_issued = !issued.is_empty(), "incubator connected");
        let limits = self.protocol.limits();
        let reply = pb::HelloOk {
            server_id: self.shared.store.server_id(),
            accepted_version: PROTOCOL_VERSION,
            frame_bytes_max: limits.frame_bytes_max,
            inflight_requests_max: limits.inflight_requests_max,
            issued_secret: issued,
            server_clock_ms: now_ms,
        };
        let mut out = BytesMut::new();
        self.protocol.accept_hello(reply, &mut out);
        self.actions.push_back(Action::Send(out));
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
        let Some(secret_sha256) = instrument.unconfirmed_secret_sha256.take() else {
            return;
        };
        let op = ConfirmInstrumentSecret {
            instrument_id: instrument.id,
            secret_sha256,
        };
        self.actions
            .push_back(Action::Write(Write::ConfirmSecret(op)));
    }

    fn handle_request(&mut self, message: Message, now_ms: i64) {
        self.confirm_secret();
        let seq = message.seq();
        if let Err(error) = validate_request(&message) {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(incubator = %self.name(), seq, code = "invalid_field", "request refused: {error}");
            self.respond(error.to_error(seq));
            return;
        }
        let instrument_id = self.instrument_id();
        let at_ms = now_ms;
        let write = match message {
            Message::Image(image) => {
                self.counters
                    .image_bytes
                    .fetch_add(image.jpeg.len() as u64, Ordering::Relaxed);
                Write::Image(
                    seq,
                    PutImage {
                        instrument_id,
                        dish_id: image.dish_id,
                        well: image.well,
                        focal_plane: image.focal_plane,
                        acquired_at_ms: image.acquired_at_ms,
                        jpeg: ImageBytes::new(image.jpeg),
                        at_ms,
                    },
                )
            }
            Message::RegisterDish(dish) => Write::Dish(
                seq,
                RegisterDish {
                    instrument_id,
                    dish: dish_registration(dish),
                    at_ms,
                },
            ),
            Message::Telemetry(telemetry) => Write::Telemetry(
                seq,
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
                        .and_then(|instrument| self.shared.ims.queueing(&instrument.model)),
                    at_ms,
                },
            ),
            Message::SyncState(request) => {
                let reply = self.sync_state(seq, instrument_id, &request.dish_id);
                self.respond(reply);
                return;
            }
            Message::ListPatients(request) => {
                let reply = self.list_patients(seq, &request);
                self.respond(reply);
                return;
            }
            Message::Ping(_) => {
                self.respond(Message::ack(seq, false));
                return;
            }
            other => {
                // The protocol session lets only client requests through.
                self.respond(error_message(
                    seq,
                    ErrorCode::UnexpectedMessage,
                    format!("{:?} is not a request", other.message_type()),
                ));
                return;
            }
        };
        if self.shared.disk.is_low() {
            // Keep the reserve for the database's own pages; the incubator keeps its data.
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "the server's disk is below its free-space reserve ({} MB free); not stored, retry later",
                self.shared.disk.free_bytes() / 1_000_000
            );
            self.respond(error_message(seq, ErrorCode::DiskFull, message));
            return;
        }
        self.actions.push_back(Action::Write(write));
    }

    fn finish_request(&mut self, seq: u64, answer: Answer) {
        if self.closed {
            return;
        }
        let reply = match answer {
            Answer::Image { duplicate } => {
                if duplicate {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.images.fetch_add(1, Ordering::Relaxed);
                }
                Message::ack(seq, duplicate)
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
                Message::ack(seq, duplicate)
            }
            Answer::Dish { changed } => Message::ack(seq, !changed),
            Answer::Refused { code, message } => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(incubator = %self.name(), seq, code = code.name(), "request refused: {message}");
                error_message(seq, code, message)
            }
        };
        self.respond(reply);
    }

    fn sync_state(&self, seq: u64, instrument_id: u64, dish_id: &str) -> Message {
        let state = self
            .shared
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
            .shared
            .store
            .read()
            .and_then(|reader| reader.list_patients(after, limit));
        match patients {
            Err(error) => error_message(seq, ErrorCode::StorageUnavailable, error.to_string()),
            Ok(patients) => {
                let next_after = es_storage::next_page_after(&patients, limit, |p| &p.patient_id);
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
    now_ms: i64,
) -> Result<(), String> {
    use es_perf::catalog::DeviceModel;
    use es_perf::config_rules;
    let Ok(license) = licensing.current(now_ms) else {
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
