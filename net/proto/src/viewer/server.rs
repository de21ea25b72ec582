//! The sans-I/O server side of one viewer connection.

use bytes::BytesMut;

use super::codec::{encode_frame, FrameDecoder};
use super::error_code::{error_message, ErrorCode};
use super::pb::{self, client_message::Request, server_message::Body};
use super::{
    INFLIGHT_REQUESTS_MAX_DEFAULT, LOGIN_BYTES_MAX, PROTOCOL_VERSION, REQUEST_BYTES_MAX_DEFAULT,
    RESPONSE_BYTES_MAX_DEFAULT,
};
use crate::session::{self, Requests};

/// Limits the server announces in LoginOk and enforces on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest frame a viewer may send after login.
    pub request_bytes_max: u32,
    /// Largest frame the server sends.
    pub response_bytes_max: u32,
    /// Most unanswered requests; at the limit the session reads no further.
    pub inflight_requests_max: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            request_bytes_max: REQUEST_BYTES_MAX_DEFAULT,
            response_bytes_max: RESPONSE_BYTES_MAX_DEFAULT,
            inflight_requests_max: INFLIGHT_REQUESTS_MAX_DEFAULT,
        }
    }
}

/// A protocol violation that ends the session: the shared [`crate::session::SessionError`]
/// over the viewer's [`ErrorCode`]. Send [`SessionError::to_message`] (an `Error` with seq 0),
/// then close.
pub type SessionError = session::SessionError<ErrorCode>;

/// What the server has to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// A Login with a supported version. Check the credentials, then call
    /// [`ServerSession::accept_login`] or [`ServerSession::refuse_login`].
    Login(u64, pb::Login),
    /// A Resume with a supported version; the same two answers.
    Resume(u64, pb::Resume),
    /// A request after login, its seq checked. Answer it with [`ServerSession::respond`].
    Request(u64, Request),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingLogin,
    AwaitingAccept(u64),
    Established,
    Closed(SessionError),
}

/// The server side of one connection: Login or Resume first (in a frame of at most
/// [`LOGIN_BYTES_MAX`]), seqs strictly increasing, at most `inflight_requests_max` unanswered
/// requests (a playback is unanswered until its last frame). It knows nothing of storage.
#[derive(Debug)]
pub struct ServerSession {
    limits: ServerLimits,
    decoder: FrameDecoder,
    state: State,
    /// Unanswered requests (a playback until its last frame).
    requests: Requests<()>,
}

impl ServerSession {
    /// A session waiting for Login or Resume.
    pub fn new(limits: ServerLimits) -> Self {
        let limits = ServerLimits {
            inflight_requests_max: limits.inflight_requests_max.max(1),
            ..limits
        };
        ServerSession {
            limits,
            decoder: FrameDecoder::new(LOGIN_BYTES_MAX.min(limits.request_bytes_max)),
            state: State::AwaitingLogin,
            requests: Requests::new(limits.inflight_requests_max),
        }
    }

