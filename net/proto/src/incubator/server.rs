//! The sans-I/O server side of one incubator connection.

use bytes::BytesMut;

use super::codec::FrameDecoder;
use super::error_code::ErrorCode;
use super::message::{Message, MessageType};
use super::validate::validate_hello;
use super::{pb, FRAME_BYTES_MAX_DEFAULT, INFLIGHT_REQUESTS_MAX_DEFAULT, PROTOCOL_VERSION};
use crate::session::{self, Requests};

/// Limits the server announces in HELLO_OK and enforces on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest frame length field accepted after HELLO_OK (type byte + payload).
    pub frame_bytes_max: u32,
    /// Largest number of unanswered requests; at the limit the session reads no further.
    pub inflight_requests_max: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            inflight_requests_max: INFLIGHT_REQUESTS_MAX_DEFAULT,
        }
    }
}

/// A protocol violation that ends the session: the shared [`crate::session::SessionError`]
/// over the incubator's [`ErrorCode`]. Send [`SessionError::to_message`] (an ERROR with seq 0,
/// the same as `error_message(0, code, message)`), then close the connection.
pub type SessionError = session::SessionError<ErrorCode>;

/// What the server has to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A HELLO with a supported version and valid fields. Check the instrument and its secret,
    /// then call [`ServerSession::accept_hello`] (or send an ERROR with seq 0 and close).
    Hello(pb::Hello),
    /// A client request after the handshake, its seq checked. Answer it exactly once with
    /// [`ServerSession::respond`]; check its fields with [`super::validate_request`].
    Request(Message),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingHello,
    AwaitingAccept,
    Established,
    Closed(SessionError),
}

/// The server side of one connection: enforces the handshake (HELLO first, supported
/// version), accepts only client-to-server types, checks that seqs increase, and counts
/// unanswered requests. It knows nothing of storage.
#[derive(Debug)]
pub struct ServerSession {
    limits: ServerLimits,
    decoder: FrameDecoder,
    state: State,
    /// Unanswered requests, with the type of each (the answer must fit it).
    requests: Requests<MessageType>,
}

