//! The public API (port 4000, HTTPS): REST under `/api/v1` for EMR and data-warehouse
//! systems, and the original API's `/LOGIN` and `/GET/<name>` calls for clients written
//! against it (`docs/api.md`, `docs/api-compat.md`, `docs/api/openapi.json`).
//!
//! Threads: the session runs on its event loop and never blocks it. It parses one request at
//! a time (pipelined requests wait in the input buffer, in order) and hands it to the worker
//! pool ([`crate::workers`]), where the credential is checked, the store read and the
//! response built. A write goes from the worker to the storage writer; its completion comes
//! back to the session, which has a worker render the result from the store (the new state,
//! or the current state of a refused stale write). A streamed answer (a time-lapse ZIP,
//! a long JSON array) is produced one part per worker job while the connection's unsent
//! output is below [`es_net::STREAM_OUTPUT_HIGH_BYTES`] ([`stream`], [`es_net::Pump`]). A change-feed long poll waits on the session, woken by
//! store commits ([`WaitHub`]) or its deadline.

pub mod auth;
pub mod compat;
pub(crate) mod routes;
mod stream;
pub mod zip;

use crate::disk_guard::DiskState;
use crate::workers::Workers;
use auth::Tokens;
use bytes::{Bytes, BytesMut};
use es_net::http::{self, HttpError, HttpLimits, Parsed, RequestParser};
use es_net::{CloseReason, ConnHandle, Fallback, Pump, Service, Session, SessionIo};
use es_storage::{Edit, LoginAttempt, OpResult, Rights, StorageError, Store, WriteError, Writer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::{Body, JsonBody, Produced, ZipBody};

/// Frames read per worker job of a ZIP stream.
pub const ZIP_CHUNK_FRAMES: u32 = 16;
/// Longest change-feed wait a client may ask for.
pub const CHANGES_WAIT_MAX: Duration = Duration::from_secs(60);
/// Connections waiting on the change feed at once, at most (each holds a connection only).
pub const WAITERS_MAX: usize = 512;

/// Settings of the public API service.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub http: HttpLimits,
    pub login_failures_max: u32,
    pub lockout_ms: i64,
    /// `[Clinic] time_zone`: the original Public API writes local times in it.
    pub time_zone: jiff::tz::TimeZone,
    /// `[Server] activity`: stored curves are served even while they lag.
    pub activity_background: bool,
}

/// A complete response, built on a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).unwrap_or_default();
        body.push(b'\n');
        Response {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: Bytes::from(body),
        }
    }

    /// The one error shape: `{"code", "message"}`.
    pub fn error(status: u16, code: &str, message: impl Into<String>) -> Response {
        let value = serde_json::json!({ "code": code, "message": message.into() });
        let mut response = Response::json(status, &value);
        if status == 503 {
            response.headers.push(("retry-after", "1".into()));
        }
        if status == 401 {
            response
                .headers
                .push(("www-authenticate", "Bearer realm=\"esserver\"".into()));
        }
        response
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    pub fn busy() -> Response {
        Response::error(503, "busy", "the server is busy; retry in a moment")
    }

    pub fn storage(error: &StorageError) -> Response {
        match error {
            StorageError::ImageDamaged { .. } | StorageError::Corrupt(_) => {
                tracing::error!("public API read failed: {error}");
                Response::error(500, error.code(), error.to_string())
            }
            _ => Response::error(503, error.code(), error.to_string()),
        }
    }
}

/// What a worker decided for a request.
pub enum Step {
    Respond(Response),
    /// A write (or login record) was handed to the storage writer; its completion answers.
    Submitted,
    /// Stream a ZIP of an embryo's frames at one focal plane.
    Zip(ZipPlan),
    /// Stream a JSON answer page by page.
    Json(JsonPlan),
    /// Nothing after `after` yet: wait for a commit until `until`, then answer.
    Wait {
        after: u64,
        limit: u32,
        until: Instant,
    },
}

/// Reads one page of a streamed JSON answer from `cursor` on (0 at the start): its items and
/// the cursor of the next page, None after the last.
pub type JsonPageReader = Arc<
    dyn Fn(&Store, u64) -> Result<(Vec<serde_json::Value>, Option<u64>), StorageError>
        + Send
        + Sync,
