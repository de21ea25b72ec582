//! Shared by the integration tests: a real `esserver` process on loopback, free ports and a
//! temporary data directory, stopped by PID when the test ends.

#![allow(dead_code)]

use es_loadtest::client::{Identity, IncubatorClient};
use es_loadtest::sim::{self, Pacing, Workload};
use es_loadtest::spawn::{ServerProcess, SpawnOptions};
use es_perf::catalog::DeviceModel;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use std::time::Instant;

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn esserver_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_esserver"))
}

/// A server on a fresh temporary data directory (kept alive by the returned guard).
pub fn spawn(incubator_tls: bool) -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = spawn_in(&dir, incubator_tls, "");
    (server, dir)
}

pub fn spawn_in(dir: &tempfile::TempDir, incubator_tls: bool, extra_config: &str) -> ServerProcess {
    let mut options = SpawnOptions::new(esserver_path(), dir.path().join("data"));
    options.incubator_tls = incubator_tls;
    options.extra_config = extra_config.to_string();
    options.log_file = Some(dir.path().join("server.log"));
    if let Ok(level) = std::env::var("ESSERVER_TEST_LOG") {
        options.log_level = level;
    }
    ServerProcess::spawn(options).expect("esserver starts")
}

pub fn server_log(dir: &tempfile::TempDir) -> String {
    std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
}

pub fn identity(serial: &str, model: &str) -> Identity {
    Identity {
        instrument_number: 0,
        serial: serial.into(),
        model: model.into(),
        firmware: "test-1.0".into(),
        secret: String::new(),
    }
}

pub fn connect(server: &ServerProcess, identity: &mut Identity) -> IncubatorClient {
    IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        identity,
        TIMEOUT,
    )
    .expect("incubator connects")
}

/// `esserver <args...> --data <data_dir>` as an administrator runs it (success not checked).
#[allow(dead_code)] // Not every test binary uses it.
pub fn admin(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(esserver_path())
        .args(args)
        .arg("--data")
        .arg(data_dir)
        .output()
        .expect("esserver runs")
}

