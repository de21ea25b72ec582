//! A blocking-style incubator client over the real protocol (es-proto's client session on
//! es-net's client connection): what the simulator, the benchmarks and the tests use.

use bytes::BytesMut;
use es_net::client::{ClientConn, ClientTls};
use es_proto::incubator::{pb, ClientEvent, ClientSession, ErrorCode, Message, SessionError};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0:?}")]
    Protocol(SessionError),
    /// The server answered with ERROR (seq 0: the connection is closed).
    #[error("server error {name} ({code}) for seq {seq}: {message}")]
    Server {
        seq: u64,
        code: u32,
        name: String,
        message: String,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the server closed the connection")]
    Closed,
}

impl ClientError {
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => ErrorCode::from_code(*code),
            ClientError::Protocol(error) => Some(error.code),
            _ => None,
        }
    }
}

/// Who the client says it is.
#[derive(Debug, Clone)]
pub struct Identity {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// The secret issued by the server on the first connection (empty before).
    pub secret: String,
    /// The instrument's own number, sent in HELLO (0: none, the server numbers it).
    pub instrument_number: u32,
}

pub struct IncubatorClient {
    conn: ClientConn,
    session: ClientSession,
    out: BytesMut,
    /// Responses read while waiting for another one.
    backlog: VecDeque<(u64, Message)>,
    hello_ok: pb::HelloOk,
}

impl IncubatorClient {
    /// Connects and completes HELLO. A secret issued by the server is stored into
    /// `identity.secret`.
    pub fn connect(
        addr: SocketAddr,
        tls: &ClientTls,
        identity: &mut Identity,
        timeout: Duration,
    ) -> Result<IncubatorClient, ClientError> {
        let conn = ClientConn::connect(addr, tls, timeout)?;
        let mut client = IncubatorClient {
            conn,
            session: ClientSession::new(es_proto::incubator::FRAME_BYTES_MAX_DEFAULT),
            out: BytesMut::new(),
            backlog: VecDeque::new(),
            hello_ok: pb::HelloOk::default(),
        };
        let hello = pb::Hello {
            protocol_version: es_proto::incubator::PROTOCOL_VERSION,
            serial_number: identity.serial.clone(),
            model: identity.model.clone(),
            firmware_version: identity.firmware.clone(),
            instrument_clock_ms: now_ms(),
            secret: identity.secret.clone(),
            instrument_number: identity.instrument_number,
        };
        client.session.hello(hello, &mut client.out);
        client.flush_out();
        let deadline = Instant::now() + timeout;
        match client.next_event(deadline)? {
            Some(ClientEvent::HelloOk(ok)) => {
                if !ok.issued_secret.is_empty() {
                    identity.secret = ok.issued_secret.clone();
                }
                client.hello_ok = ok;
                Ok(client)
            }
            Some(ClientEvent::Response { seq, message }) => Err(server_error(seq, message)),
            None => Err(ClientError::Timeout("HELLO_OK")),
        }
    }

    pub fn hello_ok(&self) -> &pb::HelloOk {
        &self.hello_ok
    }

    /// Requests sent and not answered yet.
    pub fn pending(&self) -> usize {
        self.session.pending()
    }

    /// True while the server's in-flight limit allows another request.
    pub fn can_send(&self) -> bool {
        self.session.can_send()
    }

    /// Queues a request (numbering it) and starts sending it; returns its seq.
    pub fn send(&mut self, message: Message) -> u64 {
        let seq = self.session.send(message, &mut self.out);
        self.flush_out();
        seq
    }

    /// Appends raw bytes to the stream (tests of malformed input).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.conn.queue(bytes);
    }

    fn flush_out(&mut self) {
        if !self.out.is_empty() {
            let bytes = self.out.split();
            self.conn.queue(&bytes);
        }
    }

    /// Waits up to `deadline` for the next response; `Ok(None)` at the deadline.
    pub fn next_response(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(u64, Message)>, ClientError> {
        if let Some(response) = self.backlog.pop_front() {
            return Ok(Some(response));
        }
        match self.next_event(deadline)? {
            Some(ClientEvent::Response { seq: 0, message }) => Err(server_error(0, message)),
            Some(ClientEvent::Response { seq, message }) => Ok(Some((seq, message))),
            Some(ClientEvent::HelloOk(_)) => Err(ClientError::Protocol(SessionError::new(
                ErrorCode::UnexpectedMessage,
                "a second HELLO_OK",
            ))),
            None => Ok(None),
        }
    }

    /// Sends a request and waits for its own response (others are kept for later).
    pub fn request(&mut self, message: Message, timeout: Duration) -> Result<Message, ClientError> {
        let wanted = self.send(message);
        let deadline = Instant::now() + timeout;
        let mut others = Vec::new();
        let result = loop {
            match self.next_event(deadline) {
                Err(error) => break Err(error),
                Ok(None) => break Err(ClientError::Timeout("a response")),
                Ok(Some(ClientEvent::Response { seq: 0, message })) => {
                    break Err(server_error(0, message))
                }
                Ok(Some(ClientEvent::Response { seq, message })) if seq == wanted => {
                    break Ok(message)
                }
                Ok(Some(ClientEvent::Response { seq, message })) => others.push((seq, message)),
                Ok(Some(ClientEvent::HelloOk(_))) => {}
            }
        };
        self.backlog.extend(others);
        result
    }

    fn next_event(&mut self, deadline: Instant) -> Result<Option<ClientEvent>, ClientError> {
        loop {
            match self.session.poll_response(self.conn.input()) {
                Ok(Some(event)) => return Ok(Some(event)),
                Ok(None) => {}
                Err(error) => return Err(ClientError::Protocol(error)),
            }
            if self.conn.is_eof() {
                return Err(ClientError::Closed);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            self.conn.pump(deadline)?;
        }
    }

    /// Sends what is queued and reads what arrived, waiting at most until `deadline`.
    pub fn pump(&mut self, deadline: Instant) -> Result<(), ClientError> {
        self.conn.pump(deadline)?;
        Ok(())
    }

    /// Sends what is queued, then closes the sending side (answers can still be read).
    pub fn finish_sending(&mut self, timeout: Duration) -> Result<(), ClientError> {
        if !self.conn.flush_until(Instant::now() + timeout)? {
            return Err(ClientError::Timeout("sending the last requests"));
        }
        self.conn.shutdown_write();
        Ok(())
    }

    /// Closes gracefully and waits until the server has closed its side too, so the server
    /// no longer counts this instrument as connected (its licence capacity is free again).
    pub fn close(mut self, timeout: Duration) -> Result<(), ClientError> {
        let deadline = Instant::now() + timeout;
        self.finish_sending(timeout)?;
        while !self.conn.is_eof() {
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout("the server to close the connection"));
            }
            self.conn.pump(deadline)?;
            // Answers still coming are read and dropped.
            self.conn.input().clear();
        }
        Ok(())
    }

    /// Drops the connection without a goodbye.
    pub fn abort(mut self) {
        self.conn.shutdown();
    }
}

/// Turns an ERROR (or anything unexpected) into a client error.
pub fn server_error(seq: u64, message: Message) -> ClientError {
    match message {
        Message::Error(error) => ClientError::Server {
            seq,
            code: error.code,
            name: error.name,
            message: error.message,
        },
        other => ClientError::Protocol(SessionError::new(
            ErrorCode::UnexpectedMessage,
            format!("unexpected {:?}", other.message_type()),
        )),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
