//! A blocking viewer client over the real viewer protocol (es-proto's messages and framing on
//! es-net's client connection): what the tests, the `esserver viewer` tool and the load
//! generator's simulated viewers use. Change notices pushed by the server are kept in
//! [`ViewerClient::notices`] as they arrive, whatever the client is waiting for.

use bytes::BytesMut;
use es_net::client::{ClientConn, ClientTls};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::{encode_request, ErrorCode, FrameDecoder, PROTOCOL_VERSION};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Notices (and their arrival times) kept at most; the oldest half goes when full.
const NOTICES_KEPT_MAX: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ViewerError {
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("malformed frame from the server: {0}")]
    Frame(String),
    /// The server answered with Error.
    #[error("server error {name} ({code}): {message}")]
    Server {
        code: u32,
        name: String,
        message: String,
        current_version: u64,
        current_json: String,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the server closed the connection")]
    Closed,
    #[error("unexpected answer: {0}")]
    Unexpected(String),
}

impl ViewerError {
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ViewerError::Server { code, .. } => ErrorCode::from_code(*code),
            _ => None,
        }
    }

    fn from_error(error: pb::Error) -> ViewerError {
        ViewerError::Server {
            code: error.code,
            name: error.name,
            message: error.message,
            current_version: error.current_version,
            current_json: error.current_json,
        }
    }
}

/// How to log in.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub computer: String,
}

pub struct ViewerClient {
    conn: ClientConn,
    decoder: FrameDecoder,
    next_seq: u64,
    timeout: Duration,
    /// Answers read while waiting for another one.
    backlog: VecDeque<pb::ServerMessage>,
    /// Change notices received and not yet taken.
    pub notices: VecDeque<pb::ChangeNotice>,
    /// (change seq, when it was read) of every notice, for push latency.
    pub notice_arrivals: Vec<(u64, Instant)>,
    /// The seq of the newest change notice received.
    pub last_change_seq: u64,
    pub login: pb::LoginOk,
}

