//! esserver as a systemd service: the notify protocol against a fake notify socket (a Unix
//! datagram socket the test binds and names in `NOTIFY_SOCKET`): READY once the server
//! serves, WATCHDOG=1 pings at the interval `WATCHDOG_USEC` asks, RELOADING/READY around a
//! SIGHUP, STOPPING at SIGTERM. SIGHUP applies a changed log level and `reserve_bytes`, and
//! refuses a broken ini with the message a start gives, keeping every setting.

#![cfg(unix)]

mod common;

use es_loadtest::spawn::{ServerProcess, SpawnOptions};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

fn signal(server: &ServerProcess, signal: i32) {
    // SAFETY: kill with the child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(server.pid() as i32, signal) }, 0);
}

/// Datagrams received until one contains `wanted` (or the time is up).
fn receive_until(socket: &UnixDatagram, wanted: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else {
            break;
        };
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = message.lines().any(|line| line == wanted);
        got.push(message);
        if done {
            return got;
        }
    }
    panic!("no {wanted} within {within:?}; received {got:?}");
}

#[test]
fn the_service_manager_hears_ready_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut options = SpawnOptions::new(common::esserver_path(), dir.path().join("data"));
    // Standard error is "the journal": JOURNAL_STREAM names its device and inode.
    let log = dir.path().join("server.log");
    std::fs::write(&log, "").unwrap();
    let stream = {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&log).unwrap();
        format!("{}:{}", meta.dev(), meta.ino())
    };
    options.log_file = Some(log.clone());
    options.env = vec![
        (
            "NOTIFY_SOCKET".into(),
            socket_path.to_string_lossy().into_owned(),
        ),
        // 400 ms: a ping every 200 ms.
        ("WATCHDOG_USEC".into(), "400000".into()),
        ("JOURNAL_STREAM".into(), stream),
    ];
    let mut server = ServerProcess::spawn(options).expect("esserver starts");

    let ready = receive_until(&socket, "READY=1", Duration::from_secs(30));
    assert!(
        ready.last().unwrap().contains("STATUS=serving"),
        "{ready:?}"
    );
    // Ready means serving: the web port answers.
    let mut http = es_client::http::HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    );
    assert_eq!(http.get("/healthz", &[]).unwrap().status, 200);

    // The watchdog, from the main loop: several pings in a second and a half.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 4 {
        receive_until(&socket, "WATCHDOG=1", Duration::from_secs(3));
        pings += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(3), "pings too slow");

    // A reload is announced and ended with READY.
    signal(&server, libc::SIGHUP);
    let reload = receive_until(&socket, "RELOADING=1", Duration::from_secs(10));
    assert!(
        reload.last().unwrap().contains("MONOTONIC_USEC="),
        "{reload:?}"
    );
    receive_until(&socket, "READY=1", Duration::from_secs(10));

    // SIGTERM: STOPPING, then a clean exit.
    signal(&server, libc::SIGTERM);
    receive_until(&socket, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
    // The journal stamps each line itself: the server's lines start with their level.
    let text = std::fs::read_to_string(&log).unwrap();
    let running = text
        .lines()
        .find(|l| l.contains("esserver is running"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        running.starts_with(" INFO ") || running.starts_with("INFO "),
        "{running}"
    );
    assert!(!running.contains("\u{1b}["), "no colours: {running}");
}

fn wait_for_log(path: &std::path::Path, wanted: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(wanted) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} in the log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_applies_the_log_level_and_reserve_and_refuses_a_broken_ini() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut options = SpawnOptions::new(common::esserver_path(), dir.path().join("data"));
    options.log_file = Some(log.clone());
    options.extra_config = "[Storage]\nreserve_bytes = 64 MiB\n".into();
    let mut server = ServerProcess::spawn(options).expect("esserver starts");
    let data = server.data_dir().to_path_buf();
    let reserve = |data: &std::path::Path| {
        common::admin_json(data, &["status"])["disk_reserve_bytes"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(reserve(&data), 64 << 20);

    // A changed log level and reserve, and a changed viewer port (a restart's business).
    let path = server.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text
        .replace("log_level = info", "log_level = debug")
        .replace("reserve_bytes = 64 MiB", "reserve_bytes = 96 MiB");
    assert_ne!(changed, text);
    let changed = changed.replacen(
        "[ViewerTransport]\nbind = 127.0.0.1",
        "[ViewerTransport]\nbind = 127.0.0.2",
        1,
    );
    std::fs::write(&path, &changed).unwrap();
    let debug_lines = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap()
            .matches(" DEBUG ")
            .count()
    };
    assert_eq!(debug_lines(&log), 0, "at level info, no debug line");
    signal(&server, libc::SIGHUP);
    let text = wait_for_log(&log, "configuration reloaded");
    let line = text
        .lines()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    assert!(line.contains("log_level info -> debug"), "{line}");
    assert!(
        line.contains("reserve_bytes 67108864 -> 100663296"),
        "{line}"
    );
    assert!(line.contains("needs_restart=[ViewerTransport]"), "{line}");
    assert_eq!(reserve(&data), 96 << 20);
    // Debug lines appear now (a connection opened logs one).
    let before = debug_lines(&log);
    let mut http = es_client::http::HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    );
    assert_eq!(http.get("/healthz", &[]).unwrap().status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while debug_lines(&log) == before {
        assert!(Instant::now() < deadline, "no debug line after the reload");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A broken ini: refused with the message a start gives, nothing changed.
    std::fs::write(
        &path,
        changed.replace("reserve_bytes = 96 MiB", "reserve_bytes = lots"),
    )
    .unwrap();
    let start = std::process::Command::new(common::esserver_path())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!start.status.success());
    let message = String::from_utf8_lossy(&start.stderr)
        .trim()
        .strip_prefix("esserver: ")
        .expect("an esserver error")
        .to_string();
    assert!(message.contains("EmbryoServer.ini:"), "{message}");
    signal(&server, libc::SIGHUP);
    wait_for_log(&log, &format!("reload refused: {message}"));
    assert_eq!(reserve(&data), 96 << 20, "the settings in force are kept");
    assert!(server.is_running());
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
}
