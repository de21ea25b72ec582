//! One mio event loop: a poll, the connections it owns, and the queue through which other
//! threads reach it.
//!
//! Every turn: wait for readiness (or a wake, or the timer tick), read each ready connection
//! until it would block or its per-turn budget is spent, hand the plaintext to its session,
//! drain the command queue (completions, adopted connections, closes), revisit connections
//! that still had input, then run the timers. Sockets are edge-triggered, so a connection
//! whose reading was paused (backpressure) or cut by the budget goes on the `ready` list
//! rather than waiting for an edge that may never come.

use crate::limits::{NetLimits, STREAM_OUTPUT_HIGH_BYTES};
use crate::pool::{Admission, PoolStats};
use crate::slab::{Slab, SlotToken};
use crate::transport::{ReadStop, Transport};
use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const WAKER_TOKEN: Token = Token(usize::MAX);
pub(crate) const LISTENER_TOKEN: Token = Token(usize::MAX - 1);
/// Timers (handshake, idle, closing) are checked at this granularity.
const TICK: Duration = Duration::from_millis(100);
/// Readiness events taken from the poll per turn.
const EVENTS_PER_TURN_MAX: usize = 1024;
/// A closing connection whose peer does not read its last bytes is dropped after this.
const CLOSING_FLUSH_MAX: Duration = Duration::from_secs(5);
/// After our last byte is sent and our side half-closed, the peer's remaining input is read
/// and discarded for at most this long, so closing never resets the connection over unsent
/// data (a close with unread input makes the kernel send RST and drop its send queue).
const LINGER_MAX: Duration = Duration::from_secs(2);
/// Refusals and evictions are logged one by one at most this often; in between they are
/// counted and summed up in one line, so a flood cannot flood the log.
const FLOOD_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Rate-limits one kind of warning: the first is logged in full, the ones that follow within
/// [`FLOOD_LOG_INTERVAL`] are counted and summed up at the first tick after it.
#[derive(Default)]
struct LogThrottle {
    last_logged: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// True when this event should be logged in full; otherwise it is counted.
    fn admit(&mut self, now: Instant) -> bool {
        let due = self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= FLOOD_LOG_INTERVAL);
        if due && self.suppressed == 0 {
            self.last_logged = Some(now);
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The events counted since the last line, once the interval has passed or when `force`
    /// (then reset).
    fn summary_due(&mut self, now: Instant, force: bool) -> Option<(u64, Duration)> {
        let since = self.last_logged?;
        let elapsed = now.duration_since(since);
        if self.suppressed == 0 || (elapsed < FLOOD_LOG_INTERVAL && !force) {
            return None;
        }
        self.last_logged = Some(now);
        Some((std::mem::take(&mut self.suppressed), elapsed))
    }
}

/// A protocol plugged into a worker pool: it opens one [`Session`] per connection.
pub trait Service: Send + Sync + 'static {
    /// Messages other threads deliver to a connection (storage completions, for example).
    type Msg: Send + 'static;
    type Session: Session<Msg = Self::Msg>;

    /// The service's name in logs ("incubator", "viewer", ...).
    fn name(&self) -> &'static str;

    /// A new connection was accepted (and, with TLS, its handshake is about to start).
    fn open(&self, peer: SocketAddr, handle: ConnHandle<Self::Msg>, now: Instant) -> Self::Session;
}

