//! The sans-I/O client side of one incubator connection (simulators, load generator, tests).

use std::collections::BTreeMap;

use bytes::BytesMut;

use super::codec::FrameDecoder;
use super::error_code::ErrorCode;
use super::message::{Message, MessageType};
use super::server::SessionError;
use super::{pb, FRAME_BYTES_MAX_DEFAULT, PROTOCOL_VERSION};

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The handshake succeeded. Store a non-empty `issued_secret` durably before going on.
    HelloOk(pb::HelloOk),
    /// The answer to the request `seq`, or a connection-level ERROR when `seq` is 0 (the
    /// server closes the connection after it; the session is closed too).
    Response {
        /// The request's seq (0 for a connection-level ERROR).
        seq: u64,
        /// ACK, ERROR, SYNC_STATE_RESULT or PATIENT_LIST.
        message: Message,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingHelloOk,
    Established,
    Closed(SessionError),
}

/// The client side of one connection: builds HELLO, numbers requests, remembers which are
/// unanswered and checks that each response answers one of them. One session per
/// connection; after a reconnect start a new one (seqs start at 1 again).
#[derive(Debug)]
pub struct ClientSession {
    decoder: FrameDecoder,
    state: State,
    next_seq: u64,
    pending: BTreeMap<u64, MessageType>,
    hello_ok: Option<pb::HelloOk>,
}