>;

/// A JSON answer too large to build at once (every scored embryo of a clinic): an object
/// whose one array is read a page at a time on the workers and sent as it is read, so the
/// memory it takes is a page's, whatever its length.
pub struct JsonPlan {
    /// Written before the first item (`{"Scores":[`) and after the last (`]}`).
    pub open: &'static str,
    pub close: &'static str,
    pub read: JsonPageReader,
    /// How an error before the first byte is answered (the original API's are text).
    pub render_error: fn(Response) -> Response,
}

pub struct ZipPlan {
    pub embryo_id: String,
    pub focal_plane: i32,
    /// File names in the archive: `<prefix>_<run>.jpg`.
    pub name_prefix: String,
}

/// How to answer once a write is durable (or refused).
#[derive(Debug, Clone)]
pub enum Render {
    Patient { patient_id: String, created: bool },
    Treatment { patient_id: String, name: String },
    Embryo { embryo_id: String },
    Transfer { created: bool },
}

/// Messages delivered to an API connection from other threads.
pub enum ApiMsg {
    /// Who made the request being answered (an API key or a user), for the request log.
    Caller(String),
    Step(Step),
    /// A write is durable or refused.
    Written {
        result: OpResult<Edit>,
        render: Render,
    },
    /// A login was recorded: issue a token or refuse.
    LoginRecorded {
        user: String,
        rights: Rights,
        kind: LoginKind,
        result: OpResult<LoginAttempt>,
    },
    /// The next part of a streamed answer was produced.
    Produced(Produced),
    /// New changes were committed.
    ChangesCommitted,
}

/// Which login asked: the REST API (`POST /api/v1/login`), the original API (`/LOGIN`) or
/// the web interface's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginKind {
    Rest,
    Legacy,
    /// The web interface's administrators.
    Web,
    /// The browser viewer (`/view/`): viewer users, on a licensed device.
    View,
}

/// The answer a worker job that fails gives its request.
fn internal_error() -> ApiMsg {
    ApiMsg::Step(Step::Respond(Response::error(
        500,
        "internal_error",
        "internal error while handling the request",
    )))
}

/// The connections waiting on the change feed, woken by store commits.
#[derive(Default)]
pub struct WaitHub {
    members: Mutex<HashMap<u64, ConnHandle<ApiMsg>>>,
    /// The newest change seq committed. Set before the members are woken, so a session that
    /// joins and then finds it beyond its cursor missed no wake-up.
    last_seq: AtomicU64,
}

impl WaitHub {
    fn committed(&self, seq: u64) {
        self.last_seq.fetch_max(seq, Ordering::AcqRel);
        for handle in self.members.lock().values() {
            // A full loop queue: the waiter answers at its deadline or next commit.
            handle.try_send(ApiMsg::ChangesCommitted);
        }
    }

    fn join(&self, handle: ConnHandle<ApiMsg>) -> bool {
        let mut members = self.members.lock();
        if members.len() >= WAITERS_MAX {
            return false;
        }
        members.insert(handle.id(), handle);
        true
    }

    fn leave(&self, connection_id: u64) {
        self.members.lock().remove(&connection_id);
    }
}

/// What a listener on this session machinery serves: the public API's routes ([`PublicApi`]),
/// or another site's (the web interface, `crate::web`), which plugs in here without this
/// module knowing it.
pub(crate) trait Site: Sized + Send + Sync + 'static {
    /// The service's name in logs and its pool ("public-api", "web").
    const SERVICE: &'static str;
    /// How its requests are named in the log ("public API", "web").
    const LABEL: &'static str;

    /// Handles one request on a worker; `caller` is set to who made it once that is known.
    fn handle(
        shared: &ApiShared<Self>,
        request: &http::Request,
        peer: SocketAddr,
        handle: &ConnHandle<ApiMsg>,
        caller: &mut Option<String>,
    ) -> Step;

    /// The answer to a recorded login of [`LoginKind::Web`] or [`LoginKind::View`]
    /// (`refused` says why not).
    fn web_login_answer(
        _shared: &ApiShared<Self>,
        _kind: LoginKind,
        _user: &str,
        _rights: Rights,
        _refused: Option<String>,
        _peer: SocketAddr,
        _now: Instant,
    ) -> Response {
        Response::error(500, "internal_error", "this listener has no web login")
    }
}