/// The sans-I/O side of one connection, as the loop sees it.
pub trait Session: Send + 'static {
    type Msg: Send + 'static;

    /// Plaintext arrived: consume from the front of `input` what can be processed.
    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>);

    /// Another thread delivered a message to this connection.
    fn on_message(&mut self, message: Self::Msg, io: &mut SessionIo<'_>);

    /// A timer ran out while the connection is owed nothing (the loop does not time out a
    /// peer that waits for the server's own answers; it asks again at every tick). The
    /// default closes the connection; a protocol may say why first.
    fn on_timeout(&mut self, kind: TimeoutKind, io: &mut SessionIo<'_>) {
        io.close(CloseReason::Timeout(kind));
    }

    /// The peer closed its sending side (it may still read). The loop then answers what it
    /// sent: it keeps the connection while answers are owed or requests are still buffered,
    /// and closes once neither is left. The default does nothing more; a session may close at
    /// once (an answer nobody waits for any more).
    fn on_peer_closed(&mut self, _io: &mut SessionIo<'_>) {}

    /// The server is stopping and this connection is owed nothing more: say so and close.
    /// Called once, after [`Session::on_shutdown`]. The default closes.
    fn on_shutdown_done(&mut self, io: &mut SessionIo<'_>) {
        io.close(CloseReason::Shutdown);
    }

    /// Output that was waiting for the peer has been sent, down to a quarter of
    /// `output_bytes_max` or less: a session streaming a large answer may write its next part.
    fn on_output_drained(&mut self, _io: &mut SessionIo<'_>) {}

    /// Called for every connection at each timer tick (about ten times a second), for work
    /// that waits on something other than input or a message (a retry, for example).
    fn on_tick(&mut self, _io: &mut SessionIo<'_>) {}

    /// The server is stopping: reading is paused; cancel what can be cancelled. The loop
    /// closes through [`Session::on_shutdown_done`] once nothing is owed.
    fn on_shutdown(&mut self, _io: &mut SessionIo<'_>) {}

    /// The connection is gone (always called once).
    fn on_closed(&mut self, reason: &CloseReason);

    /// False until the protocol's own handshake has completed (handshake timeout).
    fn is_established(&self) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Handshake,
    Idle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side.
    PeerClosed,
    /// A socket or TLS error.
    Io(String),
    /// The session asked to close, saying why.
    Requested(String),
    Timeout(TimeoutKind),
    /// The server is shutting down.
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => write!(f, "peer closed the connection"),
            CloseReason::Io(detail) => write!(f, "I/O error: {detail}"),
            CloseReason::Requested(detail) => write!(f, "{detail}"),
            CloseReason::Timeout(TimeoutKind::Handshake) => write!(f, "handshake timeout"),
            CloseReason::Timeout(TimeoutKind::Idle) => write!(f, "idle timeout"),
            CloseReason::Shutdown => write!(f, "server shutting down"),
        }
    }
}

/// What a session may do during a callback: write plaintext, pause or resume reading from
/// its peer, and close.
pub struct SessionIo<'a> {
    transport: &'a mut Transport,
    read_paused: &'a mut bool,
    close: &'a mut Option<CloseReason>,
    lifecycle: &'a mut Lifecycle,
    now: Instant,
    peer: SocketAddr,
    unread_input_bytes: usize,
    peer_eof: bool,
}

/// What a connection is owed and where it is in its life, kept by the loop for every
/// session alike: the loop holds the idle and handshake timeouts, a half-close and a
/// shutdown while the server owes the peer answers, and ends the connection once it owes
/// none.
#[derive(Debug, Default)]
struct Lifecycle {
    /// Answers the server owes the peer: each request handed to another thread (a worker
    /// job, a storage write) or still being answered (a stream, a wait) counts one until
    /// the session says it was answered.
    owed: u32,
    /// The server is stopping: no new requests are read.
    stopping: bool,
    /// [`Session::on_shutdown_done`] was called.
    shutdown_done: bool,
}

impl SessionIo<'_> {
    /// Plaintext to send; appended bytes go out at the end of the callback.
    pub fn write(&mut self, bytes: &[u8]) {
        self.transport.queue(bytes);
    }

    /// Bytes written but not yet sent (sessions that stream large replies check it).
    pub fn pending_output_bytes(&self) -> usize {
        self.transport.pending_output_bytes()
    }

    /// Stop reading from the peer (the queue its requests feed is full).
    pub fn pause_reading(&mut self) {
        *self.read_paused = true;
    }

    /// Read again; input that arrived meanwhile is picked up on this turn.
    pub fn resume_reading(&mut self) {
        *self.read_paused = false;
    }

    pub fn is_reading_paused(&self) -> bool {
        *self.read_paused
    }

    /// Close once what was written has been sent.
    pub fn close(&mut self, reason: CloseReason) {
        if self.close.is_none() {
            *self.close = Some(reason);
        }
    }

    pub fn is_closing(&self) -> bool {
        self.close.is_some()
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn is_tls(&self) -> bool {
        self.transport.is_tls()
    }

    /// Bytes received and not consumed yet (requests a paused session has still to handle),
    /// as they were when this callback began.
    pub fn unread_input_bytes(&self) -> usize {
        self.unread_input_bytes
    }

    /// The server owes the peer one more answer (a request went to another thread, or a
    /// stream or wait began). Pair each with one [`SessionIo::answered`].
    pub fn owe(&mut self) {
        self.lifecycle.owed += 1;
    }

    /// One owed answer was given (or will never be: the request was dropped).
    pub fn answered(&mut self) {
        debug_assert!(self.lifecycle.owed > 0, "answered more than was owed");
        self.lifecycle.owed = self.lifecycle.owed.saturating_sub(1);
    }

    /// True while the server owes the peer answers.
    pub fn owes(&self) -> bool {
        self.lifecycle.owed > 0
    }

    /// True once the server is stopping (set before [`Session::on_shutdown`]).
    pub fn is_stopping(&self) -> bool {
        self.lifecycle.stopping
    }

    /// True once the peer has closed its sending side (no request follows what is buffered).
    pub fn is_peer_gone(&self) -> bool {
        self.peer_eof
    }
}

pub(crate) enum Command<M> {
    Deliver(SlotToken, M),
    Close(SlotToken, String),
    Adopt(TcpStream, SocketAddr),
    Shutdown,
}

/// A cloneable, `Send` way into one loop from any thread.
pub struct LoopHandle<M> {
    sender: Sender<Command<M>>,
    waker: Arc<Waker>,
    wake_pending: Arc<AtomicBool>,
}

impl<M> Clone for LoopHandle<M> {
    fn clone(&self) -> Self {
        LoopHandle {
            sender: self.sender.clone(),
            waker: self.waker.clone(),
            wake_pending: self.wake_pending.clone(),
        }
    }
}

impl<M: Send + 'static> LoopHandle<M> {
    /// Blocks while the loop's queue is full (the loop always drains it). False when the
    /// loop has stopped.
    fn send(&self, command: Command<M>) -> bool {
        if self.sender.send(command).is_err() {
            return false;
        }
        self.wake();
        true
    }

    fn try_send(&self, command: Command<M>) -> Result<(), TrySendError<Command<M>>> {
        self.sender.try_send(command)?;
        self.wake();
        Ok(())
    }

    /// One wake per drain, however many commands were queued meanwhile.
    fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            if let Err(error) = self.waker.wake() {
                tracing::error!(%error, "failed to wake an event loop");
            }
        }
    }

    pub(crate) fn shutdown(&self) {
        self.send(Command::Shutdown);
    }
}