impl ClientSession {
    /// A session that accepts frames from the server up to `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> Self {
        ClientSession {
            decoder: FrameDecoder::new(frame_bytes_max),
            state: State::AwaitingHelloOk,
            next_seq: 1,
            pending: BTreeMap::new(),
            hello_ok: None,
        }
    }

    /// Writes HELLO to `out`; a `protocol_version` of 0 is set to [`PROTOCOL_VERSION`].
    pub fn hello(&mut self, mut hello: pb::Hello, out: &mut BytesMut) {
        if hello.protocol_version == 0 {
            hello.protocol_version = PROTOCOL_VERSION;
        }
        Message::Hello(hello).encode(out);
    }

    /// Assigns the next seq to the request `message` (overwriting its seq), writes it to `out`
    /// and returns the seq. The caller keeps within [`Self::can_send`]; [`Self::try_send`]
    /// also checks the server's frame limit.
    pub fn send(&mut self, mut message: Message, out: &mut BytesMut) -> u64 {
        debug_assert!(message.message_type().is_request(), "send: not a request");
        let seq = self.next_seq;
        self.next_seq += 1;
        message.set_seq(seq);
        self.pending.insert(seq, message.message_type());
        message.encode(out);
        seq
    }

    /// Like [`Self::send`], but refuses (writing nothing) a message that is not a request or
    /// whose frame exceeds the frame_bytes_max announced in HELLO_OK (4 MiB before it).
    pub fn try_send(&mut self, message: Message, out: &mut BytesMut) -> Result<u64, SessionError> {
        let message_type = message.message_type();
        if !message_type.is_request() {
            let text = format!("{message_type} is not a request");
            return Err(SessionError::new(ErrorCode::UnexpectedMessage, text));
        }
        let length = message.frame_length();
        let max = self.server_frame_bytes_max();
        if length > u64::from(max) {
            let text = format!("{message_type} frame of {length} bytes exceeds the server's {max}");
            return Err(SessionError::new(ErrorCode::FrameTooLarge, text));
        }
        Ok(self.send(message, out))
    }

    /// Decodes the next frame from the server. `Ok(None)` when no whole frame is there.
    /// `Err` when the server broke the protocol (undecodable frame, a second HELLO_OK, a
    /// response to no unanswered request or of the wrong type); the session is closed then.
    pub fn poll_response(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<ClientEvent>, SessionError> {
        if let State::Closed(error) = &self.state {
            return Err(error.clone());
        }
        let message = match self.decoder.decode(src) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(error) => return Err(self.close(error.into())),
        };
        self.on_message(message)
            .map(Some)
            .map_err(|error| self.close(error))
    }

    /// Requests sent and not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// True when the request `seq` is still unanswered.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.pending.contains_key(&seq)
    }

    /// True when established and below the server's inflight_requests_max.
    pub fn can_send(&self) -> bool {
        let Some(hello_ok) = &self.hello_ok else {
            return false;
        };
        self.is_established()
            && (self.pending.len() as u64) < u64::from(hello_ok.inflight_requests_max)
    }

    /// The HELLO_OK received, if any.
    pub fn hello_ok(&self) -> Option<&pb::HelloOk> {
        self.hello_ok.as_ref()
    }

    /// The largest frame the server accepts: from HELLO_OK, or 4 MiB before it.
    pub fn server_frame_bytes_max(&self) -> u32 {
        self.hello_ok
            .as_ref()
            .map_or(FRAME_BYTES_MAX_DEFAULT, |hello_ok| hello_ok.frame_bytes_max)
    }

    /// True after HELLO_OK and until the session closes.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True once an error (ours or a connection-level ERROR from the server) ended the session.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    fn on_message(&mut self, message: Message) -> Result<ClientEvent, SessionError> {
        match message {
            Message::HelloOk(hello_ok) => self.on_hello_ok(hello_ok),
            Message::Error(error) if error.seq == 0 => Ok(self.on_connection_error(error)),
            other => self.on_response(other),
        }
    }

    fn on_hello_ok(&mut self, hello_ok: pb::HelloOk) -> Result<ClientEvent, SessionError> {
        if self.state != State::AwaitingHelloOk {
            return Err(SessionError::new(
                ErrorCode::UnexpectedMessage,
                "second HELLO_OK",
            ));
        }
        if hello_ok.accepted_version != PROTOCOL_VERSION {
            let text = format!("server accepted version {}", hello_ok.accepted_version);
            return Err(SessionError::new(ErrorCode::UnsupportedVersion, text));
        }
        self.hello_ok = Some(hello_ok.clone());
        self.state = State::Established;
        Ok(ClientEvent::HelloOk(hello_ok))
    }

    fn on_connection_error(&mut self, error: pb::Error) -> ClientEvent {
        let code = ErrorCode::from_code(error.code).unwrap_or(ErrorCode::InternalError);
        self.close(SessionError::new(code, error.message.clone()));
        ClientEvent::Response {
            seq: 0,
            message: Message::Error(error),
        }
    }

    fn on_response(&mut self, message: Message) -> Result<ClientEvent, SessionError> {
        let message_type = message.message_type();
        if message_type.is_client_to_server() {
            let text = format!("{message_type} is sent by incubators, never by the server");
            return Err(SessionError::new(ErrorCode::UnexpectedMessage, text));
        }
        if !self.is_established() {
            let text = format!("{message_type} before HELLO_OK");
            return Err(SessionError::new(ErrorCode::UnexpectedMessage, text));
        }
        let seq = message.seq();
        let Some(request_type) = self.pending.remove(&seq) else {
            let text = format!("{message_type} for seq {seq}, which is not an unanswered request");
            return Err(SessionError::new(ErrorCode::UnexpectedMessage, text));
        };
        if !request_type.accepts_response(message_type) {
            let text = format!("{message_type} does not answer {request_type} (seq {seq})");
            return Err(SessionError::new(ErrorCode::UnexpectedMessage, text));
        }
        Ok(ClientEvent::Response { seq, message })
    }

    fn close(&mut self, error: SessionError) -> SessionError {
        self.state = State::Closed(error.clone());
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incubator::error_code::error_message;
    use crate::incubator::samples::example;
    use crate::incubator::{ServerEvent, ServerLimits, ServerSession};

    fn hello_ok(inflight_requests_max: u32) -> Message {
        Message::HelloOk(pb::HelloOk {
            accepted_version: PROTOCOL_VERSION,
            frame_bytes_max: 1000,
            inflight_requests_max,
            ..Default::default()
        })
    }

    fn established(inflight_requests_max: u32) -> ClientSession {
        let mut client = ClientSession::new(FRAME_BYTES_MAX_DEFAULT);
        let mut src = hello_ok(inflight_requests_max).to_bytes().into();
        let event = client.poll_response(&mut src).expect("valid HELLO_OK");
        assert!(matches!(event, Some(ClientEvent::HelloOk(_))));
        client
    }

    fn ping() -> Message {
        Message::Ping(pb::Ping { seq: 999 })
    }

    fn receive(
        client: &mut ClientSession,
        message: Message,
    ) -> Result<Option<ClientEvent>, SessionError> {
        client.poll_response(&mut message.to_bytes().into())
    }

    #[test]
    fn send_assigns_increasing_seqs_from_one() {
        let mut client = established(8);
        let mut out = BytesMut::new();
        let seqs: Vec<u64> = (0..3).map(|_| client.send(ping(), &mut out)).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
        let sent = decoder
            .decode(&mut out)
            .expect("decodes")
            .expect("complete");
        assert_eq!(sent.seq(), 1, "seq not written into the frame");
        assert_eq!(client.pending(), 3);
    }

    #[test]
    fn responses_match_pending_requests_in_any_order() {
        let mut client = established(8);
        let mut out = BytesMut::new();
        let image = client.send(example(MessageType::Image), &mut out);
        let sync = client.send(example(MessageType::SyncState), &mut out);
        let mut result = example(MessageType::SyncStateResult);
        result.set_seq(sync);
        let event = receive(&mut client, result.clone())
            .expect("valid")
            .expect("event");
        assert_eq!(
            event,
            ClientEvent::Response {
                seq: sync,
                message: result
            }
        );
        assert!(client.is_pending(image) && !client.is_pending(sync));
        let event = receive(&mut client, Message::ack(image, true)).expect("valid");
        assert!(matches!(event, Some(ClientEvent::Response { seq, .. }) if seq == image));
        assert_eq!(client.pending(), 0);
    }

    #[test]
    fn response_to_an_unknown_seq_is_an_error() {
        let mut client = established(8);
        let seq = client.send(ping(), &mut BytesMut::new());
        let error = receive(&mut client, Message::ack(seq + 1, false)).expect_err("unknown seq");
        assert_eq!(error.code, ErrorCode::UnexpectedMessage);
        assert!(client.is_closed());
    }

    #[test]
    fn response_of_the_wrong_type_is_an_error() {
        let mut client = established(8);
        let seq = client.send(example(MessageType::ListPatients), &mut BytesMut::new());
        let error = receive(&mut client, Message::ack(seq, false)).expect_err("ACK for a list");
        assert_eq!(error.code, ErrorCode::UnexpectedMessage);
    }

    #[test]
    fn a_request_can_be_answered_only_once() {
        let mut client = established(8);
        let seq = client.send(ping(), &mut BytesMut::new());
        receive(&mut client, Message::ack(seq, false)).expect("first answer");
        assert!(receive(&mut client, Message::ack(seq, false)).is_err());
    }

    #[test]
    fn connection_error_is_delivered_then_closes() {
        let mut client = ClientSession::new(FRAME_BYTES_MAX_DEFAULT);
        let error = error_message(0, ErrorCode::AuthFailed, "wrong secret");
        let event = receive(&mut client, error.clone()).expect("delivered");
        assert_eq!(
            event,
            Some(ClientEvent::Response {
                seq: 0,
                message: error
            })
        );
        assert!(client.is_closed());
        let later = client
            .poll_response(&mut BytesMut::new())
            .expect_err("closed");
        assert_eq!(later.code, ErrorCode::AuthFailed);
    }

    #[test]
    fn response_before_hello_ok_and_second_hello_ok_are_errors() {
        let mut client = ClientSession::new(FRAME_BYTES_MAX_DEFAULT);
        client.send(ping(), &mut BytesMut::new());
        assert!(receive(&mut client, Message::ack(1, false)).is_err());
        let mut client = established(8);
        let error = receive(&mut client, hello_ok(8)).expect_err("second HELLO_OK");
        assert_eq!(error.code, ErrorCode::UnexpectedMessage);
    }

    #[test]
    fn can_send_follows_the_servers_inflight_limit() {
        let client = ClientSession::new(FRAME_BYTES_MAX_DEFAULT);
        assert!(!client.can_send(), "before HELLO_OK");
        let mut client = established(2);
        let mut out = BytesMut::new();
        client.send(ping(), &mut out);
        assert!(client.can_send());
        client.send(ping(), &mut out);
        assert!(!client.can_send());
        receive(&mut client, Message::ack(1, false)).expect("valid");
        assert!(client.can_send());
    }

    #[test]
    fn try_send_refuses_frames_over_the_servers_limit() {
        let mut client = established(8);
        let mut image = example(MessageType::Image);
        if let Message::Image(inner) = &mut image {
            inner.jpeg = vec![0u8; 1000].into();
        }
        let mut out = BytesMut::new();
        let error = client
            .try_send(image, &mut out)
            .expect_err("over 1000 bytes");
        assert_eq!(error.code, ErrorCode::FrameTooLarge);
        assert!(out.is_empty() && client.pending() == 0);
        assert_eq!(client.try_send(ping(), &mut out), Ok(1));
        let refused = client.try_send(example(MessageType::Ack), &mut out);
        assert_eq!(
            refused.map_err(|error| error.code),
            Err(ErrorCode::UnexpectedMessage)
        );
    }

    #[test]
    fn client_and_server_sessions_talk_to_each_other() {
        let mut client = ClientSession::new(FRAME_BYTES_MAX_DEFAULT);
        let mut server = ServerSession::new(ServerLimits::default());
        let (mut to_server, mut to_client) = (BytesMut::new(), BytesMut::new());
        client.hello(
            pb::Hello {
                protocol_version: 0,
                ..hello_fields()
            },
            &mut to_server,
        );
        let Some(ServerEvent::Hello(hello)) = server.poll_event(&mut to_server).expect("ok") else {
            panic!("no HELLO");
        };
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        server.accept_hello(pb::HelloOk::default(), &mut to_client);
        assert!(matches!(
            client.poll_response(&mut to_client),
            Ok(Some(ClientEvent::HelloOk(_)))
        ));
        let first = client.send(example(MessageType::Image), &mut to_server);
        let second = client.send(example(MessageType::SyncState), &mut to_server);
        let mut requests = Vec::new();
        while let Some(ServerEvent::Request(request)) =
            server.poll_event(&mut to_server).expect("ok")
        {
            requests.push(request);
        }
        assert_eq!(
            requests.iter().map(Message::seq).collect::<Vec<_>>(),
            vec![first, second]
        );
        server.respond(Message::ack(first, false), &mut to_client);
        let event = client.poll_response(&mut to_client).expect("ok");
        assert!(matches!(event, Some(ClientEvent::Response { seq, .. }) if seq == first));
        assert_eq!((client.pending(), server.inflight()), (1, 1));
    }

    fn hello_fields() -> pb::Hello {
        match example(MessageType::Hello) {
            Message::Hello(hello) => hello,
            _ => pb::Hello::default(),
        }
    }
}
