//! The viewer interface (port 3010): login, rights, reads, time-lapse playback, durable
//! writes with version checks, and change notices pushed to every logged-in viewer.
//!
//! Threads: the session runs on its event loop and never blocks it. Password checks and
//! storage reads run on the worker pool ([`crate::workers`]); writes go to the storage writer
//! and are answered once durable; every commit that logs changes wakes the logged-in sessions
//! (through [`Hub`]), which push the new change-log entries in seq order. A playback streams
//! in chunks of [`CHUNK_FRAMES`], one chunk queued at a time, and only while the connection's
//! unsent output is below [`es_net::STREAM_OUTPUT_HIGH_BYTES`]: TCP flow control paces it, and other
//! viewers' requests interleave with its chunks on the worker queue.
//!
//! [`core::ViewerCore`] holds the protocol logic with its environment injected ([`core::Io`]:
//! the connection, the clock, the worker pool); [`ViewerSession`] is its adapter to es-net.

pub mod auth;
mod convert;
pub mod core;

use self::core::{Deliver, Io, Job, ViewerCore};
use crate::accounts::LoginCheck;
use crate::disk_guard::DiskState;
use crate::workers::Workers;
use auth::{Notice, Peer, Sessions};
use bytes::BytesMut;
use es_net::{CloseReason, ConnHandle, Fallback, Service, Session, SessionIo, TimeoutKind};
use es_proto::viewer::pb::server_message::Body;
use es_proto::viewer::ServerLimits;
use es_storage::{Edit, FrameChunk, LoginAttempt, OpResult, Rights, StorageError, Store, Writer};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames read per worker job of a playback.
pub const CHUNK_FRAMES: u32 = 8;

/// Messages delivered to a viewer connection from other threads.
pub enum ViewerMsg {
    /// A worker checked a Login's password.
    LoginChecked {
        seq: u64,
        user: String,
        computer: String,
        changes_after: u64,
        check: LoginCheck,
    },
    /// The storage writer recorded a checked login (failure count, audit).
    LoginRecorded {
        seq: u64,
        user: String,
        computer: String,
        rights: Rights,
        changes_after: u64,
        success: bool,
        result: OpResult<LoginAttempt>,
    },
    /// A read finished on a worker.
    Reply { seq: u64, body: Body },
    /// A write is durable (or refused).
    Saved { seq: u64, result: OpResult<Edit> },
    /// A playback chunk was read: frames, or None when the embryo is unknown.
    Frames {
        seq: u64,
        result: Result<Option<FrameChunk>, StorageError>,
    },
    /// New changes were committed.
    ChangesCommitted,
    /// The session was resumed on another connection.
    Superseded,
    /// An administrator disabled the account: the connection ends at once.
    AccountDisabled,
}

/// A logged-in connection, its "a wake-up is queued" flag, and who it is (for status pages).
type Member = (Peer, Arc<AtomicBool>, ViewerSnapshot);

/// A logged-in viewer connection, as status pages show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewerSnapshot {
    pub user: String,
    pub computer: String,
    pub peer: String,
    pub since_ms: i64,
}

/// The logged-in connections to wake when changes are committed.
#[derive(Default)]
pub struct Hub {
    members: Mutex<HashMap<u64, Member>>,
    committed_seq: AtomicU64,
}

impl Hub {
    fn committed(&self, seq: u64) {
        self.committed_seq.fetch_max(seq, Ordering::AcqRel);
        let members = self.members.lock();
        for (peer, wake_pending, _) in members.values() {
            if !wake_pending.swap(true, Ordering::AcqRel) && !peer.notify(Notice::ChangesCommitted)
            {
                // Its loop is busy: the session catches up at its next tick.
                wake_pending.store(false, Ordering::Release);
            }
        }
    }

    fn join(&self, peer: Peer, wake_pending: Arc<AtomicBool>, who: ViewerSnapshot) {
        self.members
            .lock()
            .insert(peer.id, (peer, wake_pending, who));
    }

    /// Ends every logged-in connection of `user` (the account was disabled); returns how many.
    pub fn disconnect_user(&self, user: &str) -> usize {
        let members = self.members.lock();
        let mut ended = 0;
        for (peer, _, who) in members.values() {
            if who.user == user && peer.notify(Notice::AccountDisabled) {
                ended += 1;
            }
        }
        ended
    }

    /// The logged-in viewer connections, by user then computer.
    pub fn snapshot(&self) -> Vec<ViewerSnapshot> {
        let mut list: Vec<ViewerSnapshot> = self
            .members
            .lock()
            .values()
            .map(|(_, _, who)| who.clone())
            .collect();
        list.sort_by(|a, b| (&a.user, &a.computer).cmp(&(&b.user, &b.computer)));
        list
    }

    fn leave(&self, connection_id: u64) {
        self.members.lock().remove(&connection_id);
    }

    /// The newest change-log seq a commit announced.
    pub fn committed_seq(&self) -> u64 {
        self.committed_seq.load(Ordering::Acquire)
    }