/// The public API's routes (`routes.rs`, `compat.rs`).
pub struct PublicApi;

impl Site for PublicApi {
    const SERVICE: &'static str = "public-api";
    const LABEL: &'static str = "public API";

    fn handle(
        shared: &ApiShared<Self>,
        request: &http::Request,
        peer: SocketAddr,
        handle: &ConnHandle<ApiMsg>,
        caller: &mut Option<String>,
    ) -> Step {
        routes::handle(shared, request, peer, handle, caller)
    }
}

pub(crate) struct ApiShared<S = PublicApi> {
    pub store: Store,
    pub writer: Writer,
    pub workers: Workers,
    pub disk: Arc<DiskState>,
    pub licensing: Arc<crate::license::Licensing>,
    pub settings: ApiSettings,
    pub tokens: Tokens,
    pub waiters: WaitHub,
    /// What the listener serves, and that site's own state.
    pub site: S,
}

pub(crate) struct ApiService<S: Site = PublicApi> {
    shared: Arc<ApiShared<S>>,
}

impl<S: Site> ApiService<S> {
    pub fn new(
        store: Store,
        writer: Writer,
        workers: Workers,
        disk: Arc<DiskState>,
        licensing: Arc<crate::license::Licensing>,
        settings: ApiSettings,
        site: S,
    ) -> ApiService<S> {
        let shared = Arc::new(ApiShared {
            store: store.clone(),
            writer,
            workers,
            disk,
            licensing,
            settings,
            tokens: Tokens::default(),
            waiters: WaitHub::default(),
            site,
        });
        let weak = Arc::downgrade(&shared);
        if let Ok(seq) = store.read().and_then(|reader| reader.last_change_seq()) {
            shared.waiters.last_seq.store(seq, Ordering::Release);
        }
        store.on_commit(Box::new(move |seq| {
            if let Some(shared) = weak.upgrade() {
                shared.waiters.committed(seq);
            }
        }));
        ApiService { shared }
    }
}

impl<S: Site> Service for ApiService<S> {
    type Msg = ApiMsg;
    type Session = ApiSession<S>;

    fn name(&self) -> &'static str {
        S::SERVICE
    }

    fn open(&self, peer: SocketAddr, handle: ConnHandle<ApiMsg>, _now: Instant) -> ApiSession<S> {
        ApiSession {
            parser: RequestParser::new(self.shared.settings.http),
            shared: self.shared.clone(),
            handle,
            peer,
            state: State::Idle,
            exchange: None,
            requested: false,
        }
    }
}

/// The request being answered, as far as writing its response needs it.
struct Exchange {
    method: String,
    /// The path only: never the query (the original's `/LOGIN` carries the password there).
    path: String,
    keep_alive: bool,
    head_only: bool,
    http10: bool,
    started: Instant,
    /// `key:<id>` or `user:<name>` once authenticated.
    caller: Option<String>,
}

/// A streamed answer in progress: its body (produced on the workers, one part at a time)
/// and whether its head was sent.
struct StreamState {
    body: Arc<Mutex<Box<dyn Body>>>,
    pump: Pump,
    started: bool,
}

enum State {
    Idle,
    /// A worker job or a storage write is answering.
    Working,
    Streaming(StreamState),
    Waiting {
        after: u64,
        limit: u32,
        until: Instant,
    },
}

pub(crate) struct ApiSession<S: Site = PublicApi> {
    parser: RequestParser,
    shared: Arc<ApiShared<S>>,
    handle: ConnHandle<ApiMsg>,
    peer: SocketAddr,
    state: State,
    /// The request being answered: one answer owed to the peer (`SessionIo::owe`) from its
    /// head's arrival until its response is written.
    exchange: Option<Exchange>,
    /// A whole request head has arrived. Until then the connection counts as a handshake:
    /// the handshake timeout closes a peer that dribbles its first request (slowloris after
    /// TLS), and it counts towards the bound on unauthenticated connections.
    requested: bool,
}

