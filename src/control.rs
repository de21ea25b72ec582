//! The local control socket: how admin commands (`esserver status`, `verify`,
//! `instrument reset-secret`, `backup`) reach a running server. It is a Unix domain socket in
//! the data directory, readable by the owner only; each connection carries one JSON request
//! line and gets one JSON response line, before which a long request (a backup) may send
//! progress lines `{"progress": ...}`.
//!
//! redb locks its file, so admin commands open the database directly only when no server
//! answers here.

use serde::{Deserialize, Serialize};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Reports the progress of a long request (sent as a `{"progress": ...}` line).
pub type ProgressSink<'a> = &'a mut dyn FnMut(serde_json::Value);

/// A request line is at most this long; longer ones are refused (a model document, at most
/// 256 KiB, fits, escaped).
const REQUEST_BYTES_MAX: u64 = 1024 * 1024;
/// Requests served at once; more are refused at once (each runs on its own thread, so a
/// long `verify` or a slow client holds up neither other commands nor shutdown).
const REQUESTS_IN_PROGRESS_MAX: usize = 8;
/// How long a client may take to send its request, and the server to write an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control client waits for the server's answer (verify of a large store takes
/// long, so generous).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3600);

pub const SOCKET_FILE: &str = "control.sock";

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_FILE)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Verify,
    ResetSecret {
        serial: String,
    },
    User {
        action: UserRequest,
    },
    ApiKey {
        action: ApiKeyRequest,
    },
    /// `esserver model ...`: the clinic's selection models.
    Model {
        action: ModelRequest,
    },
    /// Change an instrument's display name (its data stays as it is).
    InstrumentRename {
        serial: String,
        display_name: String,
        by: String,
    },
    /// Set an instrument's number (the `I<number>` of its embryo ids); its HELLO no longer
    /// changes it.
    InstrumentNumber {
        serial: String,
        number: u32,
        by: String,
    },
    /// Enrol an instrument's serial number (`enrolment = approve`): its next HELLO is issued
    /// a secret.
    InstrumentApprove {
        serial: String,
        by: String,
    },
    /// Install a licence file (its whole text); it takes effect at once.
    LicenseInstall {
        text: String,
    },
    /// Instrument monitoring: status, or a run-time switch.
    Ims {
        action: ImsRequest,
    },
    /// Back the store up into `to` (an absolute path) while the server runs; progress lines
    /// come before the answer.
    Backup {
        /// A directory or `s3://bucket/prefix` (`crate::backup::Target`).
        to: String,
    },
    /// One archive pass now (`[Archive]`): progress lines (one per volume) before the answer.
    Archive,
    /// Check every archived volume's object (size; `full`: SHA-256 too).
    ArchiveCheck {
        full: bool,
    },
}

/// `esserver ims status|pause|resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ImsRequest {
    Status,
    Set {
        part: crate::ims::Part,
        on: bool,
        by: String,
    },
}

/// `esserver model import|list|show|evaluate` (export is show, written to a file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ModelRequest {
    Import {
        document: String,
        by: String,
    },
    List,
    Show {
        name: String,
        version: Option<u32>,
    },
    /// Evaluate a model on embryos (named, or every embryo of a treatment).
    Evaluate {
        model: String,
        version: Option<u32>,
        embryos: Vec<String>,
        treatment: Option<(String, String)>,
        by: String,
    },
}

/// Public API key management. The command line tool makes the key and sends only its id and
/// the SHA-256 of its secret: no secret crosses the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ApiKeyRequest {
    Create {
        key_id: String,
        name: String,
        scope: String,
        /// Hex.
        secret_sha256: String,
        by: String,
    },
    Revoke {
        key_id: String,
        by: String,
    },
    List,
}

/// User management. Passwords are hashed by the command line tool (argon2id) before they are
/// sent: no password crosses the control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum UserRequest {
    Add {
        name: String,
        password_hash: String,
        rights: String,
        by: String,
    },
    Passwd {
        name: String,
        password_hash: String,
        by: String,
    },
    Disable {
        name: String,
        by: String,
    },
    Enable {
        name: String,
        by: String,
    },
    Unlock {
        name: String,
        by: String,
    },
    List,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Stable error code when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub body: serde_json::Value,
}

impl Response {
    pub fn ok(body: serde_json::Value) -> Response {
        Response {
            ok: true,
            code: None,
            message: None,
            body,
        }
    }

    pub fn error(code: &str, message: impl Into<String>) -> Response {
        Response {
            ok: false,
            code: Some(code.to_string()),
            message: Some(message.into()),
            body: serde_json::Value::Null,
        }
    }
}