impl ViewerClient {
    /// Connects (TLS as given) and logs in.
    pub fn login(
        addr: SocketAddr,
        tls: &ClientTls,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<ViewerClient, ViewerError> {
        let mut client = Self::connect(addr, tls, timeout)?;
        client.start_session(login_request(credentials))?;
        Ok(client)
    }

    /// `login` over a TCP stream connected already (from a chosen source address, say).
    pub fn login_over(
        stream: std::net::TcpStream,
        tls: &ClientTls,
        credentials: &Credentials,
        timeout: Duration,
    ) -> Result<ViewerClient, ViewerError> {
        let mut client = Self::with_conn(ClientConn::over(stream, tls)?, timeout);
        client.start_session(login_request(credentials))?;
        Ok(client)
    }

    /// Connects and resumes a session after a dropped connection; pushes restart after
    /// `changes_after`.
    pub fn resume(
        addr: SocketAddr,
        tls: &ClientTls,
        token: &str,
        changes_after: u64,
        timeout: Duration,
    ) -> Result<ViewerClient, ViewerError> {
        let mut client = Self::connect(addr, tls, timeout)?;
        client.last_change_seq = changes_after;
        let resume = Request::Resume(pb::Resume {
            protocol_version: PROTOCOL_VERSION,
            session_token: token.to_string(),
            changes_after,
        });
        client.start_session(resume)?;
        Ok(client)
    }

    fn connect(
        addr: SocketAddr,
        tls: &ClientTls,
        timeout: Duration,
    ) -> Result<ViewerClient, ViewerError> {
        Ok(Self::with_conn(
            ClientConn::connect(addr, tls, timeout)?,
            timeout,
        ))
    }

    fn with_conn(conn: ClientConn, timeout: Duration) -> ViewerClient {
        ViewerClient {
            conn,
            decoder: FrameDecoder::new(u32::MAX),
            next_seq: 1,
            timeout,
            backlog: VecDeque::new(),
            notices: VecDeque::new(),
            notice_arrivals: Vec::new(),
            last_change_seq: 0,
            login: pb::LoginOk::default(),
        }
    }

    fn start_session(&mut self, request: Request) -> Result<(), ViewerError> {
        let seq = self.send(request);
        match self.wait(seq, "LoginOk")? {
            Body::LoginOk(ok) => {
                if self.last_change_seq == 0 || ok.resync_required {
                    self.last_change_seq = ok.last_change_seq;
                }
                self.login = ok;
                Ok(())
            }
            other => Err(ViewerError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Queues a request; returns its seq.
    pub fn send(&mut self, request: Request) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut out = BytesMut::new();
        encode_request(seq, request, &mut out);
        self.conn.queue(&out);
        seq
    }

    /// Sends a request and waits for its answer; an Error answer is an `Err`.
    pub fn call(&mut self, request: Request) -> Result<Body, ViewerError> {
        let seq = self.send(request);
        self.wait(seq, "an answer")
    }

    /// Waits for the next answer to `seq` (for a playback: its next frame).
    pub fn wait(&mut self, seq: u64, what: &'static str) -> Result<Body, ViewerError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(index) = self.backlog.iter().position(|m| m.seq == seq) {
                let message = self.backlog.remove(index).expect("index is valid");
                return match message.body {
                    Some(Body::Error(error)) => Err(ViewerError::from_error(error)),
                    Some(body) => Ok(body),
                    None => Err(ViewerError::Unexpected("an answer without a body".into())),
                };
            }
            self.read_some(deadline, what)?;
        }
    }

    /// Reads whatever arrives until `deadline` (to collect pushed notices).
    pub fn poll(&mut self, deadline: Instant) -> Result<(), ViewerError> {
        while Instant::now() < deadline {
            match self.read_some(deadline, "notices") {
                Ok(()) => {}
                Err(ViewerError::Timeout(_)) => return Ok(()),
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Waits until a notice with change seq >= `seq` has arrived.
    pub fn wait_for_change(&mut self, seq: u64) -> Result<(), ViewerError> {
        let deadline = Instant::now() + self.timeout;
        while self.last_change_seq < seq {
            self.read_some(deadline, "a change notice")?;
        }
        Ok(())
    }

    fn read_some(&mut self, deadline: Instant, what: &'static str) -> Result<(), ViewerError> {
        loop {
            match self.decoder.decode::<pb::ServerMessage>(self.conn.input()) {
                Ok(Some(message)) => {
                    self.take(message)?;
                    return Ok(());
                }
                Ok(None) => {}
                Err(error) => return Err(ViewerError::Frame(error.to_string())),
            }
            if self.conn.is_eof() {
                return Err(ViewerError::Closed);
            }
            if Instant::now() >= deadline {
                return Err(ViewerError::Timeout(what));
            }
            self.conn.pump(deadline)?;
        }
    }

    fn take(&mut self, message: pb::ServerMessage) -> Result<(), ViewerError> {
        match message.body {
            Some(Body::Change(notice)) if message.seq == 0 => {
                self.last_change_seq = self.last_change_seq.max(notice.change_seq);
                if self.notice_arrivals.len() >= NOTICES_KEPT_MAX {
                    self.notice_arrivals.drain(..NOTICES_KEPT_MAX / 2);
                }
                if self.notices.len() >= NOTICES_KEPT_MAX {
                    self.notices.drain(..NOTICES_KEPT_MAX / 2);
                }
                self.notice_arrivals
                    .push((notice.change_seq, Instant::now()));
                self.notices.push_back(notice);
                Ok(())
            }
            Some(Body::Error(error)) if message.seq == 0 => Err(ViewerError::from_error(error)),
            _ => {
                self.backlog.push_back(message);
                Ok(())
            }
        }
    }

    /// Sends everything queued, then half-closes: nothing more will be sent, answers can
    /// still be read.
    pub fn finish_sending(&mut self) -> Result<(), ViewerError> {
        let deadline = Instant::now() + self.timeout;
        if !self.conn.flush_until(deadline)? {
            return Err(ViewerError::Timeout("sending"));
        }
        self.conn.shutdown_write();
        Ok(())
    }

    /// Closes the socket at once (a dropped connection).
    pub fn drop_connection(mut self) {
        self.conn.shutdown();
    }
}

/// The Login of `credentials`, as this client sends it.
fn login_request(credentials: &Credentials) -> Request {
    Request::Login(pb::Login {
        protocol_version: PROTOCOL_VERSION,
        user: credentials.user.clone(),
        password: credentials.password.clone(),
        computer: credentials.computer.clone(),
        client: "es-loadtest viewer client".into(),
        changes_after: 0,
    })
}