impl<S: Site> ApiSession<S> {
    fn run_job(&mut self, job: crate::workers::Job) -> bool {
        self.shared.workers.try_run(job).is_ok()
    }

    /// Ends the exchange: its answer is written (or the connection ends without it).
    fn end_exchange(&mut self, io: &mut SessionIo<'_>) -> Option<Exchange> {
        self.state = State::Idle;
        let exchange = self.exchange.take();
        if exchange.is_some() {
            io.answered();
        }
        exchange
    }

    fn start(&mut self, request: http::Request, io: &mut SessionIo<'_>) {
        self.requested = true;
        io.owe();
        self.exchange = Some(Exchange {
            method: request.method.clone(),
            path: request.path.clone(),
            keep_alive: request.keep_alive && !io.is_stopping(),
            head_only: request.method == "HEAD",
            http10: request.minor_version == 0,
            started: io.now(),
            caller: None,
        });
        self.state = State::Working;
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let peer = self.peer;
        let job = Box::new(move || {
            let fallback = Fallback::new(&handle, internal_error());
            let mut caller = None;
            let step = S::handle(&shared, &request, peer, &handle, &mut caller);
            fallback.disarm();
            if let Some(caller) = caller {
                // Delivered before the answer: messages to a connection keep their order.
                handle.send(ApiMsg::Caller(caller));
            }
            if !matches!(step, Step::Submitted) {
                handle.send(ApiMsg::Step(step));
            }
        });
        if !self.run_job(job) {
            self.finish(Response::busy(), io);
        }
    }

    /// Writes a complete response and makes the connection ready for the next request.
    fn finish(&mut self, response: Response, io: &mut SessionIo<'_>) {
        let Some(exchange) = self.end_exchange(io) else {
            return;
        };
        let keep_alive = exchange.keep_alive && !io.is_stopping() && !io.is_peer_gone();
        let mut headers: Vec<(&str, &str)> = response
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        if keep_alive && exchange.http10 {
            headers.push(("connection", "keep-alive"));
        }
        if io.is_tls() {
            // Browsers come back over HTTPS only, for a year.
            headers.push(("strict-transport-security", "max-age=31536000"));
        }
        let mut out = Vec::with_capacity(256 + response.body.len());
        http::write_response(
            &mut out,
            response.status,
            &headers,
            &response.body,
            keep_alive,
            exchange.head_only,
        );
        io.write(&out);
        self.log(&exchange, response.status, io.now());
        if !keep_alive {
            io.close(CloseReason::Requested("response sent".into()));
        }
    }

    /// One line per request: who, what, the answer. The path only: never the query string
    /// (the original's `/LOGIN` carries the password there) nor any credential.
    fn log(&self, exchange: &Exchange, status: u16, now: Instant) {
        let ms = now.saturating_duration_since(exchange.started).as_millis() as u64;
        let caller = exchange.caller.as_deref().unwrap_or("-");
        let label = S::LABEL;
        if status >= 500 {
            tracing::warn!(peer = %self.peer, caller, method = %exchange.method, path = %exchange.path, status, ms, "{label} request");
        } else {
            tracing::info!(peer = %self.peer, caller, method = %exchange.method, path = %exchange.path, status, ms, "{label} request");
        }
    }

    /// A request that could not be parsed: answer and close (the stream is out of step).
    fn refuse(&mut self, error: &HttpError, io: &mut SessionIo<'_>) {
        let service = S::LABEL;
        tracing::warn!(peer = %self.peer, code = error.code(), "{service} request refused: {}", error.message());
        let body = serde_json::json!({ "code": error.code(), "message": error.message() });
        let mut out = Vec::new();
        http::write_response(
            &mut out,
            error.status(),
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
            false,
            false,
        );
        io.write(&out);
        io.close(CloseReason::Requested(format!(
            "{}: {}",
            error.code(),
            error.message()
        )));
        self.exchange = None;
        self.state = State::Idle;
    }

