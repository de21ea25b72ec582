//! Fuzzing harnesses of the incubator and viewer protocols, shared by the libFuzzer targets
//! in `fuzz/` and by the seeded tests below that run on every `cargo test` (their twins).
//!
//! Each harness takes arbitrary bytes and drives the frame decoder and the server session
//! the way a server does, checking the invariants on the way: no panic, every error closes the
//! session and is repeated, nothing is consumed without progress, in-flight requests stay
//! within the limit, a decoded message re-encodes to itself. Built only for tests and with the
//! `fuzzing` feature.

use bytes::BytesMut;

use crate::incubator;
use crate::viewer;

/// A small deterministic generator (splitmix64): the harnesses draw their choices (piece
/// sizes, when to answer) from it, seeded by the input, so a crash replays from its input.
#[derive(Debug, Clone)]
pub struct Noise(u64);

impl Noise {
    pub fn new(seed: u64) -> Noise {
        Noise(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// How far one input went: the twins check that their inputs reach the session's logic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reached {
    /// Requests the session handed out (after a handshake).
    pub requests: usize,
    /// Inputs that ended the session with an error.
    pub session_errors: usize,
}

/// How a harness reads its input: the first byte chooses the limits, the piece sizes and
/// whether the rest is raw bytes or short records to wrap in valid frame headers (so that
/// the fuzzer reaches the session's logic without having to discover the framing first).
struct Plan<'a> {
    control: u8,
    body: &'a [u8],
    noise: Noise,
}

impl<'a> Plan<'a> {
    fn new(data: &'a [u8]) -> Plan<'a> {
        let (control, body) = match data.split_first() {
            Some((control, body)) => (*control, body),
            None => (0, &[][..]),
        };
        let mut seed = 0xcbf2_9ce4_8422_2325u64 ^ u64::from(control);
        for chunk in body.chunks(8).take(4) {
            for byte in chunk {
                seed = (seed ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Plan {
            control,
            body,
            noise: Noise::new(seed ^ body.len() as u64),
        }
    }

    /// Structured input: records wrapped in frame headers.
    fn structured(&self) -> bool {
        self.control & 0x80 != 0
    }

    /// Structured input starts with a valid handshake frame.
    fn handshake_first(&self) -> bool {
        self.control & 0x40 != 0
    }

    fn small_limits(&self) -> bool {
        self.control & 0x20 != 0
    }

    fn inflight_max(&self) -> u32 {
        1 + u32::from(self.control & 0x03)
    }

    /// Size of the next piece handed to the session: whole input, or 1..=n bytes.
    fn piece(&mut self, left: usize) -> usize {
        match self.control & 0x0c {
            0x00 => left,
            0x04 => 1,
            _ => 1 + self.noise.below(left.clamp(1, 64)),
        }
        .min(left)
    }
}

/// Drives the incubator protocol's [`incubator::FrameDecoder`] and
/// [`incubator::ServerSession`] with arbitrary bytes.
pub fn incubator_server(data: &[u8]) -> Reached {
    use incubator::{
        samples::example, validate_request, ErrorCode, FrameDecoder, Message, MessageType,
        ServerEvent, ServerLimits, ServerSession, FRAME_BYTES_MAX_DEFAULT,
    };

    let mut plan = Plan::new(data);
    let frame_bytes_max = if plan.small_limits() {
        256
    } else {
        FRAME_BYTES_MAX_DEFAULT
    };
    let mut stream = BytesMut::new();
    if plan.structured() {
        if plan.handshake_first() {
            example(MessageType::Hello).encode(&mut stream);
        }
        // Records: type byte, length byte, payload.
        let mut rest = plan.body;
        while let [type_byte, length, tail @ ..] = rest {
            let length = usize::from(*length).min(tail.len());
            stream.extend_from_slice(&(length as u32 + 1).to_be_bytes());
            stream.extend_from_slice(&[*type_byte]);
            stream.extend_from_slice(&tail[..length]);
            rest = &tail[length..];
        }
        stream.extend_from_slice(rest);
    } else {
        stream.extend_from_slice(plan.body);
    }

    // The decoder alone: frames come off the front one by one until it waits or refuses.
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    let mut src = stream.clone();
    loop {
        let before = src.len();
        match decoder.decode(&mut src) {
            Ok(Some(message)) => {
                assert!(src.len() < before, "a frame consumed nothing");
                assert!((before - src.len()) as u64 <= 4 + u64::from(frame_bytes_max));
                // What decoded encodes to a frame that decodes to the same message.
                let bytes = message.to_bytes();
                assert_eq!(bytes.len(), message.encoded_len());
                let mut again = BytesMut::from(&bytes[..]);
                let decoded = FrameDecoder::new(u32::MAX)
                    .decode(&mut again)
                    .expect("a re-encoded frame decodes")
                    .expect("a re-encoded frame is complete");
                // Compared as bytes: a decoded NaN (refused later by validation) is not equal
                // to itself, its encoding is.
                assert_eq!(decoded.to_bytes(), bytes);
                assert!(again.is_empty());
                let _ = validate_request(&message);
            }
            Ok(None) => {
                assert_eq!(src.len(), before, "waiting consumed bytes");
                assert!(
                    decoder.bytes_wanted(&src) > 0,
                    "waits while a frame is complete"
                );
                break;
            }
            Err(error) => {
                let _ = error.error_code();
                assert!(!error.to_string().is_empty());
                break;
            }
        }
    }

    // The server session, fed in pieces, answering requests now or later.
    let limits = ServerLimits {
        frame_bytes_max,
        inflight_requests_max: plan.inflight_max(),
    };
    let mut session = ServerSession::new(limits);
    let mut src = BytesMut::new();
    let mut out = BytesMut::new();
    let mut unanswered: Vec<Message> = Vec::new();
    let mut fed = 0;
    let mut reached = Reached::default();
    let answer = |session: &mut ServerSession, request: Message, out: &mut BytesMut| {
        let seq = request.seq();
        let reply = match validate_request(&request) {
            Err(error) => error.to_error(seq),
            Ok(()) => {
                let reply_type = match request.message_type() {
                    MessageType::SyncState => MessageType::SyncStateResult,
                    MessageType::ListPatients => MessageType::PatientList,
                    _ => MessageType::Ack,
                };
                let mut reply = example(reply_type);
                reply.set_seq(seq);
                reply
            }
        };
        session.respond(reply, out);
    };
    'feeding: loop {
        let piece = plan.piece(stream.len() - fed);
        src.extend_from_slice(&stream[fed..fed + piece]);
        fed += piece;
        let last_piece = fed == stream.len();
        for _ in 0..stream.len() + 2 {
            let before = src.len();
            let event = session.poll_event(&mut src);
            assert!(src.len() <= before);
            assert!(session.inflight() <= limits.inflight_requests_max);
            match event {
                Ok(Some(ServerEvent::Hello(hello))) => {
                    assert!(src.len() < before);
                    assert!(!hello.serial_number.is_empty());
                    if plan.noise.below(8) == 0 {
                        // Every way the server refuses a HELLO: ERROR seq 0, then closed.
                        let refusals = [
                            ErrorCode::AuthFailed,
                            ErrorCode::CapacityExceeded,
                            ErrorCode::EnrolmentInProgress,
                            ErrorCode::EnrolmentPending,
                        ];
                        let code = refusals[plan.noise.below(refusals.len())];
                        assert!(code.closes_connection());
                        session.close_with_error(code, "fuzz", &mut out);
                        assert!(session.is_closed() && !session.is_established());
                    } else {
                        session.accept_hello(Default::default(), &mut out);
                        assert!(session.is_established());
                    }
                }
                Ok(Some(ServerEvent::Request(request))) => {
                    assert!(src.len() < before);
                    assert!(session.is_established());
                    assert!(request.message_type().is_request());
                    reached.requests += 1;
                    assert_ne!(request.seq(), 0);
                    unanswered.push(request);
                    if plan.noise.below(2) == 0 {
                        let at = plan.noise.below(unanswered.len());
                        answer(&mut session, unanswered.swap_remove(at), &mut out);
                    }
                }
                Ok(None) => {
                    if last_piece && !unanswered.is_empty() {
                        // The storage completes what is in flight; reading resumes.
                        for request in unanswered.drain(..) {
                            answer(&mut session, request, &mut out);
                        }
                        assert_eq!(session.inflight(), 0);
                        continue;
                    }
                    break;
                }
                Err(error) => {
                    reached.session_errors += 1;
                    assert!(session.is_closed() && !session.is_established());
                    assert_eq!(session.poll_event(&mut src), Err(error.clone()));
                    let mut wire = BytesMut::new();
                    error.to_message().encode(&mut wire);
                    let Ok(Some(Message::Error(reported))) =
                        FrameDecoder::new(u32::MAX).decode(&mut wire)
                    else {
                        panic!("a session error encodes as an ERROR frame");
                    };
                    assert_eq!((reported.seq, reported.code), (0, error.code.code()));
                    break 'feeding;
                }
            }
        }
        if last_piece {
            break;
        }
    }
    // Everything the server wrote is a stream of whole frames it can decode itself.
    let mut decoder = FrameDecoder::new(u32::MAX);
    while !out.is_empty() {
        decoder
            .decode(&mut out)
            .expect("the server's own frames decode")
            .expect("the server writes whole frames");
    }
    reached
}

/// Drives the viewer protocol's [`viewer::FrameDecoder`] and [`viewer::ServerSession`] with
/// arbitrary bytes.
pub fn viewer_server(data: &[u8]) -> Reached {
    use viewer::pb::{self, client_message::Request, server_message::Body};
    use viewer::{
        encode_frame, ErrorCode, FrameDecoder, ServerEvent, ServerLimits, ServerSession,
        LOGIN_BYTES_MAX, PROTOCOL_VERSION,
    };

    let mut plan = Plan::new(data);
    let limits = ServerLimits {
        request_bytes_max: if plan.small_limits() {
            128
        } else {
            viewer::REQUEST_BYTES_MAX_DEFAULT
        },
        response_bytes_max: viewer::RESPONSE_BYTES_MAX_DEFAULT,
        inflight_requests_max: plan.inflight_max(),
    };
    let mut stream = BytesMut::new();
    if plan.structured() {
        if plan.handshake_first() {
            let login = pb::ClientMessage {
                seq: 1,
                request: Some(Request::Login(pb::Login {
                    protocol_version: PROTOCOL_VERSION,
                    user: "anna".into(),
                    password: "Embryo-2026!".into(),
                    computer: "VIEWER-1".into(),
                    ..Default::default()
                })),
            };
            encode_frame(&login, &mut stream);
        }
        // Records: length byte, payload.
        let mut rest = plan.body;
        while let [length, tail @ ..] = rest {
            let length = usize::from(*length).min(tail.len());
            stream.extend_from_slice(&(length as u32).to_be_bytes());
            stream.extend_from_slice(&tail[..length]);
            rest = &tail[length..];
        }
    } else {
        stream.extend_from_slice(plan.body);
    }

    // The decoder alone.
    let frame_bytes_max = LOGIN_BYTES_MAX.min(limits.request_bytes_max);
    let mut decoder = FrameDecoder::new(frame_bytes_max);
    let mut src = stream.clone();
    loop {
        let before = src.len();
        match decoder.decode::<pb::ClientMessage>(&mut src) {
            Ok(Some(message)) => {
                assert!(
                    before - src.len() >= 4,
                    "a frame consumed less than its length"
                );
                assert!((before - src.len()) as u64 <= 4 + u64::from(frame_bytes_max));
                let mut again = BytesMut::new();
                encode_frame(&message, &mut again);
                let first = again.clone();
                let decoded = FrameDecoder::new(u32::MAX)
                    .decode::<pb::ClientMessage>(&mut again)
                    .expect("a re-encoded frame decodes")
                    .expect("a re-encoded frame is complete");
                // Compared as bytes: a decoded NaN is not equal to itself, its encoding is.
                let mut twice = BytesMut::new();
                encode_frame(&decoded, &mut twice);
                assert_eq!(twice, first);
                assert!(again.is_empty());
                if let Some(request) = &message.request {
                    assert!(!viewer::request_name(request).is_empty());
                    let _ = viewer::is_write(request);
                }
            }
            Ok(None) => {
                assert_eq!(src.len(), before, "waiting consumed bytes");
                break;
            }
            Err(error) => {
                assert!(!error.to_string().is_empty());
                break;
            }
        }
    }

    // The server session, fed in pieces; logins accepted or refused, requests answered now
    // or later, playbacks answered in several frames, change notices pushed.
    let mut session = ServerSession::new(limits);
    let mut src = BytesMut::new();
    let mut out = BytesMut::new();
    let mut unanswered: Vec<(u64, bool)> = Vec::new();
    let mut fed = 0;
    let mut reached = Reached::default();
    let answer = |session: &mut ServerSession, seq: u64, playback: bool, out: &mut BytesMut| {
        if playback {
            session.respond(
                seq,
                Body::Frame(pb::Frame {
                    image: None,
                    index: 0,
                    last: false,
                }),
                out,
            );
            assert!(session.is_inflight(seq));
            session.respond(
                seq,
                Body::Frame(pb::Frame {
                    image: None,
                    index: 1,
                    last: true,
                }),
                out,
            );
        } else {
            session.respond(seq, Body::Done(pb::Done {}), out);
        }
        assert!(!session.is_inflight(seq));
    };
    'feeding: loop {
        let piece = plan.piece(stream.len() - fed);
        src.extend_from_slice(&stream[fed..fed + piece]);
        fed += piece;
        let last_piece = fed == stream.len();
        for _ in 0..stream.len() + 2 {
            let before = src.len();
            let event = session.poll_event(&mut src);
            assert!(src.len() <= before);
            assert!(session.inflight() <= limits.inflight_requests_max);
            match event {
                Ok(Some(ServerEvent::Login(seq, _) | ServerEvent::Resume(seq, _))) => {
                    assert_ne!(seq, 0);
                    if plan.noise.below(8) == 0 {
                        session.refuse_login(ErrorCode::AuthFailed, "fuzz", &mut out);
                        assert!(session.is_closed());
                    } else {
                        session.accept_login(Default::default(), &mut out);
                        assert!(session.is_established());
                    }
                }
                Ok(Some(ServerEvent::Request(seq, request))) => {
                    assert!(session.is_established() && session.is_inflight(seq));
                    assert!(!matches!(request, Request::Login(_) | Request::Resume(_)));
                    reached.requests += 1;
                    unanswered.push((seq, matches!(request, Request::Playback(_))));
                    if plan.noise.below(4) == 0 {
                        session.push(pb::ChangeNotice::default(), &mut out);
                    }
                    if plan.noise.below(2) == 0 {
                        let (seq, playback) =
                            unanswered.swap_remove(plan.noise.below(unanswered.len()));
                        answer(&mut session, seq, playback, &mut out);
                    }
                }
                Ok(None) => {
                    if last_piece && !unanswered.is_empty() {
                        for (seq, playback) in std::mem::take(&mut unanswered) {
                            answer(&mut session, seq, playback, &mut out);
                        }
                        assert_eq!(session.inflight(), 0);
                        continue;
                    }
                    break;
                }
                Err(error) => {
                    reached.session_errors += 1;
                    assert!(session.is_closed() && !session.is_established());
                    assert_eq!(session.poll_event(&mut src), Err(error.clone()));
                    let message = error.to_message();
                    assert_eq!(message.seq, 0);
                    assert!(
                        matches!(message.body, Some(Body::Error(ref e)) if e.code == error.code.code())
                    );
                    break 'feeding;
                }
            }
        }
        if last_piece {
            break;
        }
    }
    let mut decoder = FrameDecoder::new(u32::MAX);
    while !out.is_empty() {
        decoder
            .decode::<pb::ServerMessage>(&mut out)
            .expect("the server's own frames decode")
            .expect("the server writes whole frames");
    }
    reached
}

/// Mutations for the seeded twins: what a fuzzer's first mutators do, on a valid stream.
pub fn mutate(noise: &mut Noise, input: &mut Vec<u8>, splice: &[u8]) {
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x0a, 0x08, 0x12];
    for _ in 0..1 + noise.below(6) {
        let len = input.len();
        match noise.below(9) {
            0 if len > 0 => input[noise.below(len)] ^= 1 << noise.below(8),
            1 if len > 0 => input[noise.below(len)] = noise.next_u64() as u8,
            2 if len > 0 => input[noise.below(len)] = INTERESTING[noise.below(INTERESTING.len())],
            3 if len > 0 => {
                input.remove(noise.below(len));
            }
            4 => input.insert(noise.below(len + 1), noise.next_u64() as u8),
            5 if len > 0 => input.truncate(noise.below(len)),
            6 if len > 1 => {
                // Duplicate a range (a repeated frame, a repeated field).
                let start = noise.below(len);
                let end = (start + 1 + noise.below(32)).min(len);
                let copy = input[start..end].to_vec();
                let at = noise.below(input.len() + 1);
                input.splice(at..at, copy);
            }
            7 if len >= 4 => {
                // A length field: a big-endian u32 of an interesting size.
                let at = noise.below(len - 3);
                let value: u32 = match noise.below(5) {
                    0 => 0,
                    1 => u32::MAX,
                    2 => 1 << noise.below(32),
                    3 => noise.below(300) as u32,
                    _ => noise.next_u64() as u32,
                };
                input[at..at + 4].copy_from_slice(&value.to_be_bytes());
            }
            _ if !splice.is_empty() => {
                let start = noise.below(splice.len());
                let end = (start + 1 + noise.below(64)).min(splice.len());
                let at = noise.below(input.len() + 1);
                input.splice(at..at, splice[start..end].iter().copied());
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    //! The twins of the fuzz targets `incubator_session` and `viewer_session`: seeded, so a
    //! failure replays (the case number and its input are printed).

    use super::*;
    use crate::incubator::{samples::examples, Message};
    use std::time::{Duration, Instant};

    /// Valid client streams of the incubator protocol: HELLO then requests, and variations.
    fn incubator_seeds() -> Vec<Vec<u8>> {
        use crate::incubator::{pb, MessageType};
        let mut seeds = Vec::new();
        let mut all = BytesMut::new();
        for message in examples() {
            message.encode(&mut all);
        }
        seeds.push(all.to_vec());
        let mut session = BytesMut::new();
        crate::incubator::samples::example(MessageType::Hello).encode(&mut session);
        for (seq, message_type) in [
            MessageType::RegisterDish,
            MessageType::Image,
            MessageType::Telemetry,
            MessageType::SyncState,
            MessageType::ListPatients,
            MessageType::Ping,
            MessageType::Image,
        ]
        .into_iter()
        .enumerate()
        {
            let mut message = crate::incubator::samples::example(message_type);
            message.set_seq(seq as u64 + 1);
            message.encode(&mut session);
        }
        seeds.push(session.to_vec());
        let mut pings = BytesMut::new();
        crate::incubator::samples::example(MessageType::Hello).encode(&mut pings);
        for seq in 1..20 {
            Message::Ping(pb::Ping { seq }).encode(&mut pings);
        }
        seeds.push(pings.to_vec());
        seeds
    }

    fn viewer_seeds() -> Vec<Vec<u8>> {
        use crate::viewer::{encode_frame, pb, pb::client_message::Request};
        let login = Request::Login(pb::Login {
            protocol_version: crate::viewer::PROTOCOL_VERSION,
            user: "anna".into(),
            password: "Embryo-2026!".into(),
            computer: "VIEWER-1".into(),
            ..Default::default()
        });
        let resume = Request::Resume(pb::Resume {
            protocol_version: crate::viewer::PROTOCOL_VERSION,
            ..Default::default()
        });
        let requests = [
            Request::Ping(pb::Ping {}),
            Request::ListPatients(pb::ListPatients::default()),
            Request::GetEmbryo(pb::GetEmbryo::default()),
            Request::Playback(pb::Playback::default()),
            Request::CancelPlayback(pb::CancelPlayback::default()),
            Request::AddAnnotation(pb::AddAnnotation::default()),
            Request::SetFate(pb::SetFate::default()),
            Request::GetActivity(pb::GetActivity {
                embryo_id: "D1_S1_P-1".into(),
            }),
            Request::ListModels(pb::ListModels {}),
            Request::GetModel(pb::GetModel {
                name: "Hierarchical".into(),
                version: 0,
            }),
            Request::ImportModel(pb::ImportModel {
                document: r#"{"format":"esserver-model/1","name":"M","kind":"additive"}"#.into(),
            }),
            Request::Evaluate(pb::Evaluate {
                embryo_id: "D1_S1_P-1".into(),
                expected_version: 3,
                model: "M".into(),
                version: 1,
            }),
            Request::ListEvaluations(pb::ListEvaluations {
                embryo_id: "D1_S1_P-1".into(),
            }),
            Request::Logout(pb::Logout {}),
        ];
        let mut seeds = Vec::new();
        for first in [login, resume] {
            let mut stream = BytesMut::new();
            for (seq, request) in (1..).zip(std::iter::once(first).chain(requests.iter().cloned()))
            {
                let message = pb::ClientMessage {
                    seq,
                    request: Some(request),
                };
                encode_frame(&message, &mut stream);
            }
            seeds.push(stream.to_vec());
        }
        seeds
    }

    /// Runs `harness` on every seed under every control byte's family, then on random and
    /// mutated inputs; `cases` bounds the random part.
    fn run_twin(name: &str, seeds: &[Vec<u8>], harness: fn(&[u8]) -> Reached, cases: u32) {
        let mut total = Reached::default();
        let started = Instant::now();
        let splice: Vec<u8> = seeds.concat();
        let mut noise = Noise::new(0x5eed_0000 ^ name.len() as u64);
        for seed in seeds {
            for control in [0x00u8, 0x04, 0x08, 0x23, 0x2c, 0x01] {
                let mut input = vec![control];
                input.extend_from_slice(seed);
                total.requests += harness(&input).requests;
            }
        }
        for case in 0..cases {
            let mut input = vec![noise.next_u64() as u8];
            match case % 4 {
                0 => input.extend((0..noise.below(200)).map(|_| noise.next_u64() as u8)),
                1 => {
                    // Structured: records behind valid frame headers, after a handshake.
                    input[0] |= 0xc0;
                    input.extend((0..noise.below(200)).map(|_| noise.next_u64() as u8));
                }
                _ => {
                    input[0] &= 0x7f;
                    input.extend_from_slice(&seeds[noise.below(seeds.len())]);
                }
            }
            if case % 4 != 0 {
                let (control, body) = input.split_at(1);
                let mut body = body.to_vec();
                mutate(&mut noise, &mut body, &splice);
                input = [control, &body].concat();
            }
            match std::panic::catch_unwind(|| harness(&input)) {
                Ok(reached) => {
                    total.requests += reached.requests;
                    total.session_errors += reached.session_errors;
                }
                Err(_) => panic!("{name} case {case} panicked on input {input:02x?}"),
            }
        }
        // The inputs reach the session's logic, and its refusals, often.
        assert!(total.requests > cases as usize / 4, "{name}: {total:?}");
        assert!(
            total.session_errors > cases as usize / 4,
            "{name}: {total:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name}: {:?}",
            started.elapsed()
        );
    }

    /// Found by `cargo fuzz run incubator_session` (2026-12-04): a TELEMETRY sample whose
    /// value is NaN failed the harness's round-trip check (NaN != NaN), not the server, whose
    /// validation refuses non-finite values.
    #[test]
    fn regression_a_nan_sample_round_trips_and_is_refused() {
        let input = [
            202u8, 5, 203, 18, 0, 18, 17, 17, 21, 0, 252, 32, 254, 255, 255, 255, 24, 223, 235,
            223, 226, 223, 223, 50,
        ];
        incubator_server(&input);
        let nan = Message::Telemetry(incubator::pb::Telemetry {
            seq: 1,
            samples: vec![incubator::pb::TelemetrySample {
                channel: "temperature_c".into(),
                value: f64::NAN,
                at_ms: 1,
            }],
            alarms: vec![],
        });
        assert!(incubator::validate_request(&nan).is_err());
    }

    #[test]
    fn twin_incubator_session_random_and_mutated_streams() {
        run_twin("incubator", &incubator_seeds(), incubator_server, 20_000);
    }

    #[test]
    fn twin_viewer_session_random_and_mutated_streams() {
        run_twin("viewer", &viewer_seeds(), viewer_server, 20_000);
    }

    #[test]
    fn harnesses_take_empty_and_tiny_inputs() {
        for input in [
            &[][..],
            &[0x80],
            &[0xc0],
            &[0xff, 0xff],
            &[0x04, 0, 0, 0, 0],
        ] {
            incubator_server(input);
            viewer_server(input);
        }
    }
}