/// The running control server.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl ControlServer {
    /// Binds the socket (replacing a stale one left by a killed server) and answers requests
    /// on its own thread with `handler`.
    #[cfg(unix)]
    pub fn start(
        data_dir: &Path,
        handler: impl Fn(Request, ProgressSink<'_>) -> Response + Send + Sync + 'static,
    ) -> io::Result<ControlServer> {
        use std::os::unix::net::UnixListener;
        use std::sync::atomic::AtomicUsize;
        let handler = Arc::new(handler);
        let in_progress = Arc::new(AtomicUsize::new(0));
        let path = socket_path(data_dir);
        if path.exists() {
            // The database lock proves no other server runs on this directory.
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        crate::os::make_owner_only(&path, false)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("es-control".into())
            .spawn(move || {
                while !thread_stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => serve_in_background(stream, &handler, &in_progress),
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(error) => {
                            tracing::error!(%error, "control socket accept failed");
                            std::thread::sleep(Duration::from_millis(500));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            stop,
            thread: Some(thread),
            path,
        })
    }

    #[cfg(not(unix))]
    pub fn start(
        _data_dir: &Path,
        _handler: impl Fn(Request, ProgressSink<'_>) -> Response + Send + Sync + 'static,
    ) -> io::Result<ControlServer> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the control socket needs Unix domain sockets",
        ))
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one control connection on its own thread, within [`REQUESTS_IN_PROGRESS_MAX`].
#[cfg(unix)]
fn serve_in_background(
    stream: std::os::unix::net::UnixStream,
    handler: &Arc<impl Fn(Request, ProgressSink<'_>) -> Response + Send + Sync + 'static>,
    in_progress: &Arc<std::sync::atomic::AtomicUsize>,
) {
    if in_progress.fetch_add(1, Ordering::SeqCst) >= REQUESTS_IN_PROGRESS_MAX {
        in_progress.fetch_sub(1, Ordering::SeqCst);
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let _ = write_response(
            &stream,
            &Response::error("busy", "too many admin requests in progress; try again"),
        );
        return;
    }
    let handler = handler.clone();
    let counter = in_progress.clone();
    let spawned = std::thread::Builder::new()
        .name("es-control-request".into())
        .spawn(move || {
            if let Err(error) = serve_one(stream, &*handler) {
                tracing::warn!(%error, "control request failed");
            }
            counter.fetch_sub(1, Ordering::SeqCst);
        });
    if let Err(error) = spawned {
        in_progress.fetch_sub(1, Ordering::SeqCst);
        tracing::error!(%error, "cannot start a control request thread");
    }
}

#[cfg(unix)]
fn serve_one(
    stream: std::os::unix::net::UnixStream,
    handler: &dyn Fn(Request, ProgressSink<'_>) -> Response,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(io::Read::take(&stream, REQUEST_BYTES_MAX));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut lines = ProgressLines {
        stream: &stream,
        pending: Vec::new(),
        gone: false,
    };
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => handler(request, &mut |value| lines.send(value)),
        Err(error) => Response::error(
            "bad_request",
            format!("cannot parse the control request: {error}"),
        ),
    };
    // The answer starts on a line of its own.
    if !lines.gone {
        (&stream).write_all(&lines.pending)?;
    }
    write_response(&stream, &response)
}

/// Progress lines to a control client, never holding up the request: written without
/// blocking; while the client has not taken a line, newer ones are dropped (whole lines, so
/// the stream stays line by line); a client that went away gets none.
#[cfg(unix)]
struct ProgressLines<'a> {
    stream: &'a std::os::unix::net::UnixStream,
    /// The rest of the line being sent.
    pending: Vec<u8>,
    gone: bool,
}

#[cfg(unix)]
impl ProgressLines<'_> {
    fn send(&mut self, value: serde_json::Value) {
        if self.gone {
            return;
        }
        self.flush();
        if !self.pending.is_empty() {
            return; // The client is behind: this line is dropped.
        }
        let mut text = serde_json::json!({ "progress": value }).to_string();
        text.push('\n');
        self.pending = text.into_bytes();
        self.flush();
    }

    /// Writes what the socket takes now.
    fn flush(&mut self) {
        if self.pending.is_empty() || self.stream.set_nonblocking(true).is_err() {
            return;
        }
        while !self.pending.is_empty() {
            match (&*self.stream).write(&self.pending) {
                Ok(0) => {
                    self.gone = true;
                    break;
                }
                Ok(written) => {
                    self.pending.drain(..written);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.gone = true;
                    break;
                }
            }
        }
        if self.stream.set_nonblocking(false).is_err() {
            self.gone = true;
        }
    }
}

#[cfg(unix)]
fn write_response(stream: &std::os::unix::net::UnixStream, response: &Response) -> io::Result<()> {
    let mut writer = stream;
    let mut text = serde_json::to_string(response).map_err(io::Error::other)?;
    text.push('\n');
    writer.write_all(text.as_bytes())
}

/// Sends one request to the server running on `data_dir`. `Ok(None)` when no server
/// answers there.
pub fn call(data_dir: &Path, request: &Request) -> io::Result<Option<Response>> {
    call_with_progress(data_dir, request, &mut |_| {})
}

/// [`call`], handing the progress lines the server sends before its answer to `progress`.
#[cfg(unix)]
pub fn call_with_progress(
    data_dir: &Path,
    request: &Request,
    progress: ProgressSink<'_>,
) -> io::Result<Option<Response>> {
    use std::os::unix::net::UnixStream;
    let path = socket_path(data_dir);
    let stream = match UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(error) => return Err(error),
    };
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
    let mut text = serde_json::to_string(request).map_err(io::Error::other)?;
    text.push('\n');
    (&stream).write_all(text.as_bytes())?;
    let mut reader = BufReader::new(&stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the control connection without an answer",
            ));
        }
        let value: serde_json::Value = serde_json::from_str(line.trim()).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad control response: {error}"),
            )
        })?;
        if let Some(update) = value.get("progress") {
            progress(update.clone());
            continue;
        }
        let response = serde_json::from_value(value).map_err(|error| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad control response: {error}"),
            )
        })?;
        return Ok(Some(response));
    }
}

#[cfg(not(unix))]
pub fn call_with_progress(
    _data_dir: &Path,
    _request: &Request,
    _progress: ProgressSink<'_>,
) -> io::Result<Option<Response>> {
    Ok(None)
}
