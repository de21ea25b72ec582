//! The event loop end to end: a line protocol whose answers come back from another thread
//! (as storage completions do), over plain TCP and TLS, with shutdown draining in-flight work.

use bytes::{Buf, BytesMut};
use crossbeam_channel::{Receiver, Sender};
use es_net::client::{ClientConn, ClientTls};
use es_net::{CloseReason, ConnHandle, NetLimits, Pool, PoolConfig, Service, Session, SessionIo};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Upper-cases each line on a "worker" thread and answers through the connection handle.
struct UpperService {
    jobs: Sender<(ConnHandle<String>, String)>,
    closed: Arc<AtomicUsize>,
}

/// Keeps no lifecycle of its own: the loop counts what it owes (`owe`, `answered`) and holds
/// timeouts, a half-close and shutdown while anything is.
struct UpperSession {
    handle: ConnHandle<String>,
    jobs: Sender<(ConnHandle<String>, String)>,
    closed: Arc<AtomicUsize>,
}

impl Service for UpperService {
    type Msg = String;
    type Session = UpperSession;
    fn name(&self) -> &'static str {
        "upper"
    }
    fn open(&self, _peer: SocketAddr, handle: ConnHandle<String>, _now: Instant) -> UpperSession {
        UpperSession {
            handle,
            jobs: self.jobs.clone(),
            closed: self.closed.clone(),
        }
    }
}

impl Session for UpperSession {
    type Msg = String;
    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&input[..end]).into_owned();
            input.advance(end + 1);
            if line == "quit" {
                io.close(CloseReason::Requested("quit".into()));
                return;
            }
            io.owe();
            self.jobs.send((self.handle.clone(), line)).unwrap();
        }
    }
    fn on_message(&mut self, message: String, io: &mut SessionIo<'_>) {
        io.answered();
        io.write(message.as_bytes());
        io.write(b"\n");
    }
    fn on_closed(&mut self, _reason: &CloseReason) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
    fn is_established(&self) -> bool {
        true
    }
}

fn start(
    tls: Option<Arc<rustls::ServerConfig>>,
    delay: Duration,
) -> (Pool, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    start_with(tls, delay, NetLimits::default())
}

fn start_with(
    tls: Option<Arc<rustls::ServerConfig>>,
    delay: Duration,
    limits: NetLimits,
) -> (Pool, Arc<AtomicUsize>, std::thread::JoinHandle<()>) {
    let (jobs, queue): (Sender<(ConnHandle<String>, String)>, Receiver<_>) =
        crossbeam_channel::bounded(1024);
    let worker = std::thread::spawn(move || {
        for (handle, line) in queue {
            std::thread::sleep(delay);
            handle.send(line.to_uppercase());
        }
    });
    let closed = Arc::new(AtomicUsize::new(0));
    let service = Arc::new(UpperService {
        jobs,
        closed: closed.clone(),
    });
    let config = PoolConfig {
        name: "upper".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        workers: 2,
        limits,
        tls,
    };
    (Pool::start(config, service).unwrap(), closed, worker)
}

fn read_lines(conn: &mut ClientConn, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while lines.len() < count && Instant::now() < deadline {
        conn.pump(deadline).unwrap();
        let input = conn.input();
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            lines.push(String::from_utf8_lossy(&input[..end]).into_owned());
            input.advance(end + 1);
        }
        if conn.is_eof() {
            break;
        }
    }
    lines
}

#[test]
fn answers_from_another_thread_reach_every_connection_over_plain_tcp() {
    let (pool, _closed, _worker) = start(None, Duration::ZERO);
    let addr = pool.local_addr();
    let mut conns: Vec<ClientConn> = (0..8)
        .map(|_| ClientConn::connect(addr, &ClientTls::Plain, Duration::from_secs(5)).unwrap())
        .collect();
    for (index, conn) in conns.iter_mut().enumerate() {
        for n in 0..50 {
            conn.queue(format!("conn{index} line{n}\n").as_bytes());
        }
    }
    for (index, conn) in conns.iter_mut().enumerate() {
        let lines = read_lines(conn, 50);
        let expected: Vec<String> = (0..50).map(|n| format!("CONN{index} LINE{n}")).collect();
        assert_eq!(
            lines, expected,
            "connection {index} got every answer in order"
        );
    }
    pool.begin_shutdown();
    pool.join();
}