    fn process(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        while matches!(self.state, State::Idle) && !io.is_closing() && !io.is_stopping() {
            match self.parser.parse(input) {
                Ok(Parsed::NeedMore) => break,
                Ok(Parsed::SendContinue) => io.write(http::CONTINUE_RESPONSE),
                Ok(Parsed::Request(request)) => self.start(*request, io),
                Err(error) => {
                    self.refuse(&error, io);
                    break;
                }
            }
        }
        self.update_reading(io);
    }

    fn update_reading(&mut self, io: &mut SessionIo<'_>) {
        if matches!(self.state, State::Idle) && !io.is_stopping() {
            io.resume_reading();
        } else {
            io.pause_reading();
        }
    }

    fn on_step(&mut self, step: Step, io: &mut SessionIo<'_>) {
        match step {
            Step::Respond(response) => self.finish(response, io),
            Step::Submitted => {}
            Step::Zip(plan) => self.start_stream(Box::new(ZipBody::new(plan)), io),
            Step::Json(plan) => self.start_stream(Box::new(JsonBody::new(plan)), io),
            Step::Wait {
                after,
                limit,
                until,
            } => {
                if io.is_stopping()
                    || !self.shared.waiters.join(self.handle.clone())
                    || self.shared.waiters.last_seq.load(Ordering::Acquire) > after
                {
                    // Stopping, too many waiters (the client gets nothing new and asks
                    // again), or a change committed since the worker looked: answer now.
                    self.read_changes(after, limit, io);
                    return;
                }
                self.state = State::Waiting {
                    after,
                    limit,
                    until,
                };
            }
        }
    }

    /// Answers a change-feed wait (woken, timed out or stopping).
    fn read_changes(&mut self, after: u64, limit: u32, io: &mut SessionIo<'_>) {
        self.shared.waiters.leave(self.handle.id());
        self.state = State::Working;
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let job = Box::new(move || {
            let fallback = Fallback::new(&handle, internal_error());
            let response = routes::changes_now(&shared, after, limit);
            fallback.disarm();
            handle.send(ApiMsg::Step(Step::Respond(response)));
        });
        if !self.run_job(job) {
            self.finish(Response::busy(), io);
        }
    }

    fn written(&mut self, result: OpResult<Edit>, render: Render, io: &mut SessionIo<'_>) {
        let shared = self.shared.clone();
        let handle = self.handle.clone();
        let job = Box::new(move || {
            let fallback = Fallback::new(&handle, internal_error());
            let response = routes::render_written(&shared, result, &render);
            fallback.disarm();
            handle.send(ApiMsg::Step(Step::Respond(response)));
        });
        if !self.run_job(job) {
            // The write itself is durable; only rendering it failed for lack of a worker.
            self.finish(
                Response::error(
                    503,
                    "busy",
                    "the write was handled but the server is too busy to show its result; \
                     read the resource again",
                ),
                io,
            );
        }
    }

    fn login_recorded(
        &mut self,
        user: String,
        rights: Rights,
        kind: LoginKind,
        result: OpResult<LoginAttempt>,
        io: &mut SessionIo<'_>,
    ) {
        // One answer to every refused login, whatever the reason (the log and the audit
        // trail keep it), so a login cannot tell which accounts exist or are locked.
        let reason = match &result {
            Ok(recorded) if recorded.granted => None,
            Ok(recorded) if recorded.disabled => Some("account disabled"),
            Ok(recorded) if recorded.locked_until_ms > 0 => Some("account locked for this address"),
            Ok(_) => Some("wrong password"),
            Err(WriteError::Refused(_)) => Some("unknown user"),
            Err(_) => None,
        };
        if matches!(kind, LoginKind::Web | LoginKind::View) {
            let refused = match (&result, reason) {
                (Err(error), None) => Some(format!("cannot record the login: {error}")),
                (_, Some(reason)) => {
                    tracing::warn!(%user, peer = %self.peer, reason, "web interface login refused");
                    Some(crate::accounts::LOGIN_REFUSED.to_string())
                }
                (Ok(_), None) => None,
            };
            let response = S::web_login_answer(
                &self.shared,
                kind,
                &user,
                rights,
                refused,
                self.peer,
                io.now(),
            );
            self.finish(response, io);
            return;
        }
        let legacy = kind == LoginKind::Legacy;
        let response = match (result, reason) {
            (Ok(_), None) => match self.shared.tokens.issue(&user, rights, io.now()) {
                Some(token) => {
                    tracing::info!(%user, peer = %self.peer, rights = rights.as_str(), "public API login");
                    routes::token_response(&token, legacy)
                }
                None => Response::error(500, "internal_error", "no randomness for a token"),
            },
            (_, Some(reason)) => {
                tracing::warn!(%user, peer = %self.peer, code = "auth_failed", reason, "public API login refused");
                Response::error(401, "auth_failed", crate::accounts::LOGIN_REFUSED)
            }
            (Err(error), None) => routes::write_error(&error, routes::admin_refusal_status),
        };
        self.finish(response, io);
    }

