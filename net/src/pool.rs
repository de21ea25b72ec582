//! A worker pool: one listener (one bind address, so one NIC) and N event loops, each on its
//! own thread. The loop that owns the listener accepts and deals connections out round
//! robin; every connection then lives on one loop for its whole life.

use crate::event_loop::{new_handle, LoopHandle, Service, Worker};
use crate::limits::NetLimits;
use mio::net::TcpListener;
use mio::Poll;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How a pool is set up.
#[derive(Clone)]
pub struct PoolConfig {
    /// The service's name, for thread names and logs.
    pub name: String,
    pub bind: SocketAddr,
    /// Event loops (threads); 0 means one per core.
    pub workers: usize,
    pub limits: NetLimits,
    /// `None` is plain TCP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Counters of one pool, shared by its loops.
#[derive(Debug, Default)]
pub struct PoolStats {
    connections_open: AtomicU32,
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    connections_refused_per_address: AtomicU64,
    connections_evicted: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Open connections per peer address; an address leaves the map when its count is 0,
    /// so the map never holds more entries than there are open connections.
    per_address: Mutex<HashMap<IpAddr, u32>>,
}

/// Whether an accepted connection may stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    Admitted,
    /// The pool holds `connections_max` connections.
    PoolFull,
    /// The peer's address holds `connections_per_address_max` connections.
    AddressFull,
}

impl PoolStats {
    /// Counts a new connection from `peer` unless the pool's or the address's limit is
    /// reached.
    pub(crate) fn try_open(&self, peer: IpAddr, limit: u32, per_address_max: u32) -> Admission {
        let mut per_address = self.per_address.lock();
        let from_peer = per_address.get(&peer).copied().unwrap_or(0);
        let admission = if from_peer >= per_address_max {
            Admission::AddressFull
        } else if self
            .connections_open
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |open| {
                (open < limit).then_some(open + 1)
            })
            .is_err()
        {
            Admission::PoolFull
        } else {
            per_address.insert(peer, from_peer + 1);
            Admission::Admitted
        };
        drop(per_address);
        match admission {
            Admission::Admitted => &self.connections_accepted,
            Admission::PoolFull => &self.connections_refused,
            Admission::AddressFull => &self.connections_refused_per_address,
        }
        .fetch_add(1, Ordering::Relaxed);
        admission
    }

    /// A connection admitted by [`PoolStats::try_open`] is gone.
    pub(crate) fn closed(&self, peer: IpAddr) {
        {
            let mut per_address = self.per_address.lock();
            match per_address.get_mut(&peer) {
                Some(count) if *count > 1 => *count -= 1,
                Some(_) => {
                    per_address.remove(&peer);
                }
                None => {
                    tracing::error!(%peer, "a connection closed that was never counted (a bug)")
                }
            }
        }
        let previous = self.connections_open.fetch_sub(1, Ordering::SeqCst);
        assert!(previous > 0, "connection count went below zero");
    }

    pub(crate) fn evicted(&self) {
        self.connections_evicted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_bytes_in(&self, count: u64) {
        self.bytes_in.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn add_bytes_out(&self, count: u64) {
        self.bytes_out.fetch_add(count, Ordering::Relaxed);
    }

    pub fn connections_open(&self) -> u32 {
        self.connections_open.load(Ordering::SeqCst)
    }

    pub fn connections_accepted(&self) -> u64 {
        self.connections_accepted.load(Ordering::Relaxed)
    }

    /// Connections refused because the pool was full.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Connections refused because their address already held its share.
    pub fn connections_refused_per_address(&self) -> u64 {
        self.connections_refused_per_address.load(Ordering::Relaxed)
    }

    /// Connections that had not completed their handshake, dropped to make room for a newer
    /// one (the bound on unauthenticated connections).
    pub fn connections_evicted(&self) -> u64 {
        self.connections_evicted.load(Ordering::Relaxed)
    }

    /// Addresses with at least one open connection.
    pub fn addresses_open(&self) -> usize {
        self.per_address.lock().len()
    }

    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Ordering::Relaxed)
    }

    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Ordering::Relaxed)
    }
}

/// A running pool.
pub struct Pool {
    name: String,
    local_addr: SocketAddr,
    shutdown: Vec<Box<dyn Fn() + Send + Sync>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<PoolStats>,
}

impl Pool {
    /// Binds the listener (so a taken port is reported here, before anything runs) and
    /// starts the loops.
    pub fn start<S: Service>(config: PoolConfig, service: Arc<S>) -> io::Result<Pool> {
        let workers = if config.workers == 0 {
            default_workers()
        } else {
            config.workers
        };
        let listener = TcpListener::bind(config.bind)?;
        let local_addr = listener.local_addr()?;
        let stats = Arc::new(PoolStats::default());
        let mut polls = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let poll = Poll::new()?;
            let (handle, receiver) = new_handle::<S::Msg>(&poll, config.limits.loop_queue_max)?;
            polls.push(poll);
            handles.push(handle);
            receivers.push(receiver);
        }
        let mut listener = Some(listener);
        let mut threads = Vec::with_capacity(workers);
        for (index, (poll, receiver)) in polls.into_iter().zip(receivers).enumerate() {
            let worker = Worker::new(
                format!("{}-{}", config.name, index),
                poll,
                if index == 0 { listener.take() } else { None },
                receiver,
                handles[index].clone(),
                handles.clone(),
                service.clone(),
                config.tls.clone(),
                config.limits.clone(),
                stats.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("es-{}-{}", config.name, index))
                .spawn(move || {
                    // A panic on a loop would leave its connections and its share of new ones
                    // in limbo; stop the whole process instead, so a supervisor restarts it (an
                    // unacknowledged request is simply re-sent by its client).
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| worker.run()));
                    if result.is_err() {
                        tracing::error!("an event loop panicked; aborting the process");
                        std::process::abort();
                    }
                })?;
            threads.push(thread);
        }
        let shutdown = handles
            .into_iter()
            .map(|handle: LoopHandle<S::Msg>| {
                Box::new(move || handle.shutdown()) as Box<dyn Fn() + Send + Sync>
            })
            .collect();
        Ok(Pool {
            name: config.name,
            local_addr,
            shutdown,
            threads,
            stats,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bound address (the real port when the configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> &Arc<PoolStats> {
        &self.stats
    }

    /// Asks every loop to stop: no more accepts, sessions finish their in-flight work.
    pub fn begin_shutdown(&self) {
        for shutdown in &self.shutdown {
            shutdown();
        }
    }

    /// Waits for every loop to finish (after [`Pool::begin_shutdown`]).
    pub fn join(self) {
        for thread in self.threads {
            if thread.join().is_err() {
                tracing::error!(pool = %self.name, "an event loop thread panicked");
            }
        }
    }
}

/// One loop per core by default.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}
