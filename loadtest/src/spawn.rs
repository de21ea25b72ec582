//! Runs an `esserver` process for a test or a benchmark: a temporary data directory, every
//! listener on a free loopback port, stopped (gracefully or with kill -9) by PID.

use es_net::client::ClientTls;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The part of the server's `server.json` a client needs.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ServerInfo {
    pub pid: u32,
    pub server_id: String,
    pub certificate: PathBuf,
    pub listeners: Vec<ListenerInfo>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ListenerInfo {
    pub service: String,
    pub address: SocketAddr,
    pub tls: bool,
}

impl ServerInfo {
    /// A server this process did not start: its incubator port, and the certificate to pin
    /// (None: plain TCP).
    pub fn remote_incubator(address: SocketAddr, certificate: Option<PathBuf>) -> ServerInfo {
        ServerInfo {
            pid: 0,
            server_id: String::new(),
            listeners: vec![ListenerInfo {
                service: "incubator".into(),
                address,
                tls: certificate.is_some(),
            }],
            certificate: certificate.unwrap_or_default(),
        }
    }

    pub fn address(&self, service: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|l| l.service == service)
            .map(|l| l.address)
            .expect("service listed")
    }

    /// Client TLS settings for a service: the server's certificate pinned, or plain.
    pub fn client_tls(&self, service: &str) -> ClientTls {
        let tls = self
            .listeners
            .iter()
            .find(|l| l.service == service)
            .map(|l| l.tls)
            .unwrap_or(true);
        if !tls {
            return ClientTls::Plain;
        }
        let cert = es_net::tls::read_certificate(&self.certificate)
            .expect("the server's certificate is readable");
        ClientTls::Tls {
            config: es_net::tls::pinned_client_config(cert),
            server_name: "localhost".try_into().expect("valid name"),
        }
    }
}

/// The load generator's simulated devices all connect from one address, so a server it spawns
/// for a benchmark lifts `[Limits] connections_per_address_max`: the cap is not what a
/// benchmark measures.
pub const LOAD_GENERATOR_CONFIG: &str = "[Limits]\nconnections_per_address_max = 65536\n";

/// Settings for a spawned server.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    pub esserver: PathBuf,
    pub data_dir: PathBuf,
    pub incubator_tls: bool,
    /// Extra lines appended to the configuration file, section headers included.
    pub extra_config: String,
    pub log_level: String,
    /// Where the server's stderr goes (inherit when None).
    pub log_file: Option<PathBuf>,
    /// Environment variables given to the server (e.g. a service manager's NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
}

impl SpawnOptions {
    pub fn new(esserver: PathBuf, data_dir: PathBuf) -> SpawnOptions {
        SpawnOptions {
            esserver,
            data_dir,
            incubator_tls: true,
            extra_config: String::new(),
            log_level: "info".into(),
            log_file: None,
            env: Vec::new(),
        }
    }

    /// The configuration file this spawn writes: every listener on port 0 (a free port), plus
    /// `extra_config`, whose lines are merged into the sections they name.
    pub fn config_text(&self) -> String {
        let tls = if self.incubator_tls { "on" } else { "off" };
        let mut sections: Vec<(String, Vec<String>)> = vec![
            (
                "IncubatorTransport".into(),
                vec![
                    "bind = 127.0.0.1".into(),
                    "port = 0".into(),
                    format!("tls = {tls}"),
                ],
            ),
            (
                "ViewerTransport".into(),
                vec!["bind = 127.0.0.1".into(), "port = 0".into()],
            ),
            (
                "PublicApi".into(),
                vec!["bind = 127.0.0.1".into(), "port = 0".into()],
            ),
            (
                "WebInterface".into(),
                vec!["bind = 127.0.0.1".into(), "port = 0".into()],
            ),
            (
                "Storage".into(),
                vec![format!("data_dir = {}", self.data_dir.display())],
            ),
            (
                "Server".into(),
                vec![format!("log_level = {}", self.log_level)],
            ),
        ];
        let mut current: Option<usize> = None;
        for line in self
            .extra_config
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = Some(match sections.iter().position(|(n, _)| n == name) {
                    Some(index) => index,
                    None => {
                        sections.push((name.to_string(), Vec::new()));
                        sections.len() - 1
                    }
                });
            } else if let Some(index) = current {
                sections[index].1.push(line.to_string());
            }
        }
        let mut text = String::from("; written by the load generator for a spawned server\n");
        for (name, lines) in sections {
            text.push_str(&format!("\n[{name}]\n"));
            for line in lines {
                text.push_str(&line);
                text.push('\n');
            }
        }
        text
    }
}

pub struct ServerProcess {
    child: Option<Child>,
    pub info: ServerInfo,
    pub options: SpawnOptions,
    /// kill -9 of this server if the load generator is interrupted.
    _undo: crate::cleanup::Registration,
}

impl ServerProcess {
    pub fn spawn(options: SpawnOptions) -> std::io::Result<ServerProcess> {
        std::fs::create_dir_all(&options.data_dir)?;
        let config_path = options.data_dir.join("EmbryoServer.ini");
        std::fs::write(&config_path, options.config_text())?;
        let stderr = match &options.log_file {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(&options.esserver)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .spawn()?;
        let info = wait_for_info(&options.data_dir, child.id(), &mut child)?;
        let pid = child.id();
        Ok(ServerProcess {
            child: Some(child),
            info,
            options,
            _undo: crate::cleanup::on_interrupt(move || kill9_pid(pid)),
        })
    }

    pub fn pid(&self) -> u32 {
        self.info.pid
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// The configuration file the server was started with (edit it, then SIGHUP).
    pub fn config_path(&self) -> PathBuf {
        self.options.data_dir.join("EmbryoServer.ini")
    }

    /// kill -9: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        send_sigterm(child.id());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Spawns a new server on the same data directory and configuration.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill9();
        let next = ServerProcess::spawn(self.options.clone())?;
        *self = next;
        Ok(())
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[cfg(unix)]
fn send_sigterm(pid: u32) {
    // SAFETY: plain kill(2) on a child we spawned.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

#[cfg(not(unix))]
fn send_sigterm(_pid: u32) {}

fn wait_for_info(data_dir: &Path, pid: u32, child: &mut Child) -> std::io::Result<ServerInfo> {
    let deadline = Instant::now() + START_TIMEOUT;
    let path = data_dir.join("server.json");
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(info) = serde_json::from_str::<ServerInfo>(&text) {
                if info.pid == pid {
                    return Ok(info);
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(std::io::Error::other(format!(
                "esserver exited during start-up ({status})"
            )));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "esserver did not start listening in time",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `esserver` next to the running executable (target/<profile>/), or on `PATH`.
pub fn find_esserver() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(3) {
            let candidate = dir.join(format!("esserver{}", std::env::consts::EXE_SUFFIX));
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("esserver")
}

/// kill -9 by PID (the interrupt undo of a spawned server).
fn kill9_pid(pid: u32) {
    #[cfg(unix)]
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) with a PID this process started; a stale one fails harmlessly.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
