//! Floods and slow peers at the event loop: the per-address connection cap, the bound on
//! unauthenticated connections (the oldest is dropped for a newcomer), and the handshake
//! timeout counted from the accept, so a peer dribbling bytes is closed too.

use bytes::{Buf, BytesMut};
use es_net::{CloseReason, ConnHandle, NetLimits, Pool, PoolConfig, Service, Session, SessionIo};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A line protocol whose handshake is the line `hello`; after it, lines are echoed.
struct HelloService;

struct HelloSession {
    established: bool,
}

impl Service for HelloService {
    type Msg = ();
    type Session = HelloSession;
    fn name(&self) -> &'static str {
        "hello"
    }
    fn open(&self, _peer: SocketAddr, _handle: ConnHandle<()>, _now: Instant) -> HelloSession {
        HelloSession { established: false }
    }
}

impl Session for HelloSession {
    type Msg = ();
    fn on_input(&mut self, input: &mut BytesMut, io: &mut SessionIo<'_>) {
        while let Some(end) = input.iter().position(|&b| b == b'\n') {
            let line = input[..end].to_vec();
            input.advance(end + 1);
            if self.established {
                io.write(&line);
                io.write(b"\n");
            } else if line == b"hello" {
                self.established = true;
                io.write(b"welcome\n");
            } else {
                io.close(CloseReason::Requested("expected hello".into()));
                return;
            }
        }
    }
    fn on_message(&mut self, _message: (), _io: &mut SessionIo<'_>) {}
    fn on_shutdown(&mut self, io: &mut SessionIo<'_>) {
        io.close(CloseReason::Shutdown);
    }
    fn on_closed(&mut self, _reason: &CloseReason) {}
    fn is_established(&self) -> bool {
        self.established
    }
}

fn start(workers: usize, limits: NetLimits) -> Pool {
    let config = PoolConfig {
        name: "hello".into(),
        bind: "127.0.0.1:0".parse().unwrap(),
        workers,
        limits,
        tls: None,
    };
    Pool::start(config, std::sync::Arc::new(HelloService)).unwrap()
}

fn connect(pool: &Pool) -> TcpStream {
    let stream = TcpStream::connect(pool.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    stream
}

/// True once the server has closed the connection (EOF or reset) within `wait`.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buffer = [0u8; 256];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Sends a line and waits for `expected` back.
fn talks(stream: &mut TcpStream, line: &str, expected: &str) -> bool {
    if stream.write_all(format!("{line}\n").as_bytes()).is_err() {
        return false;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    let mut buffer = [0u8; 256];
    while Instant::now() < deadline {
        match stream.read(&mut buffer) {
            Ok(0) => return false,
            Ok(n) => {
                got.extend_from_slice(&buffer[..n]);
                if got.ends_with(b"\n") {
                    return got == format!("{expected}\n").as_bytes();
                }
            }
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return false,
        }
    }
    false
}

fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn an_address_over_its_cap_is_refused_at_accept_and_admitted_again_when_one_closes() {
    let pool = start(
        2,
        NetLimits {
            connections_per_address_max: 3,
            ..NetLimits::default()
        },
    );
    let mut admitted: Vec<TcpStream> = (0..3).map(|_| connect(&pool)).collect();
    for stream in &mut admitted {
        assert!(talks(stream, "hello", "welcome"));
    }
    let mut over: Vec<TcpStream> = (0..2).map(|_| connect(&pool)).collect();
    for stream in &mut over {
        assert!(
            closed_within(stream, Duration::from_secs(5)),
            "a connection over the address's cap is closed"
        );
    }
    assert_eq!(pool.stats().connections_refused_per_address(), 2);
    assert_eq!(pool.stats().connections_refused(), 0);
    assert_eq!(pool.stats().connections_open(), 3);
    assert_eq!(pool.stats().addresses_open(), 1);
    for stream in &mut admitted {
        assert!(talks(stream, "still here", "still here"));
    }

    // One closes: the address may open one again.
    drop(admitted.pop());
    assert!(wait_for(|| pool.stats().connections_open() == 2));
    let mut again = connect(&pool);
    assert!(talks(&mut again, "hello", "welcome"));
    assert_eq!(pool.stats().connections_refused_per_address(), 2);

    // Every connection gone: the per-address map is empty again (bounded memory).
    drop(admitted);
    drop(again);
    assert!(wait_for(|| pool.stats().connections_open() == 0));
    assert_eq!(pool.stats().addresses_open(), 0);
    pool.begin_shutdown();
    pool.join();
}

#[test]
fn the_oldest_unauthenticated_connection_is_dropped_for_a_newcomer() {
    // One loop, so its share of the bound is the whole bound.
    let pool = start(
        1,
        NetLimits {
            unauthenticated_max: 4,
            ..NetLimits::default()
        },
    );
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..4 {
        idle.push(connect(&pool));
        assert!(wait_for(
            || pool.stats().connections_open() as usize == idle.len()
        ));
    }
    // The bound is reached: a newcomer takes the place of the oldest.
    let mut device = connect(&pool);
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(5)),
        "the oldest unauthenticated connection is dropped"
    );
    assert!(
        talks(&mut device, "hello", "welcome"),
        "the newcomer is served"
    );
    assert_eq!(pool.stats().connections_evicted(), 1);
    for stream in &mut idle[1..] {
        assert!(!closed_within(stream, Duration::from_millis(100)));
    }

    // The established device is never dropped, however many idle sockets follow; the idle
    // ones go oldest first (3 left of the first four, one newcomer fits, then each of the
    // nine others drops the oldest: the three first, then six of the ten).
    let mut later: Vec<TcpStream> = (0..10).map(|_| connect(&pool)).collect();
    assert!(wait_for(|| pool.stats().connections_evicted() == 10));
    for stream in &mut idle[1..] {
        assert!(closed_within(stream, Duration::from_secs(5)));
    }
    for stream in &mut later[..6] {
        assert!(closed_within(stream, Duration::from_secs(5)));
    }
    for stream in &mut later[6..] {
        assert!(talks(stream, "hello", "welcome"), "the newest are kept");
    }
    assert!(talks(&mut device, "ping", "ping"));
    assert_eq!(pool.stats().connections_open(), 5);
    pool.begin_shutdown();
    pool.join();
}

#[test]
fn a_peer_dribbling_bytes_is_closed_by_the_handshake_timeout() {
    let pool = start(
        1,
        NetLimits {
            handshake_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(60),
            ..NetLimits::default()
        },
    );
    let mut slow = connect(&pool);
    let opened = Instant::now();
    let mut closed = false;
    // One byte of "hellooooo..." every 100 ms: never a complete line, never silent.
    for byte in std::iter::once(b'h')
        .chain(std::iter::repeat(b'o'))
        .take(40)
    {
        if slow.write_all(&[byte]).is_err() || closed_within(&mut slow, Duration::from_millis(100))
        {
            closed = true;
            break;
        }
    }
    let elapsed = opened.elapsed();
    assert!(closed, "a dribbling peer is closed");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "closed by the handshake timeout (after {elapsed:?})"
    );
    drop(slow);
    assert!(wait_for(|| pool.stats().connections_open() == 0));
    pool.begin_shutdown();
    pool.join();
}
