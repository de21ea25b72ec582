//! The viewer session's core: the protocol logic of one viewer connection, with its
//! environment injected. It owns no socket, no clock, no worker pool and no random source:
//! it calls them through [`Io`], which es-net's adapter ([`super::ViewerSession`]) implements
//! over a live connection and the deterministic simulation implements over a byte pipe, a
//! simulated clock and jobs it runs itself.
//!
//! Why an `Io` and not a list of returned actions (as `crate::incubator::core` does): the
//! viewer's decisions need answers only the environment has at once: whether a worker took
//! a job (else the request is answered `busy` now), how much output waits unsent (pushes and
//! playbacks pause above their marks). The storage writer is called directly (it is the
//! real one in the simulation too); its completions come back through [`Io::deliver`].
//!
//! # Contract
//!
//! - Every job handed to [`Io::run`] comes back exactly once as a [`ViewerMsg`] given to
//!   [`ViewerCore::on_message`] (its result, or the fallback if it panicked).
//! - Every completion handed to [`Io::deliver`] likewise, once the write is durable or
//!   refused.
//! - The core says what it owes the peer ([`Io::owe`], [`Io::answered`]) and when to read
//!   ([`Io::pause_reading`], [`Io::resume_reading`]); the environment keeps the rest of the
//!   connection's lifecycle.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::{
    error_message, request_name, ErrorCode, ServerEvent, ServerSession, FRAMES_MAX,
    PATIENT_PAGE_DEFAULT, PATIENT_PAGE_MAX,
};
use es_storage::{
    Actor, AdminRefusal, ClinicalEdit, Current, Edit, EditRefusal, FrameChunk, LoginAttempt,
    OpResult, Rights, StorageError, Store, SubmitError, WriteError,
};

use super::auth::{self, Notice, Peer, Resumed, SessionEntry};
use super::{convert, Shared, ViewerMsg, ViewerSnapshot, CHUNK_FRAMES};
use crate::accounts::{
    audit_unknown_user, check_password, LoginCheck, LOGIN_REFUSED, PASSWORD_BYTES_MAX,
};
use crate::edits::{self, Editor, Grant};
use crate::Entropy;
use es_net::{Pump, TimeoutKind, STREAM_OUTPUT_HIGH_BYTES};

/// Change notices are pushed only while less than this is waiting to be sent (else at the
/// next tick: a viewer that does not read cannot make the server buffer without bound).
const PUSH_OUTPUT_HIGH_BYTES: usize = 1024 * 1024;
/// Change-log entries read per push round.
const PUSH_CHANGES_PER_READ: u32 = 256;

/// Work for a worker thread (a password check, a read); its message answers it.
pub type Job = Box<dyn FnOnce() -> ViewerMsg + Send>;

/// Hands a message to the connection from another thread (a storage completion).
pub type Deliver = Arc<dyn Fn(ViewerMsg) + Send + Sync>;

/// What the core needs of its connection and of the server around it.
pub trait Io {
    /// Bytes for the peer, in order.
    fn write(&mut self, bytes: &[u8]);
    /// Closes the connection after what was written (`reason` for the log).
    fn close(&mut self, reason: String);
    /// True once a close was asked (by the core, the peer or the server).
    fn is_closing(&self) -> bool;
    /// True while the server shuts down: take no new requests.
    fn is_stopping(&self) -> bool;
    /// One more answer is owed to the peer (a job, a write, a playback).
    fn owe(&mut self);
    /// An owed answer was given.
    fn answered(&mut self);
    /// True while answers are owed.
    fn owes(&self) -> bool;
    /// Bytes written and not yet taken by the peer.
    fn pending_output_bytes(&self) -> usize;
    fn pause_reading(&mut self);
    fn resume_reading(&mut self);
    fn is_reading_paused(&self) -> bool;
    /// Now, for durations (session resume windows).
    fn now(&self) -> Instant;
    /// Now, as Unix milliseconds (what is stored and shown).
    fn now_ms(&self) -> i64;
    /// Runs `job` off the connection's thread; its message (or `fallback` if it panics)
    /// comes back to [`ViewerCore::on_message`]. False, and nothing queued, when no worker
    /// can take it now.
    fn run(&mut self, job: Job, fallback: ViewerMsg) -> bool;
    /// How a storage completion reaches this connection.
    fn deliver(&self) -> Deliver;
}

/// Who is logged in on a connection.
struct LoggedIn {
    token: String,
    user: String,
    computer: String,
    rights: Rights,
}

struct Playback {
    seq: u64,
    embryo_id: String,
    focal_plane: i32,
    next_from_ms: i64,
    to_ms: i64,
    remaining: u32,
    index: u32,
    /// At most one chunk in production, none while the output is above the high-water mark.
    pump: Pump,
    cancelled: bool,
}

pub struct ViewerCore {
    protocol: ServerSession,
    shared: Arc<Shared>,
    /// This connection as the session and wake-up registries know it.
    me: Peer,
    entropy: Entropy,
    peer: SocketAddr,
    login: Option<LoggedIn>,
    /// The seq of the last change notice pushed.
    cursor: u64,
    wake_pending: Arc<AtomicBool>,
    /// Each one is an answer owed to the peer (`SessionIo::owe`) until it ends.
    playbacks: Vec<Playback>,
}

impl ViewerCore {
    pub(crate) fn new(shared: Arc<Shared>, me: Peer, peer: SocketAddr, entropy: Entropy) -> Self {
        ViewerCore {
            protocol: ServerSession::new(shared.settings.limits),
            shared,
            me,
            entropy,
            peer,
            login: None,
            cursor: 0,
            wake_pending: Arc::new(AtomicBool::new(false)),
            playbacks: Vec::new(),
        }
    }

