//! The harness of the fuzz target `http_request` (`fuzz/`), shared with its seeded twin
//! below, which runs on every `cargo test`. Built only for tests and with the `fuzzing`
//! feature.

use crate::http::{parse_form, reason_phrase, write_response, HttpLimits, Parsed, RequestParser};
use bytes::BytesMut;

/// Limits small enough that arbitrary input reaches every bound.
const TIGHT: HttpLimits = HttpLimits {
    head_bytes_max: 96,
    headers_max: 3,
    body_bytes_max: 16,
    target_bytes_max: 24,
};

/// Feeds arbitrary bytes to a [`RequestParser`] in pieces (the first byte chooses the limits
/// and the piece sizes), answering each request as a server does, and checks that every
/// request stays within the limits, every error maps to a 4xx/5xx status and sticks, and the
/// parser always makes progress. The body of each request also goes through [`parse_form`].
pub fn http_request_parser(data: &[u8]) {
    let (control, input) = match data.split_first() {
        Some((control, input)) => (*control, input),
        None => return,
    };
    let limits = if control & 0x80 != 0 {
        TIGHT
    } else {
        HttpLimits::default()
    };
    let _ = parse_form(input);
    let mut parser = RequestParser::new(limits);
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut fed = 0;
    let mut state = u64::from(control) | 1;
    while fed < input.len() {
        // xorshift: piece sizes from the control byte, so a crash replays from its input.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let piece = match control & 0x03 {
            0 => input.len() - fed,
            1 => 1,
            _ => 1 + (state % (input.len() - fed) as u64) as usize,
        };
        buf.extend_from_slice(&input[fed..fed + piece]);
        fed += piece;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= input.len() + 2, "the parser makes no progress");
            let before = buf.len();
            let result = parser.parse(&mut buf);
            assert!(buf.len() <= before);
            match result {
                Ok(Parsed::Request(request)) => {
                    assert!(buf.len() < before, "a request consumed nothing");
                    assert!(request.body.len() <= limits.body_bytes_max);
                    assert!(request.headers.len() <= limits.headers_max);
                    assert!(request.target.len() <= limits.target_bytes_max);
                    assert!(request.path.starts_with('/') || request.path == "*");
                    assert!(!request.path.contains('\0'));
                    assert!(request.minor_version <= 1);
                    assert!(request
                        .headers
                        .iter()
                        .all(|(name, _)| name.bytes().all(|b| !b.is_ascii_uppercase())));
                    let _ = parse_form(&request.body);
                    let _ = request.header("content-type");
                    let _ = request.query_param_ci("id");
                    write_response(&mut out, 200, &[], &request.body, request.keep_alive, false);
                    if !request.keep_alive {
                        return;
                    }
                }
                Ok(Parsed::SendContinue) => {}
                Ok(Parsed::NeedMore) => break,
                Err(error) => {
                    assert!((400..600).contains(&error.status()), "{error:?}");
                    assert!(!error.code().is_empty());
                    assert_ne!(reason_phrase(error.status()), "Unknown");
                    assert!(!error.message().is_empty());
                    assert_eq!(parser.parse(&mut buf), Err(error.clone()));
                    write_response(&mut out, error.status(), &[], b"", false, false);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The twin of the fuzz target `http_request`. (`http::tests::fuzz_never_panics_and_stays_bounded`
    //! drives the parser the same way with a token-level mutator.)

    use super::*;

    const SEEDS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /p?x=1&y=%20 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /q HTTP/1.0\r\n\r\n",
        b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /login HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 19\r\n\r\nuser=a%20b&pass=x+y",
        b"GET /api/v1/embryos/E1?limit=10 HTTP/1.1\r\nAuthorization: Bearer esk_x\r\nConnection: close\r\n\r\n",
    ];

    #[test]
    fn twin_http_request_random_and_mutated_inputs() {
        let mut state = 0x0bad_5eed_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for case in 0..20_000u32 {
            let mut input = vec![next() as u8];
            if case % 3 == 0 {
                input.extend((0..next() % 160).map(|_| next() as u8));
            } else {
                input.extend_from_slice(SEEDS[(next() % SEEDS.len() as u64) as usize]);
                for _ in 0..1 + next() % 4 {
                    let at = (next() % (input.len() as u64)) as usize;
                    match next() % 4 {
                        0 if at > 0 => input[at] = next() as u8,
                        1 => input.insert(at.max(1), b"\r\n:% 0"[(next() % 6) as usize]),
                        2 if at > 0 => {
                            input.remove(at);
                        }
                        _ => input.truncate(at.max(1)),
                    }
                }
            }
            let outcome = std::panic::catch_unwind(|| http_request_parser(&input));
            assert!(outcome.is_ok(), "case {case} panicked on {input:02x?}");
        }
    }
}