#[test]
fn tls_round_trip_with_a_pinned_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, created) =
        es_net::tls::ensure_self_signed(dir.path(), &["localhost".into()]).unwrap();
    assert!(created);
    let (_, _, created_again) =
        es_net::tls::ensure_self_signed(dir.path(), &["localhost".into()]).unwrap();
    assert!(!created_again, "an existing certificate is kept");
    let server = es_net::tls::server_config(&cert, &key).unwrap();
    let (pool, _closed, _worker) = start(Some(server), Duration::ZERO);
    let pinned = es_net::tls::read_certificate(&cert).unwrap();
    let tls = ClientTls::Tls {
        config: es_net::tls::pinned_client_config(pinned),
        server_name: "localhost".try_into().unwrap(),
    };
    let mut conn = ClientConn::connect(pool.local_addr(), &tls, Duration::from_secs(5)).unwrap();
    conn.queue(b"hello tls\n");
    assert_eq!(read_lines(&mut conn, 1), vec!["HELLO TLS".to_string()]);

    // A client pinning another certificate refuses the server.
    let other = tempfile::tempdir().unwrap();
    let (other_cert, _, _) =
        es_net::tls::ensure_self_signed(other.path(), &["localhost".into()]).unwrap();
    let wrong = ClientTls::Tls {
        config: es_net::tls::pinned_client_config(
            es_net::tls::read_certificate(&other_cert).unwrap(),
        ),
        server_name: "localhost".try_into().unwrap(),
    };
    let mut refused =
        ClientConn::connect(pool.local_addr(), &wrong, Duration::from_secs(5)).unwrap();
    refused.queue(b"hello\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut failed = false;
    while Instant::now() < deadline && !failed {
        match refused.pump(deadline) {
            Err(_) => failed = true,
            Ok(_) if refused.is_eof() => failed = true,
            Ok(_) => assert!(
                refused.input().is_empty(),
                "no plaintext may pass a failed pin"
            ),
        }
    }
    assert!(
        failed,
        "the handshake must fail against a different pinned certificate"
    );
    pool.begin_shutdown();
    pool.join();
}

#[test]
fn shutdown_finishes_in_flight_work_before_closing() {
    let (pool, closed, _worker) = start(None, Duration::from_millis(20));
    let mut conn =
        ClientConn::connect(pool.local_addr(), &ClientTls::Plain, Duration::from_secs(5)).unwrap();
    for n in 0..10 {
        conn.queue(format!("job{n}\n").as_bytes());
    }
    // Make sure the requests reached the server before the shutdown starts.
    let first = read_lines(&mut conn, 1);
    assert_eq!(first, vec!["JOB0".to_string()]);
    pool.begin_shutdown();
    let rest = read_lines(&mut conn, 9);
    assert_eq!(
        rest.len(),
        9,
        "every in-flight request is answered during shutdown: {rest:?}"
    );
    pool.join();
    assert_eq!(closed.load(Ordering::SeqCst), 1);
}

#[test]
fn stale_handles_are_harmless_and_connection_count_returns_to_zero() {
    let (pool, closed, _worker) = start(None, Duration::ZERO);
    let mut conn =
        ClientConn::connect(pool.local_addr(), &ClientTls::Plain, Duration::from_secs(5)).unwrap();
    conn.queue(b"a\nquit\n");
    let lines = read_lines(&mut conn, 2);
    assert!(lines.len() <= 1, "nothing after quit: {lines:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats().connections_open(), 0);
    pool.begin_shutdown();
    pool.join();
}

/// The loop keeps a connection whose peer half-closed until every request it sent is
/// answered, and does not time out a peer that waits on the server: answers slower than the
/// idle timeout still arrive, and the connection then closes by itself.
#[test]
fn a_half_closed_peer_gets_every_answer_even_past_the_idle_timeout() {
    let limits = NetLimits {
        idle_timeout: Duration::from_millis(300),
        ..NetLimits::default()
    };
    let (pool, closed, _worker) = start_with(None, Duration::from_millis(100), limits);
    let mut conn =
        ClientConn::connect(pool.local_addr(), &ClientTls::Plain, Duration::from_secs(5)).unwrap();
    for n in 0..8 {
        conn.queue(format!("late{n}\n").as_bytes());
    }
    conn.flush_until(Instant::now() + Duration::from_secs(5))
        .unwrap();
    conn.shutdown_write();
    // 8 answers 100 ms apart: 800 ms, well past the 300 ms idle timeout.
    let lines = read_lines(&mut conn, 9);
    let expected: Vec<String> = (0..8).map(|n| format!("LATE{n}")).collect();
    assert_eq!(lines, expected, "every answer, then the end of the stream");
    assert!(conn.is_eof(), "the server closed once nothing was owed");
    let deadline = Instant::now() + Duration::from_secs(10);
    while closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(closed.load(Ordering::SeqCst), 1);
    pool.begin_shutdown();
    pool.join();
}