    fn name(&self) -> String {
        match &self.login {
            Some(login) => format!("viewer {}@{} ({})", login.user, login.computer, self.peer),
            None => format!("viewer at {}", self.peer),
        }
    }

    fn respond(&mut self, seq: u64, body: Body, io: &mut dyn Io) {
        if !self.protocol.is_inflight(seq) {
            return; // Already ended (a cancelled playback, for example).
        }
        let mut out = BytesMut::new();
        self.protocol.respond(seq, body, &mut out);
        io.write(&out);
    }

    fn respond_error(&mut self, seq: u64, code: ErrorCode, message: String, io: &mut dyn Io) {
        let Some(Body::Error(error)) = error_message(seq, code, message).body else {
            unreachable!("error_message builds an Error");
        };
        self.respond(seq, Body::Error(error), io);
    }

    fn fail(&mut self, code: ErrorCode, message: String, io: &mut dyn Io) {
        if code == ErrorCode::HandshakeTimeout {
            // The event loop logs these, rate-limited (a flood of silent peers).
            tracing::debug!(viewer = %self.name(), code = code.name(), "{message}; closing the connection");
        } else {
            tracing::warn!(viewer = %self.name(), code = code.name(), "{message}; closing the connection");
        }
        let mut out = BytesMut::new();
        self.protocol
            .close_with_error(code, message.clone(), &mut out);
        io.write(&out);
        io.close(format!("{}: {message}", code.name()));
    }

    fn refuse_login(&mut self, code: ErrorCode, message: String, io: &mut dyn Io) {
        let mut out = BytesMut::new();
        self.protocol.refuse_login(code, message.clone(), &mut out);
        io.write(&out);
        io.close(format!("{}: {message}", code.name()));
    }

    fn update_reading(&mut self, io: &mut dyn Io) {
        // While the peer has not taken what it was sent, take no new requests from it.
        let hold = self.protocol.at_inflight_limit()
            || io.is_stopping()
            || (self.login.is_none() && io.owes())
            || io.pending_output_bytes() >= STREAM_OUTPUT_HIGH_BYTES;
        if hold {
            io.pause_reading();
        } else {
            io.resume_reading();
        }
    }

    /// Runs `job` on a worker, whose message answers it (`fallback` if the job panics);
    /// false (and nothing queued) when the pool is full.
    fn run_job(&mut self, job: Job, fallback: ViewerMsg, io: &mut dyn Io) -> bool {
        if io.run(job, fallback) {
            io.owe();
            true
        } else {
            false
        }
    }

    // ------------------------------------------------------------ login

    /// The licence refuses this computer: (code, message), or None when it may connect.
    fn license_check(&self, computer: &str, now_ms: i64) -> Option<(ErrorCode, String)> {
        let license = match self.shared.licensing.current(now_ms) {
            Ok(license) => license,
            Err(error) => {
                let message = format!(
                    "licence invalid: {error}; an administrator must install a valid licence"
                );
                return Some((ErrorCode::LicenseInvalid, message));
            }
        };
        let connected = self.shared.sessions.connected_computers(self.me.id);
        crate::license::allow_computer(&license, computer, &connected)
            .err()
            .map(|message| (ErrorCode::ComputerNotLicensed, message))
    }

    fn start_login(&mut self, seq: u64, login: pb::Login, io: &mut dyn Io) {
        if let Some((code, message)) = self.license_check(&login.computer, io.now_ms()) {
            tracing::warn!(peer = %self.peer, computer = %login.computer, code = code.name(), "login refused: {message}");
            self.refuse_login(code, message, io);
            return;
        }
        if let Err(message) = check_login_fields(&login) {
            tracing::warn!(viewer = %self.name(), code = "invalid_field", "login refused: {message}");
            self.refuse_login(ErrorCode::InvalidField, message, io);
            return;
        }
        let store = self.shared.store.clone();
        let address = self.peer.ip().to_string();
        let fallback = ViewerMsg::LoginChecked {
            seq,
            user: login.user.clone(),
            computer: login.computer.clone(),
            changes_after: 0,
            check: LoginCheck::Unavailable("internal error while checking".into()),
        };
        let job = Box::new(move || {
            let (user, check) = check_password(&store, &login.user, &login.password, &address);
            ViewerMsg::LoginChecked {
                seq,
                user,
                computer: login.computer,
                changes_after: login.changes_after,
                check,
            }
        });
        if !self.run_job(job, fallback, io) {
            self.refuse_login(
                ErrorCode::Busy,
                "the server is busy; log in again in a moment".into(),
                io,
            );
        }
    }