    fn start_stream(&mut self, body: Box<dyn Body>, io: &mut SessionIo<'_>) {
        self.state = State::Streaming(StreamState {
            body: Arc::new(Mutex::new(body)),
            pump: Pump::default(),
            started: false,
        });
        self.pump_stream(io);
    }

    /// Has a worker produce the stream's next part, when the pump allows.
    fn pump_stream(&mut self, io: &mut SessionIo<'_>) {
        let State::Streaming(stream) = &mut self.state else {
            return;
        };
        if !stream.pump.start(io.pending_output_bytes()) {
            return;
        }
        let body = stream.body.clone();
        let store = self.shared.store.clone();
        let handle = self.handle.clone();
        let job = Box::new(move || {
            let produced = body.lock().produce(&store);
            handle.send(ApiMsg::Produced(produced));
        });
        if self.run_job(job) {
            return;
        }
        let State::Streaming(stream) = &mut self.state else {
            return;
        };
        stream.pump.cancel();
        if !stream.started {
            let busy = stream.body.lock().refuse(Response::busy());
            self.finish(busy, io);
        }
        // Started: the next tick tries again (the body keeps its place).
    }

    /// Sends a produced part: the head first, the data framed, the end after the last.
    fn stream_produced(&mut self, produced: Produced, io: &mut SessionIo<'_>) {
        let State::Streaming(stream) = &mut self.state else {
            return;
        };
        stream.pump.produced();
        let (data, last) = match produced {
            Produced::Data { data, last } => (data, last),
            Produced::Refuse(response) => {
                debug_assert!(!stream.started, "a refusal after the head");
                self.finish(response, io);
                return;
            }
            Produced::Broken(reason) => {
                let what = stream.body.lock().what();
                tracing::error!(peer = %self.peer, "{what} failed: {reason}");
                self.stream_broken(what, io);
                return;
            }
        };
        let mut out = Vec::new();
        if !stream.started {
            stream.started = true;
            let headers = stream.body.lock().headers();
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (*name, value.as_str()))
                .collect();
            if self.stream_head(&headers, &mut out, io) {
                return;
            }
        }
        let http10 = self.exchange.as_ref().is_some_and(|e| e.http10);
        if http10 {
            out.extend_from_slice(&data);
        } else if !data.is_empty() {
            // (An empty chunk would end the body.)
            http::write_chunk(&mut out, &data);
        }
        if last {
            self.stream_end(out, io);
            return;
        }
        io.write(&out);
        self.pump_stream(io);
    }

    /// Writes the head of a streamed 200 answer into `out` (chunked, or for HTTP/1.0 ended by
    /// the end of the connection). For a HEAD request it is the whole answer: it is sent and
    /// the exchange ends, and true is returned.
    fn stream_head(
        &mut self,
        headers: &[(&str, &str)],
        out: &mut Vec<u8>,
        io: &mut SessionIo<'_>,
    ) -> bool {
        let Some(exchange) = &self.exchange else {
            return true;
        };
        if exchange.http10 {
            // No chunked framing in HTTP/1.0: the end of the connection ends the body.
            out.extend_from_slice(b"HTTP/1.0 200 OK\r\n");
            for (name, value) in headers {
                out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
            }
            out.extend_from_slice(b"connection: close\r\n\r\n");
        } else {
            http::write_chunked_head(out, 200, headers, exchange.keep_alive && !io.is_stopping());
        }
        if !exchange.head_only {
            return false;
        }
        // HEAD: the head says what a GET would send; no body.
        io.write(out);
        if let Some(exchange) = self.end_exchange(io) {
            self.log(&exchange, 200, io.now());
            if !exchange.keep_alive || exchange.http10 {
                io.close(CloseReason::Requested("response sent".into()));
            }
        }
        true
    }

    /// Sends the last of a streamed answer (`out`, already framed) and ends the exchange.
    fn stream_end(&mut self, mut out: Vec<u8>, io: &mut SessionIo<'_>) {
        let http10 = self.exchange.as_ref().is_some_and(|e| e.http10);
        if !http10 {
            http::write_last_chunk(&mut out);
        }
        io.write(&out);
        if let Some(exchange) = self.end_exchange(io) {
            self.log(&exchange, 200, io.now());
            if !exchange.keep_alive || exchange.http10 || io.is_stopping() {
                io.close(CloseReason::Requested("response sent".into()));
            }
        }
    }

    /// A streamed answer failed after its head was sent: the connection ends without the
    /// last chunk, so the client sees a truncated answer rather than a short one.
    fn stream_broken(&mut self, what: &str, io: &mut SessionIo<'_>) {
        if let Some(exchange) = self.end_exchange(io) {
            self.log(&exchange, 500, io.now());
        }
        io.close(CloseReason::Requested(format!("{what} failed")));
    }

    /// After a response: read the next request (buffered ones included). The loop closes a
    /// connection that is stopping or whose peer has gone once nothing is owed.
    fn after_response(&mut self, io: &mut SessionIo<'_>) {
        if !matches!(self.state, State::Idle) || io.is_closing() {
            return;
        }
        self.update_reading(io);
    }
}