/// A handle on one connection, usable from any thread; stale once the connection closed
/// (messages to it are then dropped by its loop).
pub struct ConnHandle<M> {
    owner: LoopHandle<M>,
    token: SlotToken,
    /// Unique among every connection of the process (tokens are unique per loop only).
    id: u64,
}

/// The one pacing rule of a streamed answer (a playback, a ZIP, a long JSON answer): at most
/// one part in production at a time, and none started while the connection's unsent output is
/// at or above [`STREAM_OUTPUT_HIGH_BYTES`]. TCP flow control then paces the stream, and a
/// peer that stops reading costs the server at most about that much memory.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pump {
    producing: bool,
}

impl Pump {
    /// True when the next part may be produced now, with `pending_output_bytes` unsent on
    /// the connection ([`SessionIo::pending_output_bytes`]); the pump then counts it in
    /// production until [`Pump::produced`] (or [`Pump::cancel`] if it could not be started
    /// after all).
    pub fn start(&mut self, pending_output_bytes: usize) -> bool {
        if self.producing || pending_output_bytes >= STREAM_OUTPUT_HIGH_BYTES {
            return false;
        }
        self.producing = true;
        true
    }

    /// The part that [`Pump::start`] allowed was not started (no worker took it).
    pub fn cancel(&mut self) {
        self.producing = false;
    }

    /// The part in production arrived.
    pub fn produced(&mut self) {
        self.producing = false;
    }

    /// A part is in production.
    pub fn is_producing(&self) -> bool {
        self.producing
    }
}

/// Answers a connection when dropped without [`Fallback::disarm`]: work done for a request on
/// another thread (a worker job) that panics still sends its answer, so the request is never
/// left in flight and the connection's owed count comes back to zero.
pub struct Fallback<'a, M: Send + 'static> {
    handle: &'a ConnHandle<M>,
    message: Option<M>,
}

impl<'a, M: Send + 'static> Fallback<'a, M> {
    /// Arms the guard with the answer to send if the work does not finish.
    pub fn new(handle: &'a ConnHandle<M>, message: M) -> Self {
        Fallback {
            handle,
            message: Some(message),
        }
    }

    /// The work finished and answered by itself.
    pub fn disarm(mut self) {
        self.message = None;
    }
}

impl<M: Send + 'static> Drop for Fallback<'_, M> {
    fn drop(&mut self) {
        if let Some(message) = self.message.take() {
            tracing::error!(
                "work for a connection failed on another thread; answering with an internal error"
            );
            self.handle.send(message);
        }
    }
}

/// Source of connection ids.
static NEXT_CONNECTION_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl<M> Clone for ConnHandle<M> {
    fn clone(&self) -> Self {
        ConnHandle {
            owner: self.owner.clone(),
            token: self.token,
            id: self.id,
        }
    }
}

impl<M: Send + 'static> ConnHandle<M> {
    /// Delivers a message to the connection's session. False when its loop has stopped.
    pub fn send(&self, message: M) -> bool {
        self.owner.send(Command::Deliver(self.token, message))
    }

    /// Like [`ConnHandle::send`] but never blocks: for use on an event-loop thread, where
    /// waiting on a full queue could deadlock two loops. False when the queue is full or
    /// the loop has stopped.
    pub fn try_send(&self, message: M) -> bool {
        self.owner
            .try_send(Command::Deliver(self.token, message))
            .is_ok()
    }

    /// Asks the connection's loop to close it (for example, a newer connection of the same
    /// device replaced it).
    pub fn close(&self, reason: impl Into<String>) -> bool {
        self.owner.send(Command::Close(self.token, reason.into()))
    }

    /// An identity for registries: unique in the process, stable for the connection's life,
    /// and increasing in the order connections were accepted.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl<S> Conn<S> {
    /// The session, its input, and what it may do during a callback, borrowed apart.
    fn split(&mut self, now: Instant) -> (&mut S, &mut BytesMut, SessionIo<'_>) {
        let io = SessionIo {
            transport: &mut self.transport,
            read_paused: &mut self.read_paused,
            close: &mut self.closing,
            lifecycle: &mut self.lifecycle,
            now,
            peer: self.peer,
            unread_input_bytes: self.input.len(),
            peer_eof: self.peer_eof,
        };
        (&mut self.session, &mut self.input, io)
    }
}