    fn login_checked(
        &mut self,
        seq: u64,
        user: String,
        computer: String,
        changes_after: u64,
        check: LoginCheck,
        io: &mut dyn Io,
    ) {
        // Wrong passwords, disabled and locked accounts are recorded (and refused) by the
        // storage writer, which checks the lock and the disable again in its transaction.
        let success = match check {
            LoginCheck::Correct { .. } => true,
            LoginCheck::Wrong | LoginCheck::Disabled | LoginCheck::Locked { .. } => false,
            LoginCheck::UnknownUser => {
                tracing::warn!(%user, %computer, peer = %self.peer, code = "auth_failed", "login refused: unknown user");
                audit_unknown_user(&self.shared.writer, &user, &computer);
                self.refuse_login(ErrorCode::AuthFailed, LOGIN_REFUSED.into(), io);
                return;
            }
            LoginCheck::Unavailable(detail) => {
                tracing::error!(%user, "login check failed: {detail}");
                self.refuse_login(
                    ErrorCode::StorageUnavailable,
                    format!("cannot check the login: {detail}"),
                    io,
                );
                return;
            }
        };
        let rights = match check {
            LoginCheck::Correct { rights } => rights,
            _ => Rights::View,
        };
        let op = LoginAttempt {
            name: user.clone(),
            computer: computer.clone(),
            address: self.peer.ip().to_string(),
            success,
            failures_max: self.shared.settings.login_failures_max,
            lockout_ms: self.shared.settings.lockout_ms,
            at_ms: io.now_ms(),
        };
        let deliver = io.deliver();
        let done = move |result| {
            deliver(ViewerMsg::LoginRecorded {
                seq,
                user,
                computer,
                rights,
                changes_after,
                success,
                result,
            });
        };
        match self.shared.writer.try_submit(op, done) {
            Ok(()) => io.owe(),
            Err(SubmitError::Full(..)) => self.refuse_login(
                ErrorCode::Busy,
                "the server is busy; log in again in a moment".into(),
                io,
            ),
            Err(SubmitError::Closed(..)) => self.refuse_login(
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
                io,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn login_recorded(
        &mut self,
        _seq: u64,
        user: String,
        computer: String,
        rights: Rights,
        changes_after: u64,
        success: bool,
        result: OpResult<LoginAttempt>,
        io: &mut dyn Io,
    ) {
        let (granted, disabled, locked_until_ms) = match result {
            Ok(recorded) => (
                recorded.granted,
                recorded.disabled,
                recorded.locked_until_ms,
            ),
            Err(error) => {
                let code = write_error_code(&error, admin_refusal_code);
                self.refuse_login(code, format!("cannot record the login: {error}"), io);
                return;
            }
        };
        if !granted {
            // One answer whatever the reason, so a login cannot tell which accounts exist or
            // are locked; the log and the audit trail keep the reason.
            let reason = if disabled {
                "account disabled"
            } else if locked_until_ms > 0 {
                "account locked for this address"
            } else {
                "wrong password"
            };
            tracing::warn!(%user, %computer, peer = %self.peer, code = "auth_failed", reason, locked_until_ms, password_right = success, "login refused");
            self.refuse_login(ErrorCode::AuthFailed, LOGIN_REFUSED.into(), io);
            return;
        }
        // Checked again now that the password is right: another computer may have connected
        // meanwhile.
        if let Some((code, message)) = self.license_check(&computer, io.now_ms()) {
            tracing::warn!(%user, %computer, peer = %self.peer, code = code.name(), "login refused: {message}");
            self.refuse_login(code, message, io);
            return;
        }
        let Some(token) = auth::new_token(&mut self.entropy) else {
            self.refuse_login(
                ErrorCode::InternalError,
                "no randomness for a session token".into(),
                io,
            );
            return;
        };
        let entry = SessionEntry {
            user: user.clone(),
            rights,
            computer: computer.clone(),
            connection: Some(self.me.clone()),
            disconnected_at: None,
        };
        if self
            .shared
            .sessions
            .add(token.clone(), entry, io.now())
            .is_none()
        {
            self.refuse_login(
                ErrorCode::Busy,
                "too many viewer sessions are open".into(),
                io,
            );
            return;
        }
        tracing::info!(%user, %computer, peer = %self.peer, rights = rights.as_str(), "viewer logged in");
        self.establish(
            token,
            user,
            computer,
            rights,
            PushStart::Login(changes_after),
            io,
        );
    }

    fn start_resume(&mut self, resume: pb::Resume, io: &mut dyn Io) {
        if let Err(error) = self.shared.licensing.current(io.now_ms()) {
            let message =
                format!("licence invalid: {error}; an administrator must install a valid licence");
            tracing::warn!(peer = %self.peer, code = "license_invalid", "resume refused: {message}");
            self.refuse_login(ErrorCode::LicenseInvalid, message, io);
            return;
        }
        let found = self
            .shared
            .sessions
            .resume(&resume.session_token, self.me.clone(), io.now());
        let Resumed::Ok {
            user,
            rights: _,
            computer,
            previous,
        } = found
        else {
            tracing::warn!(peer = %self.peer, code = "session_expired", "resume refused");
            let message = "the session is unknown or expired; log in again".to_string();
            self.refuse_login(ErrorCode::SessionExpired, message, io);
            return;
        };
        if let Some(previous) = previous.filter(|p| p.id != self.me.id) {
            previous.notify(Notice::Superseded);
        }
        // The account as it is now: a disabled or removed account cannot resume, and changed
        // rights apply from this connection on.
        let current = self
            .shared
            .store
            .read()
            .and_then(|reader| reader.user(&user));
        let rights = match current {
            Ok(Some(record)) if !record.disabled => record.rights,
            Ok(_) => {
                self.shared.sessions.remove(&resume.session_token);
                tracing::warn!(%user, peer = %self.peer, code = "account_disabled", "resume refused");
                let message =
                    format!("the account {user} is disabled or removed; ask an administrator");
                self.refuse_login(ErrorCode::AccountDisabled, message, io);
                return;
            }
            Err(error) => {
                self.refuse_login(ErrorCode::StorageUnavailable, error.to_string(), io);
                return;
            }
        };

        tracing::info!(%user, %computer, peer = %self.peer, "viewer session resumed");
        self.establish(
            resume.session_token,
            user,
            computer,
            rights,
            PushStart::Resume(resume.changes_after),
            io,
        );
    }

    fn establish(
        &mut self,
        token: String,
        user: String,
        computer: String,
        rights: Rights,
        start: PushStart,
        io: &mut dyn Io,
    ) {
        let (cursor, last, resync) = match start_cursor(&self.shared.store, start) {
            Ok(found) => found,
            Err(error) => {
                self.shared.sessions.remove(&token);
                self.refuse_login(ErrorCode::StorageUnavailable, error.to_string(), io);
                return;
            }
        };
        self.cursor = cursor;
        let reply = pb::LoginOk {
            session_token: token.clone(),
            user: user.clone(),
            rights: rights.as_str().to_string(),
            server_id: self.shared.store.server_id(),
            resume_seconds: u32::try_from(self.shared.sessions.resume_duration().as_secs())
                .unwrap_or(u32::MAX),
            last_change_seq: last,
            resync_required: resync,
            server_clock_ms: io.now_ms(),
            ..Default::default()
        };
        let mut out = BytesMut::new();
        self.protocol.accept_login(reply, &mut out);
        io.write(&out);
        let who = ViewerSnapshot {
            user: user.clone(),
            computer: computer.clone(),
            peer: self.peer.to_string(),
            since_ms: io.now_ms(),
        };
        self.login = Some(LoggedIn {
            token,
            user,
            computer,
            rights,
        });
        self.shared
            .hub
            .join(self.me.clone(), self.wake_pending.clone(), who);
        self.push_changes(io);
    }

    // ------------------------------------------------------------ requests

    fn handle_request(&mut self, seq: u64, request: Request, io: &mut dyn Io) {
        let request = match convert::edit(request) {
            Ok(edit) => {
                self.start_write(seq, edit, io);
                return;
            }
            Err(request) => request,
        };
        match request {
            Request::Ping(_) => self.respond(seq, Body::Done(pb::Done {}), io),
            Request::Logout(_) => {
                if let Some(login) = &self.login {
                    self.shared.sessions.remove(&login.token);
                    tracing::info!(viewer = %self.name(), "viewer logged out");
                }
                self.respond(seq, Body::Done(pb::Done {}), io);
                io.close("logged out".into());
            }
            Request::Playback(playback) => self.start_playback(seq, playback, io),
            Request::CancelPlayback(cancel) => self.cancel_playback(seq, cancel.playback_seq, io),
            Request::GetActivity(get) => self.start_activity(seq, get.embryo_id, io),
            Request::ImportModel(import) => self.start_import(seq, import.document, io),
            read => self.start_read(seq, read, io),
        }
    }

    /// Runs `work` on a worker; answers `busy` when no worker takes it.
    fn start_job(
        &mut self,
        seq: u64,
        work: impl FnOnce() -> Body + Send + 'static,
        io: &mut dyn Io,
    ) {
        let body = error_body(
            seq,
            ErrorCode::InternalError,
            "internal error while answering".into(),
        );
        let fallback = ViewerMsg::Reply { seq, body };
        let job = Box::new(move || ViewerMsg::Reply { seq, body: work() });
        if !self.run_job(job, fallback, io) {
            self.respond_error(
                seq,
                ErrorCode::Busy,
                "the server is busy; retry in a moment".into(),
                io,
            );
        }
    }

    /// The embryo's activity curve: the stored one, or computed on a worker
    /// (`crate::activity::curve`).
    fn start_activity(&mut self, seq: u64, embryo_id: String, io: &mut dyn Io) {
        if embryo_id.is_empty() || embryo_id.len() > 128 {
            self.respond_error(
                seq,
                ErrorCode::InvalidField,
                "embryo_id must have 1 to 128 bytes".into(),
                io,
            );
            return;
        }
        let store = self.shared.store.clone();
        let background = self.shared.settings.activity_background;
        self.start_job(
            seq,
            move || match crate::activity::curve(&store, &embryo_id, background) {
                Ok(Some(curve)) => Body::Activity(convert::activity(embryo_id, curve)),
                Ok(None) => not_found(format!("embryo {embryo_id}")),
                Err(crate::activity::CurveError::Busy) => error_body(
                    0,
                    ErrorCode::Busy,
                    "another activity curve is being computed; retry in a moment".into(),
                ),
                Err(crate::activity::CurveError::Storage(error)) => {
                    error_body(0, storage_error_code(&error), error.to_string())
                }
            },
            io,
        );
    }

    /// A model document imported through the one import path ([`crate::edits::import_model`]:
    /// edit rights, audited), on a worker: it waits until the import is durable.
    /// The document is read on the worker, after the rights check: a refused user learns
    /// nothing of it, and the loop never parses 256 KiB of JSON.
    fn start_import(&mut self, seq: u64, document: String, io: &mut dyn Io) {
        let login = self.login.as_ref().expect("requests come after login");
        let editor = Editor {
            actor: Actor {
                user: login.user.clone(),
                computer: login.computer.clone(),
            },
            grant: Grant::User(login.rights),
        };
        let (writer, disk) = (self.shared.writer.clone(), self.shared.disk.clone());
        self.start_job(
            seq,
            move || match edits::import_model(&writer, &disk, &editor, document) {
                Ok(Ok(done)) => Body::ModelImported(pb::ModelImported {
                    name: done.name,
                    version: done.version,
                    created: done.created,
                }),
                Ok(Err(error)) => {
                    let code = write_error_code(&error, |never| match *never {});
                    error_body(0, code, error.to_string())
                }
                Err(refused) => error_body(0, refused_code(&refused), refused.message()),
            },
            io,
        );
    }

    fn start_read(&mut self, seq: u64, request: Request, io: &mut dyn Io) {
        let store = self.shared.store.clone();
        self.start_job(seq, move || read(&store, request), io);
    }

    /// An edit through the one edit path ([`crate::edits`]): rights (audited), disk, storage.
    fn start_write(&mut self, seq: u64, edit: Result<ClinicalEdit, String>, io: &mut dyn Io) {
        let login = self.login.as_ref().expect("requests come after login");
        let editor = Editor {
            actor: Actor {
                user: login.user.clone(),
                computer: login.computer.clone(),
            },
            grant: Grant::User(login.rights),
        };
        let edit = match edit {
            Ok(edit) => edit,
            Err(message) => {
                self.respond_error(seq, ErrorCode::InvalidField, message, io);
                return;
            }
        };
        let deliver = io.deliver();
        let done = move |result| {
            deliver(ViewerMsg::Saved { seq, result });
        };
        let writer = &self.shared.writer;
        let at_ms = io.now_ms();
        match edits::submit(writer, &self.shared.disk, &editor, edit, None, at_ms, done) {
            Ok(()) => io.owe(),
            Err(refused) => {
                self.respond_error(seq, refused_code(&refused), refused.message(), io);
            }
        }
    }

    fn saved(&mut self, seq: u64, result: OpResult<Edit>, io: &mut dyn Io) {
        let body = match result {
            Ok(edited) => Body::Saved(pb::Saved {
                entity: edited.entity.as_str().to_string(),
                id: edited.id,
                version: edited.version,
                change_seq: edited.change_seq,
                annotation_id: edited.annotation_id.unwrap_or(0),
            }),
            Err(WriteError::Refused(EditRefusal::Stale(stale))) => {
                let (expected, version) = (stale.expected, stale.version);
                tracing::info!(viewer = %self.name(), seq, expected, version, code = "conflict", "write refused: stale version");
                Body::Error(pb::Error {
                    code: ErrorCode::Conflict.code(),
                    name: ErrorCode::Conflict.name().to_string(),
                    message: format!(
                        "changed by someone else since version {expected}; now at version {version}: \
                         reload, check the current value and save again"
                    ),
                    current_version: stale.current.as_ref().map_or(version, Current::version),
                    current_json: convert::current_json(stale.current.as_ref()),
                })
            }
            Err(error) => {
                let code = write_error_code(&error, edit_refusal_code);
                tracing::warn!(viewer = %self.name(), seq, code = code.name(), "write refused: {error}");
                error_body(seq, code, error.to_string())
            }
        };
        self.respond(seq, body, io);
    }

    // ------------------------------------------------------------ playback

    fn start_playback(&mut self, seq: u64, request: pb::Playback, io: &mut dyn Io) {
        if request.embryo_id.is_empty() || request.embryo_id.len() > 128 {
            self.respond_error(
                seq,
                ErrorCode::InvalidField,
                "embryo_id must have 1 to 128 bytes".into(),
                io,
            );
            return;
        }
        let max_frames = match request.max_frames {
            0 => FRAMES_MAX,
            n => n.min(FRAMES_MAX),
        };
        let to_ms = if request.to_ms == 0 {
            i64::MAX
        } else {
            request.to_ms
        };
        // The playback is owed until its last chunk or its error is sent.
        io.owe();
        self.playbacks.push(Playback {
            seq,
            embryo_id: request.embryo_id,
            focal_plane: request.focal_plane,
            next_from_ms: request.from_ms,
            to_ms,
            remaining: max_frames,
            index: 0,
            pump: Pump::default(),
            cancelled: false,
        });
        self.pump_playbacks(io);
    }

    /// Queues the next chunk of every playback that has none queued, while the output is
    /// below the high-water mark.
    fn pump_playbacks(&mut self, io: &mut dyn Io) {
        for index in 0..self.playbacks.len() {
            if io.is_closing() {
                return;
            }
            let playback = &mut self.playbacks[index];
            if playback.cancelled || !playback.pump.start(io.pending_output_bytes()) {
                continue;
            }
            let (seq, embryo_id, plane, from, to) = (
                playback.seq,
                playback.embryo_id.clone(),
                playback.focal_plane,
                playback.next_from_ms,
                playback.to_ms,
            );
            let count = playback.remaining.min(CHUNK_FRAMES);
            let store = self.shared.store.clone();
            let failed = Err(StorageError::Corrupt(
                "internal error while reading frames".into(),
            ));
            let fallback = ViewerMsg::Frames {
                seq,
                result: failed,
            };
            let job = Box::new(move || {
                let result = es_storage::guarded("playback frames", || {
                    store
                        .read()
                        .and_then(|reader| reader.frames(&embryo_id, plane, from, to, count))
                });
                ViewerMsg::Frames { seq, result }
            });
            if !self.run_job(job, fallback, io) {
                // The pool is full: the next tick tries again.
                self.playbacks[index].pump.cancel();
                return;
            }
        }
    }

    fn frames_read(
        &mut self,
        seq: u64,
        result: Result<Option<FrameChunk>, StorageError>,
        io: &mut dyn Io,
    ) {
        let Some(position) = self.playbacks.iter().position(|p| p.seq == seq) else {
            return;
        };
        self.playbacks[position].pump.produced();
        if self.playbacks[position].cancelled {
            self.end_playback(position, io);
            self.respond_error(
                seq,
                ErrorCode::Cancelled,
                "the playback was cancelled".into(),
                io,
            );
            return;
        }
        let (frames, damaged) = match result {
            // Frames before a damaged one are played; the damaged one ends the playback.
            Ok(Some(FrameChunk { frames, damaged })) => (frames, damaged),
            Ok(None) => {
                let embryo_id = self.end_playback(position, io).embryo_id;
                self.respond_error(
                    seq,
                    ErrorCode::NotFound,
                    format!("embryo {embryo_id} is not known"),
                    io,
                );
                return;
            }
            Err(error) => {
                self.end_playback(position, io);
                let code = storage_error_code(&error);
                self.respond_error(seq, code, error.to_string(), io);
                return;
            }
        };
        let asked = self.playbacks[position].remaining.min(CHUNK_FRAMES);
        let count = u32::try_from(frames.len()).unwrap_or(u32::MAX);
        let playback = &mut self.playbacks[position];
        playback.remaining = playback.remaining.saturating_sub(count);
        let finished = damaged.is_none() && (count < asked || playback.remaining == 0);
        if let Some(last) = frames.last() {
            playback.next_from_ms = last.acquired_at_ms.saturating_add(1);
        }
        let embryo_id = playback.embryo_id.clone();
        let first_index = playback.index;
        playback.index += count;
        if finished {
            self.end_playback(position, io);
        }
        let mut out = BytesMut::new();
        for (offset, frame) in (0u32..).zip(frames) {
            let last = finished && offset + 1 == count;
            let body = Body::Frame(pb::Frame {
                image: Some(convert::image(&embryo_id, frame)),
                index: first_index + offset,
                last,
            });
            self.protocol.respond(seq, body, &mut out);
        }
        if finished && count == 0 {
            let end = Body::Frame(pb::Frame {
                image: None,
                index: first_index,
                last: true,
            });
            self.protocol.respond(seq, end, &mut out);
        }
        io.write(&out);
        if let Some(damage) = damaged {
            if let Some(position) = self.playbacks.iter().position(|p| p.seq == seq) {
                self.end_playback(position, io);
            }
            let code = storage_error_code(&damage);
            self.respond_error(seq, code, damage.to_string(), io);
        }
        self.pump_playbacks(io);
    }

    fn cancel_playback(&mut self, seq: u64, playback_seq: u64, io: &mut dyn Io) {
        let Some(position) = self.playbacks.iter().position(|p| p.seq == playback_seq) else {
            let message = format!("no playback with seq {playback_seq} is running");
            self.respond_error(seq, ErrorCode::NotFound, message, io);
            return;
        };
        self.respond(seq, Body::Done(pb::Done {}), io);
        if self.playbacks[position].pump.is_producing() {
            self.playbacks[position].cancelled = true; // Answered when its chunk returns.
        } else {
            self.end_playback(position, io);
            self.respond_error(
                playback_seq,
                ErrorCode::Cancelled,
                "the playback was cancelled".into(),
                io,
            );
        }
    }

    // ------------------------------------------------------------ pushes

    /// Pushes committed changes after the cursor, while the output has room.
    fn push_changes(&mut self, io: &mut dyn Io) {
        self.wake_pending.store(false, Ordering::Release);
        if self.login.is_none() || io.is_closing() {
            return;
        }
        for _ in 0..4 {
            let committed = self.shared.hub.committed_seq();
            if self.cursor >= committed || io.pending_output_bytes() >= PUSH_OUTPUT_HIGH_BYTES {
                return;
            }
            let changes = self
                .shared
                .store
                .read()
                .and_then(|reader| reader.changes_after(self.cursor, PUSH_CHANGES_PER_READ));
            let changes = match changes {
                Ok(changes) => changes,
                Err(StorageError::CursorExpired { oldest }) => {
                    // Never skip notices silently: the viewer resumes and is told to reload.
                    let message = format!(
                        "change notices after {} were pruned (the oldest kept is {oldest}) before \
                         they could be sent; resume to resynchronise",
                        self.cursor
                    );
                    self.fail(ErrorCode::CursorExpired, message, io);
                    return;
                }
                Err(error) => {
                    tracing::error!(viewer = %self.name(), "cannot read the change log: {error}");
                    return;
                }
            };
            if changes.is_empty() {
                return;
            }
            let mut out = BytesMut::new();
            for change in changes {
                self.cursor = change.seq;
                let notice = pb::ChangeNotice {
                    change_seq: change.seq,
                    entity: change.entity.as_str().to_string(),
                    id: change.id,
                    version: change.version,
                    at_ms: change.at_ms,
                    summary: change.summary,
                };
                self.protocol.push(notice, &mut out);
            }
            io.write(&out);
        }
    }

    /// A playback ended (its last chunk or its error was sent, or it was cancelled).
    fn end_playback(&mut self, position: usize, io: &mut dyn Io) -> Playback {
        io.answered();
        self.playbacks.remove(position)
    }
}

/// The connection's events: es-net's callbacks through the adapter, or the simulation's.
impl ViewerCore {
    /// Bytes received: takes the requests while reading is allowed.
    pub fn on_input(&mut self, input: &mut BytesMut, io: &mut dyn Io) {
        while !io.is_reading_paused() && !io.is_closing() {
            match self.protocol.poll_event(input) {
                Ok(None) => break,
                Ok(Some(ServerEvent::Login(seq, login))) => self.start_login(seq, login, io),
                Ok(Some(ServerEvent::Resume(_, resume))) => self.start_resume(resume, io),
                Ok(Some(ServerEvent::Request(seq, request))) => {
                    self.handle_request(seq, request, io)
                }
                Err(error) => {
                    self.fail(error.code, error.message, io);
                    break;
                }
            }
            self.update_reading(io);
        }
    }

    pub fn on_message(&mut self, message: ViewerMsg, io: &mut dyn Io) {
        match message {
            ViewerMsg::LoginChecked {
                seq,
                user,
                computer,
                changes_after,
                check,
            } => {
                io.answered();
                self.login_checked(seq, user, computer, changes_after, check, io);
            }
            ViewerMsg::LoginRecorded {
                seq,
                user,
                computer,
                rights,
                changes_after,
                success,
                result,
            } => {
                io.answered();
                self.login_recorded(
                    seq,
                    user,
                    computer,
                    rights,
                    changes_after,
                    success,
                    result,
                    io,
                );
            }
            ViewerMsg::Reply { seq, body } => {
                io.answered();
                self.respond(seq, body, io);
            }
            ViewerMsg::Saved { seq, result } => {
                io.answered();
                self.saved(seq, result, io);
            }
            ViewerMsg::Frames { seq, result } => {
                io.answered();
                self.frames_read(seq, result, io);
            }
            ViewerMsg::ChangesCommitted => {
                self.push_changes(io);
                return;
            }
            ViewerMsg::Superseded => {
                self.fail(
                    ErrorCode::Superseded,
                    "the session was resumed on another connection".into(),
                    io,
                );
                return;
            }
            ViewerMsg::AccountDisabled => {
                if let Some(login) = &self.login {
                    self.shared.sessions.remove(&login.token);
                }
                self.fail(
                    ErrorCode::AccountDisabled,
                    "an administrator disabled this account".into(),
                    io,
                );
                return;
            }
        }
        self.update_reading(io);
    }

    pub fn on_output_drained(&mut self, io: &mut dyn Io) {
        self.pump_playbacks(io);
        self.push_changes(io);
        self.update_reading(io);
    }

    pub fn on_tick(&mut self, io: &mut dyn Io) {
        self.pump_playbacks(io);
        self.push_changes(io);
        self.update_reading(io);
    }

    pub fn on_timeout(&mut self, kind: TimeoutKind, io: &mut dyn Io) {
        let (code, message) = match kind {
            TimeoutKind::Handshake => (ErrorCode::HandshakeTimeout, "no Login or Resume in time"),
            TimeoutKind::Idle => (
                ErrorCode::IdleTimeout,
                "nothing received for too long; send Ping when idle",
            ),
        };
        self.fail(code, message.to_string(), io);
    }

    pub fn on_shutdown(&mut self, _io: &mut dyn Io) {
        // Playbacks end after the chunk being read.
        for playback in &mut self.playbacks {
            playback.remaining = 0;
        }
    }

    pub fn on_shutdown_done(&mut self, io: &mut dyn Io) {
        self.fail(
            ErrorCode::ShuttingDown,
            "the server is shutting down; resume later".into(),
            io,
        );
    }

    pub fn on_closed(&mut self, reason: &str, now: Instant) {
        self.shared.hub.leave(self.me.id);
        if let Some(login) = &self.login {
            self.shared.sessions.detach(&login.token, self.me.id, now);
            tracing::info!(viewer = %self.name(), %reason, "viewer disconnected");
        }
    }

    pub fn is_established(&self) -> bool {
        self.protocol.is_established()
    }
}

fn check_login_fields(login: &pb::Login) -> Result<(), String> {
    es_storage::user_name(&login.user).map_err(|error| error.to_string())?;
    if login.password.is_empty() || login.password.len() > PASSWORD_BYTES_MAX {
        return Err(format!(
            "the password must have 1 to {} bytes",
            PASSWORD_BYTES_MAX
        ));
    }
    if login.computer.is_empty() || login.computer.len() > 128 || login.client.len() > 128 {
        return Err(
            "the computer name must have 1 to 128 bytes, the client name at most 128".into(),
        );
    }
    Ok(())
}

/// The `changes_after` of a Login or of a Resume (they read 0 differently).
#[derive(Debug, Clone, Copy)]
enum PushStart {
    Login(u64),
    Resume(u64),
}

/// Where pushes start: (cursor, newest seq, resync needed). At a login, `changes_after` 0
/// means "from now on"; at a resume it means what it says, every change after seq 0, so a
/// viewer that logged in while the change log was empty and saw no notice before its
/// connection dropped misses nothing.
fn start_cursor(store: &Store, start: PushStart) -> Result<(u64, u64, bool), StorageError> {
    let reader = store.read()?;
    let last = reader.last_change_seq()?;
    let changes_after = match start {
        PushStart::Login(0) => return Ok((last, last, false)),
        PushStart::Login(after) | PushStart::Resume(after) => after,
    };
    match reader.changes_after(changes_after, 0) {
        Ok(_) => Ok((changes_after, last, false)),
        Err(StorageError::CursorExpired { .. }) => Ok((last, last, true)),
        Err(error) => Err(error),
    }
}

fn error_body(seq: u64, code: ErrorCode, message: String) -> Body {
    error_message(seq, code, message)
        .body
        .expect("error_message has a body")
}

fn not_found(what: String) -> Body {
    error_body(0, ErrorCode::NotFound, format!("{what} is not known"))
}

/// Runs on a worker: answers a read request.
fn read(store: &Store, request: Request) -> Body {
    let reader = match store.read() {
        Ok(reader) => reader,
        Err(error) => return error_body(0, storage_error_code(&error), error.to_string()),
    };
    let result: Result<Body, StorageError> = es_storage::guarded("a viewer read", || {
        Ok(match request {
            Request::ListPatients(list) => {
                let limit = match list.limit {
                    0 => PATIENT_PAGE_DEFAULT,
                    n => n.min(PATIENT_PAGE_MAX),
                };
                let after =
                    (!list.after_patient_id.is_empty()).then_some(list.after_patient_id.as_str());
                let patients = reader.patients(after, limit)?;
                let next_after = es_storage::next_page_after(&patients, limit, |p| &p.patient_id);
                Body::PatientList(pb::PatientList {
                    patients: patients.into_iter().map(convert::patient).collect(),
                    next_after,
                })
            }
            Request::GetPatient(get) => match reader.patient(&get.patient_id)? {
                Some(record) => Body::Patient(convert::patient(record)),
                None => not_found(format!("patient {}", get.patient_id)),
            },
            Request::ListDishes(list) => {
                match reader.treatment_dishes(&list.patient_id, &list.treatment_name)? {
                    Some(dishes) => Body::DishList(pb::DishList {
                        dishes: dishes
                            .into_iter()
                            .map(|d| convert::dish(d, Vec::new()))
                            .collect(),
                    }),
                    None => not_found(format!(
                        "treatment {}/{}",
                        list.patient_id, list.treatment_name
                    )),
                }
            }
            Request::GetDish(get) => match reader.dish(get.dish_key)? {
                Some(dish) => {
                    let embryos = reader.dish_embryos(get.dish_key)?;
                    Body::Dish(convert::dish(dish, embryos))
                }
                None => not_found(format!("dish {}", get.dish_key)),
            },
            Request::GetEmbryo(get) => match reader.embryo(&get.embryo_id)? {
                Some(embryo) => Body::Embryo(convert::embryo(embryo)),
                None => not_found(format!("embryo {}", get.embryo_id)),
            },
            Request::ListAcquisitions(list) => {
                let limit = match list.limit {
                    0 => FRAMES_MAX,
                    n => n.min(FRAMES_MAX),
                };
                let after = list.has_after.then_some(list.after_ms);
                match reader.acquisitions(&list.embryo_id, after, limit)? {
                    Some(acquisitions) => Body::AcquisitionList(pb::AcquisitionList {
                        acquisitions: acquisitions
                            .into_iter()
                            .map(|a| pb::Acquisition {
                                acquired_at_ms: a.acquired_at_ms,
                                focal_planes: a.focal_planes,
                            })
                            .collect(),
                    }),
                    None => not_found(format!("embryo {}", list.embryo_id)),
                }
            }
            Request::GetImage(get) => {
                match reader.embryo_image(&get.embryo_id, get.acquired_at_ms, get.focal_plane)? {
                    Some(jpeg) => Body::Image(pb::Image {
                        embryo_id: get.embryo_id,
                        acquired_at_ms: get.acquired_at_ms,
                        focal_plane: get.focal_plane,
                        jpeg,
                    }),
                    None => not_found(format!(
                        "image of embryo {} at {} focal plane {}",
                        get.embryo_id, get.acquired_at_ms, get.focal_plane
                    )),
                }
            }
            Request::DishOverview(get) => {
                if reader.dish(get.dish_key)?.is_none() {
                    return Ok(not_found(format!("dish {}", get.dish_key)));
                }
                let wells = reader.dish_overview(get.dish_key, get.focal_plane)?;
                let mut overview = pb::Overview {
                    dish_key: get.dish_key,
                    ..Default::default()
                };
                for (well, embryo_id, frame) in wells {
                    overview.well_numbers.push(well);
                    overview.wells.push(match frame {
                        Some(frame) => convert::image(&embryo_id, frame),
                        None => pb::Image {
                            embryo_id,
                            ..Default::default()
                        },
                    });
                }
                Body::Overview(overview)
            }
            Request::ListModels(_) => Body::ModelList(pb::ModelList {
                models: reader
                    .models()?
                    .iter()
                    .map(convert::model_summary)
                    .collect(),
            }),
            Request::GetModel(get) => {
                let version = (get.version != 0).then_some(get.version);
                match reader.model(&get.name, version)? {
                    Some(model) => Body::Model(pb::ModelDocument {
                        summary: Some(convert::model_summary(&model)),
                        document: model.document,
                    }),
                    None => not_found(match version {
                        Some(version) => format!("model {} version {version}", get.name),
                        None => format!("model {}", get.name),
                    }),
                }
            }
            Request::ListEvaluations(list) => match reader.model_results(&list.embryo_id)? {
                Some(results) => Body::EvaluationList(pb::EvaluationList {
                    embryo_id: list.embryo_id,
                    evaluations: results.into_iter().map(convert::evaluation).collect(),
                }),
                None => not_found(format!("embryo {}", list.embryo_id)),
            },
            other => error_body(
                0,
                ErrorCode::InternalError,
                format!("{} is not a read", request_name(&other)),
            ),
        })
    });
    result.unwrap_or_else(|error| error_body(0, storage_error_code(&error), error.to_string()))
}

fn refused_code(refused: &edits::Refused) -> ErrorCode {
    match refused {
        edits::Refused::Forbidden(_) => ErrorCode::PermissionDenied,
        edits::Refused::DiskLow => ErrorCode::DiskFull,
        edits::Refused::Busy => ErrorCode::Busy,
        edits::Refused::ShuttingDown => ErrorCode::ShuttingDown,
    }
}

fn storage_error_code(error: &StorageError) -> ErrorCode {
    match error {
        StorageError::ImageDamaged { .. } => ErrorCode::ImageDamaged,
        StorageError::DiskFull => ErrorCode::DiskFull,
        _ => ErrorCode::StorageUnavailable,
    }
}

fn write_error_code<R>(
    error: &WriteError<R>,
    refusal_code: impl FnOnce(&R) -> ErrorCode,
) -> ErrorCode {
    match error {
        WriteError::Refused(refusal) => refusal_code(refusal),
        WriteError::InvalidInput(_) => ErrorCode::InvalidField,
        WriteError::DiskFull => ErrorCode::DiskFull,
        WriteError::ShuttingDown => ErrorCode::ShuttingDown,
        WriteError::Storage(_) => ErrorCode::StorageUnavailable,
    }
}

fn edit_refusal_code(refusal: &EditRefusal) -> ErrorCode {
    match refusal {
        EditRefusal::Stale(_) => ErrorCode::Conflict,
        EditRefusal::NotFound(_) => ErrorCode::NotFound,
        EditRefusal::AlreadyExists(_) => ErrorCode::AlreadyExists,
        // Viewer saves carry no Idempotency-Key.
        EditRefusal::IdempotencyKeyReused(_) => ErrorCode::InternalError,
    }
}

fn admin_refusal_code(refusal: &AdminRefusal) -> ErrorCode {
    match refusal {
        AdminRefusal::NotFound(_) => ErrorCode::NotFound,
        AdminRefusal::AlreadyExists(_) => ErrorCode::AlreadyExists,
    }
}