    /// Logged-in connections.
    pub fn len(&self) -> usize {
        self.members.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of the viewer service.
#[derive(Debug, Clone)]
pub struct ViewerSettings {
    pub limits: ServerLimits,
    pub login_failures_max: u32,
    pub lockout_ms: i64,
    pub session_resume: Duration,
    /// Sessions (connected or waiting for a resume) at most.
    pub sessions_max: usize,
    /// `[Server] activity`: stored curves are served even while they lag.
    pub activity_background: bool,
}

pub struct ViewerService {
    shared: Arc<Shared>,
}

/// What every viewer connection's core shares.
pub(crate) struct Shared {
    store: Store,
    writer: Writer,
    workers: Workers,
    disk: Arc<DiskState>,
    licensing: Arc<crate::license::Licensing>,
    settings: ViewerSettings,
    sessions: Sessions,
    hub: Arc<Hub>,
}

impl ViewerService {
    pub fn new(
        store: Store,
        writer: Writer,
        workers: Workers,
        disk: Arc<DiskState>,
        licensing: Arc<crate::license::Licensing>,
        settings: ViewerSettings,
    ) -> ViewerService {
        let hub = Arc::new(Hub::default());
        if let Ok(seq) = store.read().and_then(|r| r.last_change_seq()) {
            hub.committed_seq.store(seq, Ordering::Release);
        }
        let listener_hub = hub.clone();
        store.on_commit(Box::new(move |seq| listener_hub.committed(seq)));
        ViewerService {
            shared: Arc::new(Shared {
                store,
                writer,
                workers,
                disk,
                licensing,
                sessions: Sessions::new(settings.session_resume, settings.sessions_max),
                settings,
                hub,
            }),
        }
    }

    /// The logged-in connections, for status reports.
    pub fn hub(&self) -> Arc<Hub> {
        self.shared.hub.clone()
    }

    /// A new connection's core (the adapter's, or the simulation's own).
    pub(crate) fn core(&self, me: Peer, peer: SocketAddr, entropy: crate::Entropy) -> ViewerCore {
        ViewerCore::new(self.shared.clone(), me, peer, entropy)
    }
}

impl Service for ViewerService {
    type Msg = ViewerMsg;
    type Session = ViewerSession;

    fn name(&self) -> &'static str {
        "viewer"
    }

    fn open(
        &self,
        peer: SocketAddr,
        handle: ConnHandle<ViewerMsg>,
        _now: Instant,
    ) -> ViewerSession {
        let notified = handle.clone();
        let me = Peer::new(
            handle.id(),
            Arc::new(move |notice| match notice {
                // Never block a loop (or the writer thread) on a busy loop's queue: a missed
                // wake-up is caught up at the next tick, a missed supersede by the timers.
                Notice::ChangesCommitted => notified.try_send(ViewerMsg::ChangesCommitted),
                Notice::Superseded => notified.try_send(ViewerMsg::Superseded),
                Notice::AccountDisabled => notified.send(ViewerMsg::AccountDisabled),
            }),
        );
        ViewerSession {
            core: self.core(me, peer, crate::system_entropy()),
            workers: self.shared.workers.clone(),
            handle,
        }
    }
}

/// The adapter of a [`ViewerCore`] to es-net: the core's [`Io`] over the live connection,
/// the worker pool and the connection's message queue.
pub struct ViewerSession {
    core: ViewerCore,
    workers: Workers,
    handle: ConnHandle<ViewerMsg>,
}

/// [`Io`] over one es-net callback.
struct NetIo<'s, 'io, 'c> {
    io: &'s mut SessionIo<'io>,
    workers: &'c Workers,
    handle: &'c ConnHandle<ViewerMsg>,
}

impl Io for NetIo<'_, '_, '_> {
    fn write(&mut self, bytes: &[u8]) {
        self.io.write(bytes);
    }
    fn close(&mut self, reason: String) {
        self.io.close(CloseReason::Requested(reason));
    }
    fn is_closing(&self) -> bool {
        self.io.is_closing()
    }
    fn is_stopping(&self) -> bool {
        self.io.is_stopping()
    }
    fn owe(&mut self) {
        self.io.owe();
    }
    fn answered(&mut self) {
        self.io.answered();
    }
    fn owes(&self) -> bool {
        self.io.owes()
    }
    fn pending_output_bytes(&self) -> usize {
        self.io.pending_output_bytes()
    }
    fn pause_reading(&mut self) {
        self.io.pause_reading();
    }
    fn resume_reading(&mut self) {
        self.io.resume_reading();
    }
    fn is_reading_paused(&self) -> bool {
        self.io.is_reading_paused()
    }
    fn now(&self) -> Instant {
        self.io.now()
    }
    fn now_ms(&self) -> i64 {
        crate::now_ms()
    }
    fn run(&mut self, job: Job, fallback: ViewerMsg) -> bool {
        let handle = self.handle.clone();
        let work = Box::new(move || {
            let guard = Fallback::new(&handle, fallback);
            let message = job();
            guard.disarm();
            handle.send(message);
        });
        self.workers.try_run(work).is_ok()
    }
    fn deliver(&self) -> Deliver {
        let handle = self.handle.clone();
        Arc::new(move |message| {
            handle.send(message);
        })
    }
}

impl ViewerSession {
    fn io<'s, 'io>(
        &'s mut self,
        io: &'s mut SessionIo<'io>,
    ) -> (&'s mut ViewerCore, NetIo<'s, 'io, 's>) {
        let net = NetIo {
            io,
            workers: &self.workers,
            handle: &self.handle,
        };
        (&mut self.core, net)
    }
}

impl Session for ViewerSession {
    type Msg = ViewerMsg;

    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_input(input, &mut io);
    }

    fn on_message(&mut self, message: ViewerMsg, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_message(message, &mut io);
    }

    fn on_output_drained(&mut self, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_output_drained(&mut io);
    }

    fn on_tick(&mut self, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_tick(&mut io);
    }

    fn on_timeout(&mut self, kind: TimeoutKind, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_timeout(kind, &mut io);
    }

    fn on_shutdown(&mut self, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_shutdown(&mut io);
    }

    fn on_shutdown_done(&mut self, io: &mut SessionIo<'_>) {
        let (core, mut io) = self.io(io);
        core.on_shutdown_done(&mut io);
    }

    fn on_closed(&mut self, reason: &CloseReason) {
        self.core.on_closed(&reason.to_string(), Instant::now());
    }

    fn is_established(&self) -> bool {
        self.core.is_established()
    }
}