struct Conn<S> {
    transport: Transport,
    session: S,
    input: BytesMut,
    peer: SocketAddr,
    opened_at: Instant,
    last_input_at: Instant,
    /// Last time output was sent, or nothing was waiting to be sent.
    last_output_at: Instant,
    read_paused: bool,
    /// Reading paused because the peer does not read what it is sent.
    output_paused: bool,
    closing: Option<CloseReason>,
    closing_since: Option<Instant>,
    /// Everything was sent and our side half-closed; reading and discarding to EOF.
    linger_since: Option<Instant>,
    peer_eof: bool,
    lifecycle: Lifecycle,
    interest: Interest,
    /// Counted among the loop's unauthenticated connections (TLS or the protocol's own
    /// handshake not complete yet).
    unestablished: bool,
}

pub(crate) struct Worker<S: Service> {
    pub(crate) name: String,
    pub(crate) poll: Poll,
    pub(crate) listener: Option<TcpListener>,
    pub(crate) receiver: Receiver<Command<S::Msg>>,
    pub(crate) own: LoopHandle<S::Msg>,
    pub(crate) siblings: Vec<LoopHandle<S::Msg>>,
    pub(crate) service: Arc<S>,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) limits: NetLimits,
    pub(crate) stats: Arc<PoolStats>,
    conns: Slab<Conn<S::Session>>,
    ready: VecDeque<SlotToken>,
    next_sibling: usize,
    shutdown_deadline: Option<Instant>,
    last_tick: Instant,
    /// An accept failed (EMFILE, ...): try again at the next tick, since the edge-triggered
    /// listener will not report the connections already waiting.
    accept_retry: bool,
    /// This loop's unauthenticated connections, oldest first. Entries of connections that
    /// have since completed their handshake or closed are skipped and pruned at each tick.
    unestablished: VecDeque<SlotToken>,
    /// How many connections of this loop are unauthenticated (marked `unestablished`).
    unestablished_count: usize,
    /// This loop's share of `unauthenticated_max`.
    unestablished_max: usize,
    refusal_log: LogThrottle,
    eviction_log: LogThrottle,
    /// Connections closed for not completing their handshake (TLS and the protocol's own) in
    /// time: one line, then a count every interval, so slow or silent floods stay quiet.
    handshake_timeout_log: LogThrottle,
}

pub(crate) fn new_handle<M>(
    poll: &Poll,
    queue_max: usize,
) -> io::Result<(LoopHandle<M>, Receiver<Command<M>>)> {
    let waker = Arc::new(Waker::new(poll.registry(), WAKER_TOKEN)?);
    let (sender, receiver) = crossbeam_channel::bounded(queue_max);
    let handle = LoopHandle {
        sender,
        waker,
        wake_pending: Arc::new(AtomicBool::new(false)),
    };
    Ok((handle, receiver))
}