    /// Decodes the next event from the receive buffer.
    ///
    /// `Ok(None)` when no whole frame is there, while a login awaits its answer, and at the
    /// in-flight limit (bytes stay in `src`: stop reading). `Err` ends the session: send
    /// [`SessionError::to_message`] and close; later calls return the same error.
    pub fn poll_event(&mut self, src: &mut BytesMut) -> Result<Option<ServerEvent>, SessionError> {
        match &self.state {
            State::Closed(error) => return Err(error.clone()),
            State::AwaitingAccept(_) => return Ok(None),
            State::Established if self.at_inflight_limit() => return Ok(None),
            State::AwaitingLogin | State::Established => {}
        }
        let message = match self.decoder.decode::<pb::ClientMessage>(src) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(error) => return Err(self.close(error.into())),
        };
        let event = self.on_message(message);
        event.map(Some).map_err(|error| self.close(error))
    }

    fn on_message(&mut self, message: pb::ClientMessage) -> Result<ServerEvent, SessionError> {
        let seq = message.seq;
        let Some(request) = message.request else {
            return Err(SessionError::new(
                ErrorCode::MalformedFrame,
                format!("message seq {seq} carries no request"),
            ));
        };
        if let Err(last) = self.requests.take_seq(seq) {
            return Err(SessionError::new(
                ErrorCode::SequenceError,
                format!("seq {seq} after seq {last}: seq must increase"),
            ));
        }
        if self.state == State::AwaitingLogin {
            return self.on_login(seq, request);
        }
        if matches!(request, Request::Login(_) | Request::Resume(_)) {
            return Err(SessionError::new(
                ErrorCode::UnexpectedMessage,
                "the session is established already: a second Login or Resume",
            ));
        }
        self.requests.open(seq, ());
        Ok(ServerEvent::Request(seq, request))
    }

    fn on_login(&mut self, seq: u64, request: Request) -> Result<ServerEvent, SessionError> {
        let version = match &request {
            Request::Login(login) => login.protocol_version,
            Request::Resume(resume) => resume.protocol_version,
            other => {
                return Err(SessionError::new(
                    ErrorCode::LoginRequired,
                    format!(
                        "{} before login: the first request must be Login or Resume",
                        super::request_name(other)
                    ),
                ))
            }
        };
        if version != PROTOCOL_VERSION {
            return Err(SessionError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
                ),
            ));
        }
        self.state = State::AwaitingAccept(seq);
        Ok(match request {
            Request::Login(login) => ServerEvent::Login(seq, login),
            Request::Resume(resume) => ServerEvent::Resume(seq, resume),
            _ => unreachable!("checked above"),
        })
    }

    /// Writes LoginOk for the pending Login or Resume, with this session's limits and
    /// [`PROTOCOL_VERSION`] filled in; the caller fills in the rest.
    pub fn accept_login(&mut self, mut reply: pb::LoginOk, out: &mut BytesMut) {
        let State::AwaitingAccept(seq) = self.state else {
            debug_assert!(false, "accept_login without a pending login");
            return;
        };
        reply.accepted_version = PROTOCOL_VERSION;
        reply.request_bytes_max = self.limits.request_bytes_max;
        reply.response_bytes_max = self.limits.response_bytes_max;
        reply.inflight_requests_max = self.limits.inflight_requests_max;
        let message = pb::ServerMessage {
            seq,
            body: Some(Body::LoginOk(reply)),
        };
        encode_frame(&message, out);
        self.decoder
            .set_frame_bytes_max(self.limits.request_bytes_max);
        self.state = State::Established;
    }

    /// Writes the refusal of the pending Login or Resume and closes the session.
    pub fn refuse_login(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        out: &mut BytesMut,
    ) {
        let seq = match self.state {
            State::AwaitingAccept(seq) => seq,
            _ => 0,
        };
        let message = message.into();
        encode_frame(&error_message(seq, code, message.clone()), out);
        self.close(SessionError::new(code, message));
    }

    /// Writes an answer to request `seq`. Every body ends the request except a Frame that is
    /// not the last of its playback.
    pub fn respond(&mut self, seq: u64, body: Body, out: &mut BytesMut) {
        let more = matches!(&body, Body::Frame(frame) if !frame.last);
        if !more {
            let removed = self.requests.close(seq);
            debug_assert!(
                removed.is_some(),
                "respond: seq {seq} is not an unanswered request"
            );
        }
        encode_frame(
            &pb::ServerMessage {
                seq,
                body: Some(body),
            },
            out,
        );
    }

    /// Writes a pushed change notice (seq 0). Only once established.
    pub fn push(&mut self, notice: pb::ChangeNotice, out: &mut BytesMut) {
        debug_assert_eq!(self.state, State::Established);
        encode_frame(
            &pb::ServerMessage {
                seq: 0,
                body: Some(Body::Change(notice)),
            },
            out,
        );
    }

    /// Writes Error `code` with seq 0 and closes the session.
    pub fn close_with_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        out: &mut BytesMut,
    ) {
        let error = SessionError::new(code, message);
        encode_frame(&error.to_message(), out);
        self.close(error);
    }

    /// Requests received and not answered completely.
    pub fn inflight(&self) -> u32 {
        self.requests.unanswered()
    }

    /// True while request `seq` awaits (more of) its answer.
    pub fn is_inflight(&self, seq: u64) -> bool {
        self.requests.is_open(seq)
    }

    /// True at the in-flight limit: read no further.
    pub fn at_inflight_limit(&self) -> bool {
        self.requests.is_full()
    }

    /// True between LoginOk and the end of the session.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// True once an error ended the session.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// The limits in force.
    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    fn close(&mut self, error: SessionError) -> SessionError {
        self.state = State::Closed(error.clone());
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::viewer::encode_request;

    fn frame(seq: u64, request: Request) -> BytesMut {
        let mut out = BytesMut::new();
        encode_request(seq, request, &mut out);
        out
    }

    fn login() -> Request {
        Request::Login(pb::Login {
            protocol_version: PROTOCOL_VERSION,
            user: "anna".into(),
            password: "Secret-123".into(),
            computer: "VIEWER-1".into(),
            ..Default::default()
        })
    }

    fn established(limits: ServerLimits) -> ServerSession {
        let mut session = ServerSession::new(limits);
        let event = session.poll_event(&mut frame(1, login())).unwrap();
        assert!(matches!(event, Some(ServerEvent::Login(1, _))));
        let mut out = BytesMut::new();
        session.accept_login(pb::LoginOk::default(), &mut out);
        let reply = FrameDecoder::new(u32::MAX)
            .decode::<pb::ServerMessage>(&mut out)
            .unwrap()
            .unwrap();
        let Some(Body::LoginOk(ok)) = reply.body else {
            panic!("{reply:?}");
        };
        assert_eq!(reply.seq, 1);
        assert_eq!(ok.inflight_requests_max, limits.inflight_requests_max);
        assert!(session.is_established());
        session
    }

    #[test]
    fn the_first_request_must_be_login_or_resume() {
        let mut session = ServerSession::new(ServerLimits::default());
        let error = session
            .poll_event(&mut frame(1, Request::Ping(pb::Ping {})))
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::LoginRequired);
        assert!(session.is_closed());
    }

    #[test]
    fn an_unsupported_version_is_refused() {
        let mut session = ServerSession::new(ServerLimits::default());
        let old = Request::Resume(pb::Resume {
            protocol_version: 9,
            ..Default::default()
        });
        let error = session.poll_event(&mut frame(1, old)).unwrap_err();
        assert_eq!(error.code, ErrorCode::UnsupportedVersion);
    }

    #[test]
    fn a_large_frame_before_login_is_refused_from_its_length() {
        let mut session = ServerSession::new(ServerLimits::default());
        let mut src = BytesMut::from(&(LOGIN_BYTES_MAX + 1).to_be_bytes()[..]);
        let error = session.poll_event(&mut src).unwrap_err();
        assert_eq!(error.code, ErrorCode::FrameTooLarge);
    }

    #[test]
    fn seqs_must_increase_and_a_second_login_is_unexpected() {
        let mut session = established(ServerLimits::default());
        let error = session
            .poll_event(&mut frame(1, Request::Ping(pb::Ping {})))
            .unwrap_err();
        assert_eq!(error.code, ErrorCode::SequenceError);
        let mut session = established(ServerLimits::default());
        let error = session.poll_event(&mut frame(2, login())).unwrap_err();
        assert_eq!(error.code, ErrorCode::UnexpectedMessage);
    }

    #[test]
    fn a_playback_is_in_flight_until_its_last_frame_and_the_limit_stops_reading() {
        let limits = ServerLimits {
            inflight_requests_max: 2,
            ..ServerLimits::default()
        };
        let mut session = established(limits);
        let mut src = frame(2, Request::Playback(pb::Playback::default()));
        src.extend_from_slice(&frame(3, Request::Ping(pb::Ping {})));
        src.extend_from_slice(&frame(4, Request::Ping(pb::Ping {})));
        assert!(session.poll_event(&mut src).unwrap().is_some());
        assert!(session.poll_event(&mut src).unwrap().is_some());
        assert!(session.at_inflight_limit());
        assert_eq!(
            session.poll_event(&mut src).unwrap(),
            None,
            "held at the limit"
        );
        let mut out = BytesMut::new();
        let frame_body = |last| {
            Body::Frame(pb::Frame {
                image: None,
                index: 0,
                last,
            })
        };
        session.respond(2, frame_body(false), &mut out);
        assert!(session.is_inflight(2));
        session.respond(2, frame_body(true), &mut out);
        assert!(!session.is_inflight(2));
        assert!(matches!(
            session.poll_event(&mut src).unwrap(),
            Some(ServerEvent::Request(4, _))
        ));
    }

    #[test]
    fn an_envelope_without_a_request_is_malformed() {
        let mut session = ServerSession::new(ServerLimits::default());
        let mut out = BytesMut::new();
        encode_frame(
            &pb::ClientMessage {
                seq: 1,
                request: None,
            },
            &mut out,
        );
        let error = session.poll_event(&mut out).unwrap_err();
        assert_eq!(error.code, ErrorCode::MalformedFrame);
    }
}