impl ServerSession {
    /// A session waiting for HELLO. Until HELLO_OK the frame limit is 4 MiB, as specified.
    pub fn new(limits: ServerLimits) -> Self {
        let limits = ServerLimits {
            inflight_requests_max: limits.inflight_requests_max.max(1),
            ..limits
        };
        ServerSession {
            limits,
            decoder: FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT),
            state: State::AwaitingHello,
            requests: Requests::new(limits.inflight_requests_max),
        }
    }

    /// Decodes the next event from the receive buffer `src`.
    ///
    /// `Ok(None)` when no whole frame is there, while a HELLO awaits [`Self::accept_hello`],
    /// and while [`Self::at_inflight_limit`] (bytes stay in `src`: stop reading the socket).
    /// `Err` closes the session: send [`SessionError::to_message`] and close the connection;
    /// later calls return the same error.
    pub fn poll_event(&mut self, src: &mut BytesMut) -> Result<Option<ServerEvent>, SessionError> {
        match &self.state {
            State::Closed(error) => return Err(error.clone()),
            State::AwaitingAccept => return Ok(None),
            State::Established if self.at_inflight_limit() => return Ok(None),
            State::AwaitingHello | State::Established => {}
        }
        let message = match self.decoder.decode(src) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(error) => return Err(self.close(error.into())),
        };
        let event = match self.state {
            State::AwaitingHello => self.on_hello(message),
            _ => self.on_request(message),
        };
        event.map(Some).map_err(|error| self.close(error))
    }

    /// Accepts the HELLO returned by [`Self::poll_event`] and writes HELLO_OK to `out`. The
    /// session's limits and [`PROTOCOL_VERSION`] are written into `reply`; the caller fills in
    /// `server_id`, `issued_secret` and `server_clock_ms`.
    pub fn accept_hello(&mut self, mut reply: pb::HelloOk, out: &mut BytesMut) {
        debug_assert_eq!(
            self.state,
            State::AwaitingAccept,
            "accept_hello without HELLO"
        );
        if self.state != State::AwaitingAccept {
            return;
        }
        reply.accepted_version = PROTOCOL_VERSION;
        reply.frame_bytes_max = self.limits.frame_bytes_max;
        reply.inflight_requests_max = self.limits.inflight_requests_max;
        Message::HelloOk(reply).encode(out);
        self.decoder
            .set_frame_bytes_max(self.limits.frame_bytes_max);
        self.state = State::Established;
    }

    /// Writes the answer to a request (ACK, ERROR, SYNC_STATE_RESULT, PATIENT_LIST) to `out`
    /// and ends that request's in-flight count. An ERROR with seq 0 closes the session.
    pub fn respond(&mut self, message: Message, out: &mut BytesMut) {
        let seq = message.seq();
        if seq == 0 {
            self.respond_connection_error(message, out);
            return;
        }
        let request_type = self.requests.close(seq);
        debug_assert!(
            request_type.is_some_and(|request| request.accepts_response(message.message_type())),
            "respond: seq {seq} is not an unanswered request of a matching type"
        );
        message.encode(out);
    }

    /// Writes ERROR `code` with seq 0 to `out` and closes the session (e.g. auth_failed,
    /// superseded, shutting_down, a timeout).
    pub fn close_with_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        out: &mut BytesMut,
    ) {
        let error = SessionError::new(code, message);
        error.to_message().encode(out);
        self.close(error);
    }

    /// Requests received and not yet answered.
    pub fn inflight(&self) -> u32 {
        self.requests.unanswered()
    }

    /// True when the client has as many unanswered requests as it may: read no further.
    pub fn at_inflight_limit(&self) -> bool {
        self.requests.is_full()
    }

    /// True after HELLO_OK was written and until the session closes.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True once an error ended the session.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// The limits in force (inflight_requests_max at least 1).
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    fn on_hello(&mut self, message: Message) -> Result<ServerEvent, SessionError> {
        let hello = match message {
            Message::Hello(hello) => hello,
            other => return Err(Self::before_hello(other.message_type())),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(SessionError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ));
        }
        validate_hello(&hello).map_err(|error| {
            SessionError::new(ErrorCode::InvalidField, format!("HELLO {error}"))
        })?;
        self.state = State::AwaitingAccept;
        Ok(ServerEvent::Hello(hello))
    }

    fn before_hello(message_type: MessageType) -> SessionError {
        if message_type.is_client_to_server() {
            let text = format!("{message_type} before HELLO: the first frame must be HELLO");
            return SessionError::new(ErrorCode::HelloRequired, text);
        }
        Self::not_from_client(message_type)
    }

    fn not_from_client(message_type: MessageType) -> SessionError {
        SessionError::new(
            ErrorCode::UnexpectedMessage,
            format!("{message_type} is sent by the server, never by an incubator"),
        )
    }

    fn on_request(&mut self, message: Message) -> Result<ServerEvent, SessionError> {
        let message_type = message.message_type();
        if message_type == MessageType::Hello {
            return Err(SessionError::new(
                ErrorCode::UnexpectedMessage,
                "second HELLO",
            ));
        }
        if !message_type.is_request() {
            return Err(Self::not_from_client(message_type));
        }
        let seq = message.seq();
        if let Err(last) = self.requests.take_seq(seq) {
            let text = format!("{message_type} seq {seq} after seq {last}: seq must increase");
            return Err(SessionError::new(ErrorCode::SequenceError, text));
        }
        self.requests.open(seq, message_type);
        Ok(ServerEvent::Request(message))
    }

    fn respond_connection_error(&mut self, message: Message, out: &mut BytesMut) {
        message.encode(out);
        if let Message::Error(error) = message {
            let code = ErrorCode::from_code(error.code).unwrap_or(ErrorCode::InternalError);
            self.close(SessionError::new(code, error.message));
        }
    }

    fn close(&mut self, error: SessionError) -> SessionError {
        self.state = State::Closed(error.clone());
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incubator::error_message;
    use crate::incubator::samples::example;

    const LIMITS: ServerLimits = ServerLimits {
        frame_bytes_max: 1024 * 1024,
        inflight_requests_max: 2,
    };

    fn frames(messages: &[Message]) -> BytesMut {
        let mut src = BytesMut::new();
        for message in messages {
            message.encode(&mut src);
        }
        src
    }

    fn ping(seq: u64) -> Message {
        Message::Ping(pb::Ping { seq })
    }

    fn hello() -> Message {
        example(MessageType::Hello)
    }

    /// A session after HELLO and HELLO_OK, and what it wrote.
    fn established() -> (ServerSession, BytesMut) {
        let mut session = ServerSession::new(LIMITS);
        let mut src = frames(&[hello()]);
        let event = session.poll_event(&mut src).expect("valid HELLO");
        assert!(matches!(event, Some(ServerEvent::Hello(_))));
        let mut out = BytesMut::new();
        session.accept_hello(pb::HelloOk::default(), &mut out);
        (session, out)
    }

    fn error_code_of(session: &mut ServerSession, messages: &[Message]) -> ErrorCode {
        let mut src = frames(messages);
        loop {
            match session.poll_event(&mut src) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("no error for {messages:?}"),
                Err(error) => return error.code,
            }
        }
    }

    #[test]
    fn handshake_writes_hello_ok_with_the_session_limits() {
        let (session, mut out) = established();
        assert!(session.is_established());
        let mut client_side = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let Some(Message::HelloOk(reply)) = client_side.decode(&mut out).expect("decodes") else {
            panic!("not HELLO_OK");
        };
        assert_eq!(reply.accepted_version, PROTOCOL_VERSION);
        assert_eq!(reply.frame_bytes_max, LIMITS.frame_bytes_max);
        assert_eq!(reply.inflight_requests_max, LIMITS.inflight_requests_max);
    }

    #[test]
    fn request_before_hello_is_hello_required() {
        let mut session = ServerSession::new(LIMITS);
        assert_eq!(
            error_code_of(&mut session, &[ping(1)]),
            ErrorCode::HelloRequired
        );
        assert!(session.is_closed());
        let again = session.poll_event(&mut frames(&[hello()]));
        assert_eq!(
            again.map_err(|error| error.code),
            Err(ErrorCode::HelloRequired)
        );
    }

    #[test]
    fn wrong_version_is_unsupported_version() {
        let mut session = ServerSession::new(LIMITS);
        let mut hello = example(MessageType::Hello);
        if let Message::Hello(inner) = &mut hello {
            inner.protocol_version = 2;
        }
        assert_eq!(
            error_code_of(&mut session, &[hello]),
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn hello_with_invalid_field_closes_with_invalid_field() {
        let mut session = ServerSession::new(LIMITS);
        let mut hello = example(MessageType::Hello);
        if let Message::Hello(inner) = &mut hello {
            inner.serial_number.clear();
        }
        assert_eq!(
            error_code_of(&mut session, &[hello]),
            ErrorCode::InvalidField
        );
    }

    #[test]
    fn events_wait_until_the_hello_is_accepted() {
        let mut session = ServerSession::new(LIMITS);
        let mut src = frames(&[hello(), ping(1)]);
        assert!(matches!(
            session.poll_event(&mut src),
            Ok(Some(ServerEvent::Hello(_)))
        ));
        let waiting = src.len();
        assert_eq!(session.poll_event(&mut src), Ok(None));
        assert_eq!(src.len(), waiting, "must not read past HELLO before accept");
        session.accept_hello(pb::HelloOk::default(), &mut BytesMut::new());
        assert_eq!(
            session.poll_event(&mut src),
            Ok(Some(ServerEvent::Request(ping(1))))
        );
    }

    #[test]
    fn seq_must_increase() {
        let (mut session, _) = established();
        assert_eq!(
            error_code_of(&mut session, &[ping(0)]),
            ErrorCode::SequenceError
        );
        let (mut session, mut out) = established();
        assert!(session.poll_event(&mut frames(&[ping(5)])).is_ok());
        session.respond(Message::ack(5, false), &mut out);
        assert_eq!(
            error_code_of(&mut session, &[ping(5)]),
            ErrorCode::SequenceError
        );
        let (mut session, _) = established();
        let code = error_code_of(&mut session, &[ping(3), ping(2)]);
        assert_eq!(code, ErrorCode::SequenceError);
    }

    #[test]
    fn second_hello_is_unexpected_message() {
        let (mut session, _) = established();
        assert_eq!(
            error_code_of(&mut session, &[hello()]),
            ErrorCode::UnexpectedMessage
        );
    }

    #[test]
    fn server_types_sent_by_a_client_are_unexpected_messages() {
        for message_type in [
            MessageType::Ack,
            MessageType::HelloOk,
            MessageType::PatientList,
        ] {
            let (mut session, _) = established();
            let code = error_code_of(&mut session, &[example(message_type)]);
            assert_eq!(code, ErrorCode::UnexpectedMessage, "{message_type}");
        }
        let mut session = ServerSession::new(LIMITS);
        let code = error_code_of(&mut session, &[example(MessageType::Error)]);
        assert_eq!(code, ErrorCode::UnexpectedMessage);
    }

    #[test]
    fn decoding_errors_close_the_session_with_their_code() {
        let (mut session, _) = established();
        let mut src = BytesMut::from(&[0u8, 0x20, 0, 0, 4][..]);
        let error = session.poll_event(&mut src).expect_err("too large");
        assert_eq!(error.code, ErrorCode::FrameTooLarge);
        let Message::Error(wire) = error.to_message() else {
            panic!("not an ERROR");
        };
        assert_eq!((wire.seq, wire.code), (0, 2));
        assert!(session.is_closed() && !session.is_established());
    }

    #[test]
    fn frame_limit_is_four_mib_until_hello_ok_then_the_servers() {
        let small = ServerLimits {
            frame_bytes_max: 64,
            inflight_requests_max: 4,
        };
        let mut session = ServerSession::new(small);
        // A HELLO header announcing 256 bytes: over 64 but within the 4 MiB before HELLO_OK.
        let mut src = BytesMut::from(&[0u8, 0, 1, 0, 1][..]);
        assert_eq!(session.poll_event(&mut src), Ok(None));
        let mut session = ServerSession::new(small);
        session.poll_event(&mut frames(&[hello()])).expect("HELLO");
        session.accept_hello(pb::HelloOk::default(), &mut BytesMut::new());
        let mut src = BytesMut::from(&[0u8, 0, 1, 0, 4][..]);
        let error = session
            .poll_event(&mut src)
            .expect_err("over the server's limit");
        assert_eq!(error.code, ErrorCode::FrameTooLarge);
    }

    #[test]
    fn inflight_limit_stops_reading_until_a_response() {
        let (mut session, mut out) = established();
        let mut src = frames(&[ping(1), ping(2), ping(3)]);
        assert!(session.poll_event(&mut src).expect("ok").is_some());
        assert!(!session.at_inflight_limit());
        assert!(session.poll_event(&mut src).expect("ok").is_some());
        assert_eq!(session.inflight(), 2);
        assert!(session.at_inflight_limit());
        let third_frame = src.len();
        assert_eq!(session.poll_event(&mut src), Ok(None));
        assert_eq!(src.len(), third_frame, "read past the in-flight limit");
        session.respond(Message::ack(2, false), &mut out);
        assert_eq!(session.inflight(), 1);
        assert_eq!(
            session.poll_event(&mut src),
            Ok(Some(ServerEvent::Request(ping(3))))
        );
        session.respond(error_message(1, ErrorCode::UnknownDish, "D1"), &mut out);
        session.respond(Message::ack(3, true), &mut out);
        assert_eq!(session.inflight(), 0);
    }

    #[test]
    fn connection_level_error_closes_the_session() {
        let (mut session, _) = established();
        let mut out = BytesMut::new();
        session.close_with_error(ErrorCode::Superseded, "ESP-1234 connected again", &mut out);
        assert!(session.is_closed());
        let error = session
            .poll_event(&mut frames(&[ping(1)]))
            .expect_err("closed");
        assert_eq!(error.code, ErrorCode::Superseded);
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let Some(Message::Error(wire)) = decoder.decode(&mut out).expect("decodes") else {
            panic!("not an ERROR");
        };
        assert_eq!((wire.seq, wire.name.as_str()), (0, "superseded"));
    }
}

#[cfg(test)]
mod garbage_tests {
    use super::*;
    use crate::incubator::error_message;
    use crate::incubator::samples::example;

    /// xorshift64: deterministic noise, so a failure replays.
    fn noise(state: &mut u64) -> u8 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        (*state >> 24) as u8
    }

    #[test]
    fn random_bytes_after_the_handshake_never_panic_and_errors_close() {
        for seed in 1..200u64 {
            let mut state = seed;
            let mut session = ServerSession::new(ServerLimits::default());
            let mut src = BytesMut::new();
            example(MessageType::Hello).encode(&mut src);
            session.poll_event(&mut src).expect("HELLO");
            session.accept_hello(pb::HelloOk::default(), &mut BytesMut::new());
            // A plausible header (small length, a real type) followed by noise.
            src.extend_from_slice(&[0, 0, 0, 40, 1 + noise(&mut state) % 12]);
            src.extend((0..64).map(|_| noise(&mut state)));
            for _ in 0..64 {
                match session.poll_event(&mut src) {
                    Ok(Some(ServerEvent::Request(request))) => {
                        let answer = error_message(request.seq(), ErrorCode::InternalError, "test");
                        session.respond(answer, &mut BytesMut::new());
                    }
                    Ok(Some(ServerEvent::Hello(_))) => panic!("seed {seed}: HELLO after handshake"),
                    Ok(None) => break,
                    Err(_) => {
                        assert!(session.is_closed(), "seed {seed}");
                        break;
                    }
                }
            }
        }
    }
}