impl<S: Service> Worker<S> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        poll: Poll,
        listener: Option<TcpListener>,
        receiver: Receiver<Command<S::Msg>>,
        own: LoopHandle<S::Msg>,
        siblings: Vec<LoopHandle<S::Msg>>,
        service: Arc<S>,
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: NetLimits,
        stats: Arc<PoolStats>,
    ) -> Worker<S> {
        let conns = Slab::new(limits.connections_max.max(1));
        let loops = siblings.len().max(1);
        let unestablished_max = (limits.unauthenticated_max as usize).div_ceil(loops).max(1);
        Worker {
            name,
            poll,
            listener,
            receiver,
            own,
            siblings,
            service,
            tls,
            limits,
            stats,
            conns,
            ready: VecDeque::new(),
            next_sibling: 0,
            shutdown_deadline: None,
            last_tick: Instant::now(),
            accept_retry: false,
            unestablished: VecDeque::new(),
            unestablished_count: 0,
            unestablished_max,
            refusal_log: LogThrottle::default(),
            eviction_log: LogThrottle::default(),
            handshake_timeout_log: LogThrottle::default(),
        }
    }

    /// Runs until shutdown completes.
    pub(crate) fn run(mut self) {
        self.run_turns();
        // What the rate-limited warnings still owe is said before the loop ends.
        self.log_flood_summaries(Instant::now(), true);
        // Connections handed to this loop after it stopped are closed and uncounted.
        while let Ok(command) = self.receiver.try_recv() {
            if let Command::Adopt(socket, peer) = command {
                drop(socket);
                self.stats.closed(peer.ip());
            }
        }
    }

    fn run_turns(&mut self) {
        let mut events = Events::with_capacity(EVENTS_PER_TURN_MAX);
        if let Some(listener) = self.listener.as_mut() {
            if let Err(error) =
                self.poll
                    .registry()
                    .register(listener, LISTENER_TOKEN, Interest::READABLE)
            {
                tracing::error!(loop_name = %self.name, %error, "cannot register the listener");
                return;
            }
        }
        loop {
            let timeout = if self.ready.is_empty() {
                TICK
            } else {
                Duration::ZERO
            };
            if let Err(error) = self.poll.poll(&mut events, Some(timeout)) {
                if error.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(loop_name = %self.name, %error, "poll failed; stopping this loop");
                    self.close_all(CloseReason::Io(error.to_string()));
                    return;
                }
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    LISTENER_TOKEN => self.accept(now),
                    token => {
                        let slot = SlotToken::from_usize(token.0);
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(slot, now);
                        }
                        if event.is_writable() {
                            self.finish(slot, now);
                        }
                    }
                }
            }
            self.drain_commands(now);
            self.run_ready(now);
            if now.duration_since(self.last_tick) >= TICK {
                self.last_tick = now;
                self.tick(now);
            }
            if self.shutdown_done(now) {
                return;
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => self.place(socket, peer, now),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // EMFILE and friends: log, and try again at the next tick.
                    tracing::warn!(loop_name = %self.name, %error, "accept failed; retrying shortly");
                    self.accept_retry = true;
                    return;
                }
            }
        }
    }

    /// Gives an accepted socket to the next loop of the pool, round robin.
    fn place(&mut self, socket: TcpStream, peer: SocketAddr, now: Instant) {
        let admission = self.stats.try_open(
            peer.ip(),
            self.limits.connections_max,
            self.limits.connections_per_address_max,
        );
        match admission {
            Admission::Admitted => {}
            Admission::PoolFull => {
                if self.refusal_log.admit(now) {
                    tracing::warn!(service = self.service.name(), %peer,
                        limit = self.limits.connections_max,
                        "connection refused: the pool's connection limit is reached (further refusals are summed up every 10 s)");
                }
                return;
            }
            Admission::AddressFull => {
                if self.refusal_log.admit(now) {
                    tracing::warn!(service = self.service.name(), %peer,
                        limit = self.limits.connections_per_address_max,
                        "connection refused: this address holds its connections_per_address_max (further refusals are summed up every 10 s)");
                }
                return;
            }
        }
        let target = self.next_sibling % self.siblings.len().max(1);
        self.next_sibling = self.next_sibling.wrapping_add(1);
        let sibling = self.siblings.get(target).cloned();
        match sibling {
            Some(handle) if !self.is_own(&handle) => {
                if let Err(error) = handle.try_send(Command::Adopt(socket, peer)) {
                    self.stats.closed(peer.ip());
                    tracing::warn!(service = self.service.name(), %peer,
                        "connection refused: the worker's queue is full ({})", error);
                }
            }
            _ => self.adopt(socket, peer, now),
        }
    }

    fn is_own(&self, handle: &LoopHandle<S::Msg>) -> bool {
        Arc::ptr_eq(&handle.waker, &self.own.waker)
    }

    fn adopt(&mut self, socket: TcpStream, peer: SocketAddr, now: Instant) {
        if self.shutdown_deadline.is_some() {
            self.stats.closed(peer.ip());
            return;
        }
        let _ = socket.set_nodelay(true); // acks are small and latency matters
        let transport = match self.tls.as_ref() {
            None => Transport::plain(socket),
            Some(config) => match rustls::ServerConnection::new(config.clone()) {
                Ok(tls) => Transport::tls(socket, rustls::Connection::Server(tls)),
                Err(error) => {
                    self.stats.closed(peer.ip());
                    tracing::error!(%peer, %error, "cannot start a TLS session");
                    return;
                }
            },
        };
        if self.unestablished_count >= self.unestablished_max {
            self.evict_oldest_unestablished(peer, now);
        }
        let service = self.service.clone();
        let own = self.own.clone();
        let registry_result;
        let inserted = {
            let mut transport = Some(transport);
            self.conns.insert_with(|token| {
                let id = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
                let handle = ConnHandle {
                    owner: own,
                    token,
                    id,
                };
                Conn {
                    transport: transport.take().expect("built once"),
                    session: service.open(peer, handle, now),
                    input: BytesMut::new(),
                    peer,
                    opened_at: now,
                    last_input_at: now,
                    last_output_at: now,
                    read_paused: false,
                    output_paused: false,
                    closing: None,
                    closing_since: None,
                    linger_since: None,
                    peer_eof: false,
                    lifecycle: Lifecycle::default(),
                    interest: Interest::READABLE,
                    unestablished: true,
                }
            })
        };
        let Some(token) = inserted else {
            self.stats.closed(peer.ip());
            tracing::warn!(%peer, "connection refused: this loop's slab is full");
            return;
        };
        self.unestablished_count += 1;
        self.unestablished.push_back(token);
        if self.unestablished.len() > 2 * self.unestablished_max + 64 {
            self.prune_unestablished();
        }
        {
            let conn = self.conns.get_mut(token).expect("just inserted");
            registry_result = self.poll.registry().register(
                conn.transport.socket_mut(),
                Token(token.to_usize()),
                Interest::READABLE,
            );
        }
        if let Err(error) = registry_result {
            tracing::error!(%peer, %error, "cannot register a connection");
            self.remove(token, CloseReason::Io(error.to_string()));
            return;
        }
        tracing::debug!(service = self.service.name(), %peer, loop_name = %self.name, "connection opened");
        // Data may already be waiting (edge-triggered registration after the fact).
        self.ready.push_back(token);
    }

    /// Reads what the peer sent (within the turn's budget) and lets the session consume it.
    fn read(&mut self, token: SlotToken, now: Instant) {
        let limits = &self.limits;
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.linger_since.is_some() {
            self.drain_lingering(token);
            return;
        }
        if conn.peer_eof
            && !conn.read_paused
            && !conn.output_paused
            && conn.closing.is_none()
            && !conn.input.is_empty()
        {
            // The peer half-closed after pipelining more than the session took while it was
            // paused: the requests still buffered are handled, not dropped.
            let (session, input, mut io) = conn.split(now);
            session.on_input(input, &mut io);
            self.finish(token, now);
            return;
        }
        if conn.read_paused || conn.output_paused || conn.closing.is_some() || conn.peer_eof {
            self.finish(token, now);
            return;
        }
        let result = conn.transport.read_into(
            &mut conn.input,
            limits.input_bytes_max,
            limits.read_bytes_per_turn_max,
        );
        match result {
            Err(error) => {
                self.stats.add_bytes_in(0);
                conn.closing = Some(CloseReason::Io(error.to_string()));
                // Nothing more can be said over a broken transport.
                self.remove(token, CloseReason::Io(error.to_string()));
                return;
            }
            Ok((count, stop)) => {
                if count > 0 {
                    conn.last_input_at = now;
                    self.stats.add_bytes_in(count as u64);
                }
                if !conn.input.is_empty() {
                    let (session, input, mut io) = conn.split(now);
                    session.on_input(input, &mut io);
                }
                match stop {
                    ReadStop::Eof => {
                        tracing::debug!(peer = %conn.peer, "peer closed its sending side");
                        conn.peer_eof = true;
                        if conn.closing.is_none() {
                            let (session, _, mut io) = conn.split(now);
                            session.on_peer_closed(&mut io);
                        }
                    }
                    ReadStop::Budget => {
                        let stuck = conn.input.len() >= limits.input_bytes_max;
                        if stuck && !conn.read_paused && conn.closing.is_none() {
                            conn.closing = Some(CloseReason::Requested(format!(
                                "input buffer limit of {} bytes reached without a complete message",
                                limits.input_bytes_max
                            )));
                        } else if !stuck {
                            self.ready.push_back(token);
                        }
                    }
                    ReadStop::Drained => {}
                }
            }
        }
        self.finish(token, now);
    }

    /// Flushes output, applies backpressure and interest changes, completes a close.
    fn finish(&mut self, token: SlotToken, now: Instant) {
        let limits_output = self.limits.output_bytes_max;
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        if conn.unestablished && conn.session.is_established() && !conn.transport.is_handshaking() {
            conn.unestablished = false;
            self.unestablished_count -= 1;
        }
        if conn.closing.is_none() && conn.lifecycle.owed == 0 {
            if conn.lifecycle.stopping && !conn.lifecycle.shutdown_done {
                conn.lifecycle.shutdown_done = true;
                let (session, _, mut io) = conn.split(now);
                session.on_shutdown_done(&mut io);
            } else if conn.peer_eof && conn.input.is_empty() {
                // Every request the peer sent before it half-closed is answered.
                conn.closing = Some(CloseReason::PeerClosed);
            }
        }
        let before = conn.transport.pending_output_bytes();
        if let Err(error) = conn.transport.flush() {
            self.remove(token, CloseReason::Io(error.to_string()));
            return;
        }
        let mut sent = before.saturating_sub(conn.transport.pending_output_bytes());
        let low_water = limits_output / 4;
        if sent > 0
            && before > low_water
            && conn.transport.pending_output_bytes() <= low_water
            && conn.closing.is_none()
        {
            // Once per flush that drained a backlog: the session may queue its next part.
            let before_more = {
                let (session, _, mut io) = conn.split(now);
                session.on_output_drained(&mut io);
                conn.transport.pending_output_bytes()
            };
            if let Err(error) = conn.transport.flush() {
                self.remove(token, CloseReason::Io(error.to_string()));
                return;
            }
            sent += before_more.saturating_sub(conn.transport.pending_output_bytes());
        }
        self.stats.add_bytes_out(sent as u64);
        let pending = conn.transport.pending_output_bytes();
        if sent > 0 || pending == 0 {
            conn.last_output_at = now;
        }
        if !conn.output_paused && pending > limits_output {
            conn.output_paused = true;
        } else if conn.output_paused && pending <= limits_output / 2 {
            conn.output_paused = false;
            self.ready.push_back(token);
        }
        if let Some(reason) = conn.closing.clone() {
            conn.closing_since.get_or_insert(now);
            if conn.linger_since.is_none() && conn.transport.pending_output_bytes() == 0 {
                if !conn.transport.close_sent() {
                    // close_notify goes after the last plaintext, never before it.
                    conn.transport.send_close();
                    if let Err(error) = conn.transport.flush() {
                        self.remove(token, CloseReason::Io(error.to_string()));
                        return;
                    }
                }
                if !conn.transport.wants_write() {
                    if conn.peer_eof {
                        self.remove(token, reason);
                        return;
                    }
                    conn.transport.shutdown_write();
                    conn.linger_since = Some(now);
                    self.ready.push_back(token);
                }
            }
        }
        let wanted = if conn.transport.wants_write() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        if wanted != conn.interest {
            conn.interest = wanted;
            let result = self.poll.registry().reregister(
                conn.transport.socket_mut(),
                Token(token.to_usize()),
                wanted,
            );
            if let Err(error) = result {
                self.remove(token, CloseReason::Io(error.to_string()));
            }
        }
    }

    /// Reads and discards what a closing peer still sends, until its EOF.
    fn drain_lingering(&mut self, token: SlotToken) {
        let limits = &self.limits;
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let result = conn.transport.read_into(
            &mut conn.input,
            limits.input_bytes_max,
            limits.read_bytes_per_turn_max,
        );
        conn.input.clear();
        let reason = conn.closing.clone().unwrap_or(CloseReason::Shutdown);
        match result {
            Ok((_, ReadStop::Drained)) => {}
            Ok((_, ReadStop::Budget)) => self.ready.push_back(token),
            Ok((_, ReadStop::Eof)) | Err(_) => self.remove(token, reason),
        }
    }

    fn remove(&mut self, token: SlotToken, reason: CloseReason) {
        let Some(mut conn) = self.conns.remove(token) else {
            return;
        };
        let _ = self.poll.registry().deregister(conn.transport.socket_mut());
        conn.transport.shutdown();
        conn.session.on_closed(&reason);
        if conn.unestablished {
            self.unestablished_count -= 1;
        }
        self.stats.closed(conn.peer.ip());
        tracing::debug!(service = self.service.name(), peer = %conn.peer, %reason, "connection closed");
    }

    fn drain_commands(&mut self, now: Instant) {
        self.own.wake_pending.store(false, Ordering::SeqCst);
        // Bounded: at most what was queued when the drain began, plus what arrives meanwhile
        // up to one queue's worth.
        for _ in 0..self.limits.loop_queue_max {
            let Ok(command) = self.receiver.try_recv() else {
                return;
            };
            match command {
                Command::Deliver(token, message) => self.deliver(token, message, now),
                Command::Close(token, reason) => {
                    if let Some(conn) = self.conns.get_mut(token) {
                        if conn.closing.is_none() {
                            conn.closing = Some(CloseReason::Requested(reason));
                        }
                        self.finish(token, now);
                    }
                }
                Command::Adopt(socket, peer) => self.adopt(socket, peer, now),
                Command::Shutdown => self.begin_shutdown(now),
            }
        }
        // More is waiting: come back without sleeping.
        if !self.receiver.is_empty() {
            self.own.wake();
        }
    }

    fn deliver(&mut self, token: SlotToken, message: S::Msg, now: Instant) {
        let Some(conn) = self.conns.get_mut(token) else {
            return;
        };
        let was_paused = conn.read_paused;
        let (session, _, mut io) = conn.split(now);
        session.on_message(message, &mut io);
        if was_paused && !conn.read_paused {
            self.ready.push_back(token);
        }
        self.finish(token, now);
    }

    fn run_ready(&mut self, now: Instant) {
        let count = self.ready.len();
        for _ in 0..count {
            let Some(token) = self.ready.pop_front() else {
                return;
            };
            self.read(token, now);
        }
    }

    /// Drops this loop's oldest connection that has not completed its handshake, to make
    /// room for the one from `newcomer`.
    fn evict_oldest_unestablished(&mut self, newcomer: SocketAddr, now: Instant) {
        while let Some(token) = self.unestablished.pop_front() {
            let Some(conn) = self.conns.get(token) else {
                continue;
            };
            if !conn.unestablished {
                continue;
            }
            let (victim, age) = (conn.peer, now.duration_since(conn.opened_at));
            self.stats.evicted();
            if self.eviction_log.admit(now) {
                tracing::warn!(service = self.service.name(), peer = %victim, %newcomer,
                    age_ms = age.as_millis() as u64, limit = self.limits.unauthenticated_max,
                    "unauthenticated connections at their limit: the oldest is dropped for a new one (further evictions are summed up every 10 s)");
            }
            self.remove(
                token,
                CloseReason::Requested(
                    "dropped for a newer connection: too many connections without a completed handshake"
                        .into(),
                ),
            );
            return;
        }
    }

    /// Forgets the queue entries of connections that completed their handshake or closed.
    fn prune_unestablished(&mut self) {
        let conns = &self.conns;
        self.unestablished
            .retain(|token| conns.get(*token).is_some_and(|conn| conn.unestablished));
    }

    /// The summary lines of the rate-limited warnings, once their interval has passed.
    fn log_flood_summaries(&mut self, now: Instant, force: bool) {
        if let Some((count, over)) = self.refusal_log.summary_due(now, force) {
            tracing::warn!(
                service = self.service.name(),
                refused = count,
                over_s = over.as_secs(),
                per_address_refused_total = self.stats.connections_refused_per_address(),
                pool_full_refused_total = self.stats.connections_refused(),
                "connections refused at accept (connections_per_address_max or connections_max)"
            );
        }
        if let Some((count, over)) = self.eviction_log.summary_due(now, force) {
            tracing::warn!(service = self.service.name(), evicted = count, over_s = over.as_secs(),
                evicted_total = self.stats.connections_evicted(),
                "unauthenticated connections dropped for newer ones (unauthenticated_connections_max)");
        }
        if let Some((count, over)) = self.handshake_timeout_log.summary_due(now, force) {
            tracing::warn!(
                service = self.service.name(),
                closed = count,
                over_s = over.as_secs(),
                "connections closed for not completing their handshake in time (handshake_timeout_ms)"
            );
        }
    }

    fn tick(&mut self, now: Instant) {
        if std::mem::take(&mut self.accept_retry) {
            self.accept(now);
        }
        self.log_flood_summaries(now, false);
        self.prune_unestablished();
        for token in self.conns.tokens() {
            let Some(conn) = self.conns.get_mut(token) else {
                continue;
            };
            if let Some(since) = conn.linger_since {
                if now.duration_since(since) > LINGER_MAX {
                    let reason = conn.closing.clone().unwrap_or(CloseReason::Shutdown);
                    self.remove(token, reason);
                }
                continue;
            }
            if let Some(since) = conn.closing_since {
                if now.duration_since(since) > CLOSING_FLUSH_MAX {
                    let reason = conn.closing.clone().unwrap_or(CloseReason::Shutdown);
                    self.remove(token, reason);
                } else {
                    self.finish(token, now);
                }
                continue;
            }
            if now.duration_since(conn.last_output_at) > self.limits.idle_timeout {
                // Output has waited a whole idle timeout without the peer reading a byte:
                // it is not reading (or gone); its buffers are released.
                tracing::warn!(service = self.service.name(), peer = %conn.peer,
                    pending_bytes = conn.transport.pending_output_bytes(),
                    "the peer has not read what it was sent for the idle timeout; closing");
                let reason = format!(
                    "the peer did not read for {} s",
                    self.limits.idle_timeout.as_secs()
                );
                self.remove(token, CloseReason::Io(reason));
                continue;
            }
            if conn.read_paused || conn.output_paused {
                // Time the server itself is not reading does not make the peer idle.
                conn.last_input_at = now;
            }
            let was_paused = conn.read_paused;
            let (session, _, mut io) = conn.split(now);
            session.on_tick(&mut io);
            if was_paused && !conn.read_paused {
                self.ready.push_back(token);
            }
            let established = conn.session.is_established() && !conn.transport.is_handshaking();
            let kind = if conn.lifecycle.owed > 0 {
                // The peer waits on the server, not the other way round.
                self.finish(token, now);
                continue;
            } else if !established
                && now.duration_since(conn.opened_at) > self.limits.handshake_timeout
            {
                TimeoutKind::Handshake
            } else if now.duration_since(conn.last_input_at) > self.limits.idle_timeout {
                TimeoutKind::Idle
            } else {
                self.finish(token, now);
                continue;
            };
            if kind == TimeoutKind::Handshake && self.handshake_timeout_log.admit(now) {
                tracing::warn!(service = self.service.name(), peer = %conn.peer,
                    tls_done = !conn.transport.is_handshaking(),
                    "no handshake in time; closing (further ones are counted, one line every 10 s)");
            }
            let (session, _, mut io) = conn.split(now);
            session.on_timeout(kind, &mut io);
            self.finish(token, now);
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(now + self.limits.shutdown_timeout);
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        for token in self.conns.tokens() {
            let Some(conn) = self.conns.get_mut(token) else {
                continue;
            };
            conn.lifecycle.stopping = true;
            conn.read_paused = true;
            let (session, _, mut io) = conn.split(now);
            session.on_shutdown(&mut io);
            self.finish(token, now);
        }
    }

    fn shutdown_done(&mut self, now: Instant) -> bool {
        let Some(deadline) = self.shutdown_deadline else {
            return false;
        };
        if self.conns.len() == 0 {
            return true;
        }
        if now >= deadline {
            tracing::warn!(loop_name = %self.name, open = self.conns.len(),
                "shutdown timeout: closing connections with work still in flight");
            self.close_all(CloseReason::Shutdown);
            return true;
        }
        false
    }

    fn close_all(&mut self, reason: CloseReason) {
        for token in self.conns.tokens() {
            self.remove(token, reason.clone());
        }
    }
}