/// `esserver <args...> --json --data <data_dir>` as an administrator runs it: its JSON, after
/// checking it succeeded (e.g. `["status"]`, `["ims", "status"]`).
pub fn admin_json(data_dir: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let output = Command::new(esserver_path())
        .args(args)
        .args(["--json", "--data"])
        .arg(data_dir)
        .output()
        .expect("esserver runs");
    assert!(
        output.status.success(),
        "esserver {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("esserver printed JSON")
}

/// The first time-lapse start of the uploaded test dishes (Unix ms).
pub const START_MS: i64 = 1_760_000_000_000;

/// Adds a user through the command line, as an administrator would (`--password-stdin`).
pub fn add_user(server: &ServerProcess, name: &str, rights: &str, password: &str) {
    let mut child = Command::new(esserver_path())
        .args([
            "user",
            "add",
            name,
            "--rights",
            rights,
            "--password-stdin",
            "--data",
        ])
        .arg(server.data_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("esserver user add runs");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One dish of 3 wells, `cycles` acquisitions at focal plane 0, uploaded and acknowledged.
pub fn upload_dish(server: &ServerProcess, serial: &str, cycles: u32) -> Workload {
    upload_dish_planes(server, serial, cycles, vec![0])
}

/// As [`upload_dish`], each acquisition at every one of `planes`.
pub fn upload_dish_planes(
    server: &ServerProcess,
    serial: &str,
    cycles: u32,
    planes: Vec<i32>,
) -> Workload {
    let mut identity = identity(serial, "es-plus");
    let mut client = connect(server, &mut identity);
    let workload = Workload {
        serial: serial.into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: 3,
        planes,
        cycles,
        start_ms: START_MS,
        interval_ms: 600_000,
    };
    sim::register_dishes(&mut client, &workload, TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(4, 7);
    let deadline = Instant::now() + Duration::from_secs(120);
    let (stats, error) = sim::upload(
        &mut client,
        &workload,
        0..workload.len(),
        &frames,
        Pacing::Window,
        deadline,
    );
    assert!(
        error.is_none() && stats.errors.is_empty(),
        "{error:?} {:?}",
        stats.errors
    );
    assert_eq!(stats.acked, workload.len());
    workload
}

/// `esserver apikey create` as an administrator runs it; returns the key it prints once.
pub fn create_api_key(server: &ServerProcess, name: &str, scope: &str) -> String {
    let output = Command::new(esserver_path())
        .args([
            "apikey", "create", "--name", name, "--scope", scope, "--data",
        ])
        .arg(server.data_dir())
        .output()
        .expect("esserver apikey create runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find(|line| line.starts_with("esk_"))
        .unwrap_or_else(|| panic!("the key is printed: {stdout}"))
        .to_string()
}

/// The issuing side of licences: a signing key made with `esserver license keygen`, and
/// licences issued with it for a server.
pub struct Issuer {
    dir: tempfile::TempDir,
    key_file: PathBuf,
    /// The public key a server trusts (`[License] trusted_keys`).
    pub public: String,
}

impl Issuer {
    pub fn new() -> Issuer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key_file = dir.path().join("issuer.key");
        let output = Command::new(esserver_path())
            .args(["license", "keygen", "--out"])
            .arg(&key_file)
            .output()
            .expect("esserver license keygen runs");
        assert!(output.status.success(), "{output:?}");
        let public = String::from_utf8_lossy(&output.stdout)
            .lines()
            .last()
            .expect("the public key is printed")
            .trim()
            .to_string();
        assert_eq!(public.len(), 64, "{public}");
        Issuer {
            dir,
            key_file,
            public,
        }
    }

    /// A server on a fresh data directory that trusts this issuer (and has no licence yet).
    pub fn spawn(&self, dir: &tempfile::TempDir) -> ServerProcess {
        spawn_in(
            dir,
            true,
            &format!("[License]\ntrusted_keys = {}\n", self.public),
        )
    }

    /// `esserver license issue --key <this issuer's key>`, to add arguments to.
    #[allow(dead_code)] // Not every test binary uses it.
    pub fn issue_command(&self) -> Command {
        let mut command = Command::new(esserver_path());
        command
            .args(["license", "issue", "--key"])
            .arg(&self.key_file);
        command
    }

    /// Issues a licence for `server` into a new file named `name`; returns its path.
    pub fn issue(
        &self,
        server: &ServerProcess,
        configuration: &str,
        computers: &[&str],
        name: &str,
    ) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut command = Command::new(esserver_path());
        command
            .args(["license", "issue", "--key"])
            .arg(&self.key_file)
            .args(["--server-id", &server.info.server_id])
            .args(["--clinic", "Clinic A", "--configuration", configuration]);
        for computer in computers {
            command.args(["--computer", computer]);
        }
        let output = command
            .arg("--out")
            .arg(&path)
            .output()
            .expect("esserver license issue runs");
        assert!(output.status.success(), "{output:?}");
        path
    }

    /// `esserver license install` on the server, as an administrator runs it.
    pub fn install(&self, server: &ServerProcess, path: &std::path::Path) -> std::process::Output {
        Command::new(esserver_path())
            .args(["license", "install"])
            .arg(path)
            .arg("--data")
            .arg(server.data_dir())
            .output()
            .expect("esserver license install runs")
    }
}

#[allow(dead_code)]
fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from `source` (port chosen by the kernel) to `target`, non-blocking once
/// connected. The connect is bounded by a 1 s send timeout.
#[allow(dead_code)] // Not every test binary uses it.
pub fn connect_from(source: Ipv4Addr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let SocketAddr::V4(target) = target else {
        return Err(std::io::Error::other("IPv4 targets only"));
    };
    // SAFETY: a fresh socket owned by the TcpStream at once (closed on every error path);
    // every pointer passed is to a live local of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let timeout = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let local = sockaddr(source, 0);
        if libc::bind(
            fd,
            &local as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*target.ip(), target.port());
        if libc::connect(
            fd,
            &remote as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

/// A browser test in headless Chromium: `tests/python/<script>` run with `args`, leaving its
/// screenshots in `target/test-artifacts/<shots>/` (emptied first). Fails unless the script
/// says every check passed and each of `pages` (`<name>.png`) is a PNG. Returns its output.
pub fn run_browser_script(script: &str, args: &[String], shots: &str, pages: &[String]) -> String {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(
            std::path::Path::new(tool).exists(),
            "{tool} is missing: run ./scripts/test.sh, which installs Debian's chromium and chromium-driver"
        );
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let shots = root.join("target/test-artifacts").join(shots);
    let _ = std::fs::remove_dir_all(&shots);
    let output = Command::new("python3")
        .arg(root.join("tests/python").join(script))
        .args(args)
        .arg("--shots")
        .arg(&shots)
        .output()
        .expect("python3 runs (scripts/test.sh installs selenium)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("PASS: all checks passed"),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    for page in pages {
        let png = std::fs::read(shots.join(format!("{page}.png")))
            .unwrap_or_else(|e| panic!("the screenshot of {page} was saved: {e}"));
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{page}");
    }
    stdout
}