impl<S: Site> Session for ApiSession<S> {
    type Msg = ApiMsg;

    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        self.process(input, io);
    }

    fn on_message(&mut self, message: ApiMsg, io: &mut SessionIo<'_>) {
        match message {
            ApiMsg::Caller(caller) => {
                if let Some(exchange) = &mut self.exchange {
                    exchange.caller = Some(caller);
                }
                return;
            }
            ApiMsg::Step(step) => {
                self.on_step(step, io);
            }
            ApiMsg::Written { result, render } => {
                // The write's worker job ended with Submitted; this is its answer.
                self.written(result, render, io);
            }
            ApiMsg::LoginRecorded {
                user,
                rights,
                kind,
                result,
            } => {
                self.login_recorded(user, rights, kind, result, io);
            }
            ApiMsg::Produced(produced) => {
                self.stream_produced(produced, io);
            }
            ApiMsg::ChangesCommitted => {
                if let State::Waiting { after, limit, .. } = self.state {
                    self.read_changes(after, limit, io);
                }
                return;
            }
        }
        self.after_response(io);
    }

    fn on_output_drained(&mut self, io: &mut SessionIo<'_>) {
        self.pump_stream(io);
    }

    fn on_tick(&mut self, io: &mut SessionIo<'_>) {
        match self.state {
            State::Waiting {
                after,
                limit,
                until,
            } if io.now() >= until || io.is_stopping() => self.read_changes(after, limit, io),
            State::Streaming(_) => self.pump_stream(io),
            _ => {}
        }
    }

    fn on_peer_closed(&mut self, io: &mut SessionIo<'_>) {
        if matches!(self.state, State::Waiting { .. }) {
            // Nobody is left to hear the long poll's answer.
            self.shared.waiters.leave(self.handle.id());
            io.close(CloseReason::PeerClosed);
        }
    }

    fn on_shutdown(&mut self, io: &mut SessionIo<'_>) {
        if let State::Waiting { after, limit, .. } = self.state {
            self.read_changes(after, limit, io);
        }
    }

    fn on_closed(&mut self, reason: &CloseReason) {
        self.shared.waiters.leave(self.handle.id());
        tracing::debug!(peer = %self.peer, %reason, "public API connection closed");
    }

    fn is_established(&self) -> bool {
        self.requested
    }
}
