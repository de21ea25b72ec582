//! A sans-I/O HTTP/1.1 server-side codec (RFC 9110, RFC 9112).
//!
//! [`RequestParser`] turns plaintext bytes, as a session receives them, into [`Request`]s;
//! [`write_response`], [`write_chunked_head`], [`write_chunk`] and [`write_last_chunk`]
//! append responses to an output buffer. Nothing here touches a socket or a clock.
//!
//! Every input is treated as hostile: the head, the number of headers, the request-target
//! and the body are bounded by [`HttpLimits`], every rejection is a typed [`HttpError`] with
//! a stable [`code`](HttpError::code) and the HTTP status to answer with, and no input makes
//! the parser panic or loop.
//!
//! Message framing follows RFC 9112 strictly, against request smuggling:
//!
//! * only `Content-Length` bodies are accepted; any `Transfer-Encoding` is refused (501), and
//!   a request carrying both is malformed (400);
//! * several `Content-Length` values (repeated headers or a comma list) must all be equal;
//!   each must be plain ASCII digits;
//! * a body larger than [`HttpLimits::body_bytes_max`] is refused from its declared length,
//!   before any of it arrives;
//! * obsolete line folding, whitespace between a header name and its colon, and bare CRs are
//!   refused (by `httparse`); bare LF line endings are accepted, as RFC 9112 permits;
//! * more than one `Host` header is refused (400). A missing `Host` is tolerated: the
//!   server does not route on it and some legacy clients omit it.
//!
//! After any error the connection's byte stream can no longer be trusted to be in step with
//! the parser: the caller answers with [`HttpError::status`] (with `Connection: close`) and
//! closes the connection. The parser keeps returning the same error if asked again.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bounds applied to every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Most bytes of a request head (request line, headers and the empty line ending them,
    /// plus any empty lines before the request line). Above it: [`HttpError::HeadTooLarge`].
    pub head_bytes_max: usize,
    /// Most header fields in one request. Above it: [`HttpError::HeadTooLarge`].
    pub headers_max: usize,
    /// Most bytes of one request body. Above it: [`HttpError::BodyTooLarge`].
    pub body_bytes_max: usize,
    /// Most bytes of the raw request-target. Above it: [`HttpError::UriTooLong`].
    pub target_bytes_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            head_bytes_max: 16 * 1024,
            headers_max: 64,
            body_bytes_max: 1024 * 1024,
            target_bytes_max: 8 * 1024,
        }
    }
}

/// One complete request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The method as sent (methods are case-sensitive): `GET`, `POST`, ...
    pub method: String,
    /// The raw request-target as sent (ASCII, at most [`HttpLimits::target_bytes_max`]).
    pub target: String,
    /// The percent-decoded path, without the query: starts with `/`, or is `*` for
    /// `OPTIONS *`. Valid UTF-8 with no control characters; `%2F` decodes to `/`. It is not
    /// normalised: `.` and `..` segments are left as sent.
    pub path: String,
    /// The path's segments (between `/`), each percent-decoded on its own, so a `%2F` inside
    /// an identifier stays inside its segment. Empty for `*` and for `/`.
    pub segments: Vec<String>,
    /// The part of the target after the first `?`, undecoded (empty when there is none).
    pub raw_query: String,
    /// The query decoded as `application/x-www-form-urlencoded` pairs, in order: `+` is a
    /// space, `%XX` a byte; a pair without `=` has an empty value; empty pairs are skipped.
    pub query: Vec<(String, String)>,
    /// The minor version of HTTP/1.x: 0 or 1.
    pub minor_version: u8,
    /// The header fields in order, names lowercased, values without surrounding whitespace.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes; empty when there is none).
    pub body: Bytes,
    /// Whether the connection may carry another request after this one: HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive` (and no `close`).
    pub keep_alive: bool,
}

impl Request {
    /// The value of the first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of the first query parameter named exactly `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of the first query parameter whose name equals `name` ignoring
    /// ASCII case (legacy clients are not consistent about the case of parameter names).
    pub fn query_param_ci(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What one call of [`RequestParser::parse`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A complete request, removed from the front of the buffer.
    Request(Box<Request>),
    /// More bytes are needed; call again when some arrive.
    NeedMore,
    /// The head is complete, asked for `Expect: 100-continue`, and its body has not fully
    /// arrived: write [`CONTINUE_RESPONSE`] once, then call again when bytes arrive. Returned
    /// at most once per request.
    SendContinue,
}

/// Why a request was refused. Each variant maps to an HTTP status and a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request is malformed (400); the text says how, without echoing the input.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The head, or the number of headers, is over its limit (431).
    #[error("request header fields too large")]
    HeadTooLarge,
    /// The declared body is over its limit (413).
    #[error("request body too large")]
    BodyTooLarge,
    /// The request-target is over its limit (414).
    #[error("request target too long")]
    UriTooLong,
    /// The request uses a feature this server does not implement (501), named in the text.
    #[error("not implemented: {0}")]
    NotImplemented(String),
    /// The request has an `Expect` other than `100-continue` (417).
    #[error("expectation failed")]
    ExpectationFailed,
    /// The request is not HTTP/1.0 or HTTP/1.1 (505).
    #[error("HTTP version not supported")]
    UnsupportedVersion,
}

impl HttpError {
    /// The HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge => 413,
            HttpError::UriTooLong => 414,
            HttpError::NotImplemented(_) => 501,
            HttpError::ExpectationFailed => 417,
            HttpError::UnsupportedVersion => 505,
        }
    }

    /// A stable snake_case code naming the error (for error bodies, logs and metrics).
    pub fn code(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "bad_request",
            HttpError::HeadTooLarge => "head_too_large",
            HttpError::BodyTooLarge => "body_too_large",
            HttpError::UriTooLong => "uri_too_long",
            HttpError::NotImplemented(_) => "not_implemented",
            HttpError::ExpectationFailed => "expectation_failed",
            HttpError::UnsupportedVersion => "unsupported_version",
        }
    }

    /// A human-readable description (the `Display` text).
    pub fn message(&self) -> String {
        self.to_string()
    }
}

fn bad(reason: &str) -> HttpError {
    HttpError::BadRequest(reason.to_owned())
}

/// The interim response to send when [`RequestParser::parse`] returns
/// [`Parsed::SendContinue`].
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// How much longer than the target limit an unfinished request line may grow (room for the
/// method, the spaces and the version) before it is refused as [`HttpError::UriTooLong`].
const REQUEST_LINE_SLACK_BYTES: usize = 64;

#[derive(Debug)]
enum State {
    /// Waiting for a complete head at the front of the buffer.
    Head {
        /// Bytes at the front of the buffer already searched for a line end.
        scanned: usize,
        /// Empty lines removed before this request's request line.
        skipped: usize,
        /// A line end has been seen in the buffer (the request line is complete).
        line_seen: bool,
    },
    /// The head was parsed and removed from the buffer; waiting for the body.
    Body {
        head: Box<Request>,
        content_length: usize,
    },
    /// A call failed: the stream is out of step, the same error is returned again.
    Failed(HttpError),
}

impl State {
    fn fresh() -> State {
        State::Head {
            scanned: 0,
            skipped: 0,
            line_seen: false,
        }
    }
}

/// Incremental parser of the requests of one connection.
///
/// The caller appends received bytes to a `BytesMut` and calls [`parse`](Self::parse)
/// until it returns [`Parsed::NeedMore`] or an error. Between calls, the caller may only
/// append to the buffer.
#[derive(Debug)]
pub struct RequestParser {
    limits: HttpLimits,
    state: State,
}

impl RequestParser {
    /// A parser for a new connection.
    pub fn new(limits: HttpLimits) -> Self {
        RequestParser {
            limits,
            state: State::fresh(),
        }
    }

    /// The limits this parser applies.
    pub fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    /// Consumes at most one complete request from the front of `buf`, leaving any bytes
    /// after it (pipelined requests) in place.
    ///
    /// A complete head is removed from `buf` as soon as it is parsed, even while its body is
    /// still arriving (the parser keeps it); the request is returned once the body is
    /// complete. Empty lines before a request line are skipped. A declared body over the
    /// limit is refused as soon as the head is complete, so the caller can answer 413
    /// without reading it.
    ///
    /// Any error leaves the connection out of step: answer with the error's status and close.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Parsed, HttpError> {
        let result = self.parse_inner(buf);
        if let Err(error) = &result {
            self.state = State::Failed(error.clone());
        }
        result
    }

    fn parse_inner(&mut self, buf: &mut BytesMut) -> Result<Parsed, HttpError> {
        match std::mem::replace(&mut self.state, State::fresh()) {
            State::Failed(error) => Err(error),
            State::Body {
                mut head,
                content_length,
            } => {
                if buf.len() >= content_length {
                    head.body = buf.split_to(content_length).freeze();
                    Ok(Parsed::Request(head))
                } else {
                    self.state = State::Body {
                        head,
                        content_length,
                    };
                    Ok(Parsed::NeedMore)
                }
            }
            State::Head {
                scanned,
                skipped,
                line_seen,
            } => self.parse_head(buf, scanned, skipped, line_seen),
        }
    }

    fn parse_head(
        &mut self,
        buf: &mut BytesMut,
        mut scanned: usize,
        mut skipped: usize,
        mut line_seen: bool,
    ) -> Result<Parsed, HttpError> {
        let limits = self.limits;

        // Empty lines before the request line (RFC 9112 section 2.2). They count against the
        // head limit, so a peer sending only line ends is cut off.
        let lead = leading_empty_lines(buf)?;
        if lead > 0 {
            buf.advance(lead);
            skipped = skipped.saturating_add(lead);
            scanned = 0;
            line_seen = false;
        }
        if skipped > limits.head_bytes_max {
            return Err(HttpError::HeadTooLarge);
        }
        if buf.is_empty() {
            self.state = State::Head {
                scanned: 0,
                skipped,
                line_seen: false,
            };
            return Ok(Parsed::NeedMore);
        }

        // Run the full parse only on the first look at a request, or when a line has been
        // completed since the last look: a head cannot complete without a new line end, and
        // this bounds the work per request to a few parses however the bytes are split.
        let scanned_upto = scanned.min(buf.len());
        let new_line = buf[scanned_upto..].contains(&b'\n');
        let first_look = scanned_upto == 0;
        line_seen |= new_line;
        if !first_look && !new_line {
            check_unfinished_head(&limits, buf.len(), skipped, line_seen)?;
            self.state = State::Head {
                scanned: buf.len(),
                skipped,
                line_seen,
            };
            return Ok(Parsed::NeedMore);
        }

        // Never hand httparse more than the head budget (plus one byte, to tell "complete at
        // the limit" from "over it").
        let budget = limits.head_bytes_max.saturating_sub(skipped);
        let window = &buf[..buf.len().min(budget.saturating_add(1))];
        let mut header_slots = vec![httparse::EMPTY_HEADER; limits.headers_max];
        let mut parsed = httparse::Request::new(&mut header_slots);
        let head_len = match parsed.parse(window) {
            Ok(httparse::Status::Complete(head_len)) => head_len,
            Ok(httparse::Status::Partial) => {
                if parsed
                    .path
                    .is_some_and(|target| target.len() > limits.target_bytes_max)
                {
                    return Err(HttpError::UriTooLong);
                }
                // Also covers a window cut at the budget.
                check_unfinished_head(&limits, buf.len(), skipped, line_seen)?;
                self.state = State::Head {
                    scanned: buf.len(),
                    skipped,
                    line_seen,
                };
                return Ok(Parsed::NeedMore);
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
            Err(httparse::Error::Version) => return Err(version_error(window)),
            Err(error) => {
                return Err(HttpError::BadRequest(format!(
                    "malformed request head: {error}"
                )))
            }
        };
        if head_len > budget {
            return Err(HttpError::HeadTooLarge);
        }
        let (head, content_length, expect_continue) = build_head(&limits, &parsed)?;

        buf.advance(head_len);
        if buf.len() >= content_length {
            let mut request = head;
            request.body = buf.split_to(content_length).freeze();
            return Ok(Parsed::Request(Box::new(request)));
        }
        self.state = State::Body {
            head: Box::new(head),
            content_length,
        };
        if expect_continue {
            Ok(Parsed::SendContinue)
        } else {
            Ok(Parsed::NeedMore)
        }
    }
}

/// Length of the empty lines (CRLF or bare LF) at the front of `buf`. A CR followed by
/// anything but LF is malformed; a CR at the very end waits for its LF.
fn leading_empty_lines(buf: &[u8]) -> Result<usize, HttpError> {
    let mut lead = 0;
    loop {
        match buf.get(lead) {
            Some(b'\n') => lead += 1,
            Some(b'\r') => match buf.get(lead + 1) {
                Some(b'\n') => lead += 2,
                Some(_) => return Err(bad("stray CR before the request line")),
                None => return Ok(lead),
            },
            _ => return Ok(lead),
        }
    }
}

/// Limits that an unfinished head can already be found to break.
fn check_unfinished_head(
    limits: &HttpLimits,
    buffered: usize,
    skipped: usize,
    line_seen: bool,
) -> Result<(), HttpError> {
    if !line_seen
        && buffered
            > limits
                .target_bytes_max
                .saturating_add(REQUEST_LINE_SLACK_BYTES)
    {
        return Err(HttpError::UriTooLong);
    }
    if buffered.saturating_add(skipped) > limits.head_bytes_max {
        return Err(HttpError::HeadTooLarge);
    }
    Ok(())
}

/// Tells a well-formed but unsupported version (`HTTP/2.0`: 505) from garbage (400), from
/// the request line at the front of `head`.
fn version_error(head: &[u8]) -> HttpError {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = &head[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(_method), Some(_target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad("malformed request line");
    };
    match version {
        [b'H', b'T', b'T', b'P', b'/', digit, ..] if digit.is_ascii_digit() => {
            HttpError::UnsupportedVersion
        }
        _ => bad("malformed HTTP version"),
    }
}

/// Builds the request (without its body) from a complete head and checks its framing.
/// Returns the request, its body length and whether a `100 Continue` is due.
fn build_head(
    limits: &HttpLimits,
    parsed: &httparse::Request<'_, '_>,
) -> Result<(Request, usize, bool), HttpError> {
    let (Some(method), Some(target), Some(minor_version)) =
        (parsed.method, parsed.path, parsed.version)
    else {
        return Err(bad("incomplete request line"));
    };
    if target.len() > limits.target_bytes_max {
        return Err(HttpError::UriTooLong);
    }
    if minor_version > 1 {
        return Err(HttpError::UnsupportedVersion);
    }
    let (raw_path, raw_query) = split_target(method, target)?;
    let mut segments = Vec::new();
    if raw_path != "*" && raw_path != "/" {
        for raw in raw_path.trim_start_matches('/').split('/') {
            segments.push(decode_path(raw)?);
        }
    }
    let path = if raw_path == "*" {
        "*".to_owned()
    } else {
        decode_path(raw_path)?
    };
    let query = parse_query(raw_query)?;

    let mut headers = Vec::with_capacity(parsed.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut expect_continue = false;
    let mut expect_other = false;
    let mut hosts = 0usize;
    for header in parsed.headers.iter() {
        let name = header.name.to_ascii_lowercase();
        let value = std::str::from_utf8(header.value)
            .map_err(|_| bad("header value is not valid UTF-8"))?
            .trim_matches(is_ows);
        match name.as_str() {
            "content-length" => {
                for item in value.split(',') {
                    let length = parse_content_length(item.trim_matches(is_ows))?;
                    match content_length {
                        Some(previous) if previous != length => {
                            return Err(bad("conflicting content-length values"));
                        }
                        _ => content_length = Some(length),
                    }
                }
            }
            "transfer-encoding" => transfer_encoding = true,
            "connection" => {
                for option in value.split(',').map(|o| o.trim_matches(is_ows)) {
                    if option.eq_ignore_ascii_case("close") {
                        connection_close = true;
                    } else if option.eq_ignore_ascii_case("keep-alive") {
                        connection_keep_alive = true;
                    }
                }
            }
            "expect" => {
                for expectation in value.split(',').map(|e| e.trim_matches(is_ows)) {
                    if expectation.eq_ignore_ascii_case("100-continue") {
                        expect_continue = true;
                    } else if !expectation.is_empty() {
                        expect_other = true;
                    }
                }
            }
            "host" => hosts += 1,
            _ => {}
        }
        headers.push((name, value.to_owned()));
    }

    if transfer_encoding && content_length.is_some() {
        return Err(bad("both content-length and transfer-encoding"));
    }
    if transfer_encoding {
        return Err(HttpError::NotImplemented("transfer-encoding".to_owned()));
    }
    if hosts > 1 {
        return Err(bad("more than one host header"));
    }
    let content_length = match content_length {
        None => 0,
        Some(length) => match usize::try_from(length) {
            Ok(length) if length <= limits.body_bytes_max => length,
            _ => return Err(HttpError::BodyTooLarge),
        },
    };
    if expect_other {
        return Err(HttpError::ExpectationFailed);
    }
    let keep_alive = if minor_version == 1 {
        !connection_close
    } else {
        connection_keep_alive && !connection_close
    };
    // A 100-continue expectation in an HTTP/1.0 request is ignored (RFC 9110 10.1.1).
    let expect_continue = expect_continue && minor_version == 1 && content_length > 0;

    let request = Request {
        method: method.to_owned(),
        target: target.to_owned(),
        path,
        segments,
        raw_query: raw_query.to_owned(),
        query,
        minor_version,
        headers,
        body: Bytes::new(),
        keep_alive,
    };
    Ok((request, content_length, expect_continue))
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A `Content-Length` value: one or more ASCII digits. Values too large for `u64`
/// saturate (they are over any limit anyway).
fn parse_content_length(text: &str) -> Result<u64, HttpError> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("invalid content-length"));
    }
    Ok(text.bytes().fold(0u64, |acc, digit| {
        acc.saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    }))
}

/// Splits a request-target into its raw path and raw query.
///
/// Accepted forms: origin-form (`/path?query`); asterisk-form (`*`) for `OPTIONS` only; and
/// absolute-form (`http://authority/path?query`, scheme `http` or `https` in any case),
/// of which only the path and query are kept (RFC 9112 section 3.2.2 asks servers to accept
/// it; the authority is not used for routing). Authority-form (`CONNECT`) is refused, as are
/// non-ASCII bytes and fragments (`#`).
fn split_target<'t>(method: &str, target: &'t str) -> Result<(&'t str, &'t str), HttpError> {
    if !target.is_ascii() {
        return Err(bad("non-ASCII request target"));
    }
    if target.contains('#') {
        return Err(bad("fragment in request target"));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(("*", ""))
        } else {
            Err(bad("asterisk-form target is only for OPTIONS"))
        };
    }
    let origin = if target.starts_with('/') {
        target
    } else {
        let rest = strip_prefix_ignore_ascii_case(target, "http://")
            .or_else(|| strip_prefix_ignore_ascii_case(target, "https://"))
            .ok_or_else(|| bad("request target must start with '/'"))?;
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if authority_end == 0 {
            return Err(bad("absolute-form target without authority"));
        }
        &rest[authority_end..]
    };
    let (path, query) = origin.split_once('?').unwrap_or((origin, ""));
    // An absolute-form target may have an empty path ("http://host" or "http://host?q").
    let path = if path.is_empty() { "/" } else { path };
    Ok((path, query))
}

fn strip_prefix_ignore_ascii_case<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix) {
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// Percent-decodes a path; refuses malformed escapes, invalid UTF-8 and control characters.
fn decode_path(raw: &str) -> Result<String, HttpError> {
    let path = percent_decode(raw, false, "path")?;
    if path.chars().any(|c| c.is_ascii_control()) {
        return Err(bad("control character in path"));
    }
    Ok(path)
}

/// Decodes an `application/x-www-form-urlencoded` body (an HTML form's POST) into its pairs,
/// by the same rules as the query.
pub fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, HttpError> {
    let text = std::str::from_utf8(body).map_err(|_| bad("form body is not UTF-8"))?;
    parse_query(text)
}

/// Decodes an `application/x-www-form-urlencoded` query into its pairs.
fn parse_query(raw: &str) -> Result<Vec<(String, String)>, HttpError> {
    let mut pairs = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(name, true, "query")?;
        let value = percent_decode(value, true, "query")?;
        if name.contains('\0') || value.contains('\0') {
            return Err(bad("NUL in query"));
        }
        pairs.push((name, value));
    }
    Ok(pairs)
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_as_space`), requiring valid UTF-8.
fn percent_decode(raw: &str, plus_as_space: bool, part: &str) -> Result<String, HttpError> {
    let bytes = raw.as_bytes();
    if !bytes
        .iter()
        .any(|&b| b == b'%' || (plus_as_space && b == b'+'))
    {
        return Ok(raw.to_owned());
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while let Some((&first, tail)) = rest.split_first() {
        match first {
            b'%' => match tail {
                [high, low, after @ ..] => match (hex_value(*high), hex_value(*low)) {
                    (Some(high), Some(low)) => {
                        decoded.push(high << 4 | low);
                        rest = after;
                    }
                    _ => return Err(HttpError::BadRequest(format!("bad escape in {part}"))),
                },
                _ => return Err(HttpError::BadRequest(format!("bad escape in {part}"))),
            },
            b'+' if plus_as_space => {
                decoded.push(b' ');
                rest = tail;
            }
            other => {
                decoded.push(other);
                rest = tail;
            }
        }
    }
    String::from_utf8(decoded)
        .map_err(|_| HttpError::BadRequest(format!("{part} is not valid UTF-8")))
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The reason phrase of `status`; a generic phrase of its class for uncommon codes.
pub fn reason_phrase(status: u16) -> &'static str {
    known_reason_phrase(status).unwrap_or(match status {
        100..=199 => "Informational",
        200..=299 => "Success",
        300..=399 => "Redirection",
        400..=499 => "Client Error",
        500..=599 => "Server Error",
        _ => "Unknown",
    })
}

fn known_reason_phrase(status: u16) -> Option<&'static str> {
    Some(match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => return None,
    })
}

/// Writes a complete response with a `Content-Length` body.
///
/// `out` must be a growable buffer (`Vec<u8>` or `BytesMut`). `headers` are written in
/// order; `Content-Length` and `Transfer-Encoding` given there are dropped (the framing is
/// written here), and so is `Connection` when `!keep_alive`. Header names must be tokens and
/// values must not hold CR, LF or NUL (checked in debug builds; such bytes are stripped, and
/// a header with an invalid name is dropped, in release builds).
///
/// `Content-Length: body.len()` is always written, except for 1xx, 204 and 304 responses,
/// which have neither it nor a body. With `head_only` (the answer to a `HEAD` request) the
/// body is not written but its length is. `Connection: close` is added when `!keep_alive`;
/// an HTTP/1.0 client that is kept alive needs `("Connection", "keep-alive")` in `headers`.
pub fn write_response(
    out: &mut impl BufMut,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
    head_only: bool,
) {
    let status = checked_status(status);
    let bodiless = status < 200 || status == 204 || status == 304;
    put_status_and_headers(out, status, headers, keep_alive);
    if !bodiless {
        out.put_slice(b"Content-Length: ");
        put_decimal(out, body.len());
        out.put_slice(b"\r\n");
    }
    if !keep_alive {
        out.put_slice(b"Connection: close\r\n");
    }
    out.put_slice(b"\r\n");
    if !bodiless && !head_only {
        out.put_slice(body);
    }
}

/// Writes the head of a response whose body follows in chunks (`Transfer-Encoding:
/// chunked`): then [`write_chunk`] for each part and [`write_last_chunk`] at the end.
///
/// Only for HTTP/1.1 requests (an HTTP/1.0 client cannot read chunks), and not for a `HEAD`
/// request's answer, which must have no body (write this head alone). `headers` are treated
/// as in [`write_response`].
pub fn write_chunked_head(
    out: &mut impl BufMut,
    status: u16,
    headers: &[(&str, &str)],
    keep_alive: bool,
) {
    let status = checked_status(status);
    debug_assert!(
        status >= 200 && status != 204 && status != 304,
        "status {status} has no body"
    );
    put_status_and_headers(out, status, headers, keep_alive);
    out.put_slice(b"Transfer-Encoding: chunked\r\n");
    if !keep_alive {
        out.put_slice(b"Connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

/// Writes one chunk of a chunked body. An empty `data` writes nothing (an empty chunk would
/// end the body).
pub fn write_chunk(out: &mut impl BufMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    put_hex(out, data.len());
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Ends a chunked body (last chunk, no trailers).
pub fn write_last_chunk(out: &mut impl BufMut) {
    out.put_slice(b"0\r\n\r\n");
}

fn checked_status(status: u16) -> u16 {
    debug_assert!(
        (100..=999).contains(&status),
        "invalid status code {status}"
    );
    if (100..=999).contains(&status) {
        status
    } else {
        500
    }
}

fn put_status_and_headers(
    out: &mut impl BufMut,
    status: u16,
    headers: &[(&str, &str)],
    keep_alive: bool,
) {
    out.put_slice(b"HTTP/1.1 ");
    put_decimal(out, usize::from(status));
    out.put_u8(b' ');
    out.put_slice(reason_phrase(status).as_bytes());
    out.put_slice(b"\r\n");
    for &(name, value) in headers {
        let framing = name.eq_ignore_ascii_case("content-length")
            || name.eq_ignore_ascii_case("transfer-encoding");
        debug_assert!(!framing, "framing header {name} is written by the codec");
        if framing || (!keep_alive && name.eq_ignore_ascii_case("connection")) {
            continue;
        }
        put_header(out, name, value);
    }
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

fn put_header(out: &mut impl BufMut, name: &str, value: &str) {
    debug_assert!(is_token(name), "invalid header name {name:?}");
    if !is_token(name) {
        return;
    }
    let forbidden = |b: &u8| matches!(b, b'\r' | b'\n' | b'\0');
    let value = value.as_bytes();
    debug_assert!(
        !value.iter().any(forbidden),
        "CR, LF or NUL in the value of header {name}"
    );
    out.put_slice(name.as_bytes());
    out.put_slice(b": ");
    for part in value.split(forbidden) {
        out.put_slice(part);
    }
    out.put_slice(b"\r\n");
}

fn put_decimal(out: &mut impl BufMut, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}

fn put_hex(out: &mut impl BufMut, mut n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits::default()
    }

    fn parse_one(input: &[u8]) -> Result<Parsed, HttpError> {
        let mut parser = RequestParser::new(limits());
        let mut buf = BytesMut::from(input);
        parser.parse(&mut buf)
    }

    fn request(input: &[u8]) -> Request {
        match parse_one(input) {
            Ok(Parsed::Request(request)) => *request,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn error(input: &[u8]) -> HttpError {
        match parse_one(input) {
            Err(error) => error,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let r =
            request(b"GET /patients/42?x=1 HTTP/1.1\r\nHost: example\r\nX-Thing:  a b \r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/patients/42?x=1");
        assert_eq!(r.path, "/patients/42");
        assert_eq!(r.raw_query, "x=1");
        assert_eq!(r.query, vec![("x".to_owned(), "1".to_owned())]);
        assert_eq!(r.minor_version, 1);
        assert_eq!(r.header("HOST"), Some("example"));
        assert_eq!(r.header("x-thing"), Some("a b"));
        assert_eq!(r.header("missing"), None);
        assert_eq!(r.headers[0].0, "host");
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
    }

    #[test]
    fn pipelined_requests_parse_in_order_and_keep_leftover() {
        let mut parser = RequestParser::new(limits());
        let mut buf = BytesMut::from(
            &b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /b HTTP/1.1\r\n\r\nGET /c HT"[..],
        );
        let Ok(Parsed::Request(first)) = parser.parse(&mut buf) else {
            panic!("first request")
        };
        assert_eq!(first.path, "/a");
        assert_eq!(&first.body[..], b"abc");
        let Ok(Parsed::Request(second)) = parser.parse(&mut buf) else {
            panic!("second request")
        };
        assert_eq!(second.path, "/b");
        assert_eq!(&buf[..], b"GET /c HT");
        assert_eq!(parser.parse(&mut buf), Ok(Parsed::NeedMore));
        assert_eq!(&buf[..], b"GET /c HT");
        buf.extend_from_slice(b"TP/1.1\r\n\r\n");
        let Ok(Parsed::Request(third)) = parser.parse(&mut buf) else {
            panic!("third request")
        };
        assert_eq!(third.path, "/c");
        assert!(buf.is_empty());
    }

    #[test]
    fn byte_by_byte_post() {
        let input =
            b"\r\nPOST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world";
        let mut parser = RequestParser::new(limits());
        let mut buf = BytesMut::new();
        for (i, &byte) in input.iter().enumerate() {
            buf.extend_from_slice(&[byte]);
            let result = parser.parse(&mut buf);
            if i + 1 < input.len() {
                assert_eq!(result, Ok(Parsed::NeedMore), "at byte {i}");
            } else {
                let Ok(Parsed::Request(r)) = result else {
                    panic!("expected the request, got {result:?}")
                };
                assert_eq!(r.method, "POST");
                assert_eq!(r.path, "/upload");
                assert_eq!(&r.body[..], b"hello world");
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn keep_alive_defaults() {
        assert!(request(b"GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!request(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!request(b"GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n").keep_alive);
        assert!(!request(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!request(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
        assert_eq!(request(b"GET / HTTP/1.0\r\n\r\n").minor_version, 0);
    }

    #[test]
    fn content_length_with_transfer_encoding_is_400() {
        let e =
            error(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc");
        assert_eq!(e.status(), 400);
        assert_eq!(e.code(), "bad_request");
        let e =
            error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn transfer_encoding_alone_is_501() {
        let e =
            error(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
        assert_eq!(e, HttpError::NotImplemented("transfer-encoding".to_owned()));
        assert_eq!(e.status(), 501);
        assert_eq!(e.code(), "not_implemented");
    }

    #[test]
    fn conflicting_content_lengths_are_400() {
        let e = error(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd");
        assert_eq!(e.status(), 400);
        let e = error(b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabcd");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn identical_duplicate_content_lengths_are_tolerated() {
        let r = request(b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(&r.body[..], b"abc");
        let r = request(b"POST / HTTP/1.1\r\nContent-Length: 3 , 3\r\n\r\nabc");
        assert_eq!(&r.body[..], b"abc");
    }

    #[test]
    fn invalid_content_length_is_400() {
        for value in ["-1", "+3", "3 3", "0x3", "abc", "", "3,", " ,3", "3.0"] {
            let input = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\nabc");
            assert_eq!(error(input.as_bytes()).status(), 400, "value {value:?}");
        }
    }

    #[test]
    fn content_length_over_limit_is_413_before_the_body() {
        let e = error(b"POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n");
        assert_eq!(e, HttpError::BodyTooLarge);
        assert_eq!(e.status(), 413);
        let e = error(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n");
        assert_eq!(e.status(), 413);
        // Exactly at the limit is fine: the parser waits for the body.
        assert_eq!(
            parse_one(b"POST / HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n"),
            Ok(Parsed::NeedMore)
        );
    }

    #[test]
    fn head_over_limit_is_431() {
        let small = HttpLimits {
            head_bytes_max: 256,
            ..HttpLimits::default()
        };
        // Incomplete head over the limit.
        let mut parser = RequestParser::new(small);
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        buf.extend_from_slice(format!("X-Long: {}", "a".repeat(300)).as_bytes());
        assert_eq!(parser.parse(&mut buf), Err(HttpError::HeadTooLarge));
        // And the parser stays failed.
        assert_eq!(parser.parse(&mut buf), Err(HttpError::HeadTooLarge));
        // Complete head over the limit, all in one buffer.
        let mut parser = RequestParser::new(small);
        let mut buf = BytesMut::from(
            format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(300)).as_bytes(),
        );
        assert_eq!(parser.parse(&mut buf), Err(HttpError::HeadTooLarge));
        // Endless empty lines.
        let mut parser = RequestParser::new(small);
        let mut buf = BytesMut::from("\r\n".repeat(200).as_bytes());
        assert_eq!(parser.parse(&mut buf), Err(HttpError::HeadTooLarge));
        // Byte by byte.
        let mut parser = RequestParser::new(small);
        let mut buf = BytesMut::new();
        let input = format!("GET / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(300));
        let mut result = Ok(Parsed::NeedMore);
        for &byte in input.as_bytes() {
            buf.extend_from_slice(&[byte]);
            result = parser.parse(&mut buf);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(HttpError::HeadTooLarge));
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut input = String::from("GET / HTTP/1.1\r\n");
        for i in 0..65 {
            input.push_str(&format!("X-{i}: v\r\n"));
        }
        input.push_str("\r\n");
        assert_eq!(error(input.as_bytes()), HttpError::HeadTooLarge);
        // 64 is fine.
        let mut input = String::from("GET / HTTP/1.1\r\n");
        for i in 0..64 {
            input.push_str(&format!("X-{i}: v\r\n"));
        }
        input.push_str("\r\n");
        assert_eq!(request(input.as_bytes()).headers.len(), 64);
    }

    #[test]
    fn long_target_is_414() {
        let target = format!("/{}", "a".repeat(8 * 1024));
        let e = error(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes());
        assert_eq!(e, HttpError::UriTooLong);
        assert_eq!(e.status(), 414);
        // Not yet complete, line still arriving.
        let e = error(format!("GET {target}{target}").as_bytes());
        assert_eq!(e, HttpError::UriTooLong);
        // Complete target, head still arriving.
        let e = error(format!("GET {target} HTTP/1.1\r\nHost: x\r\n").as_bytes());
        assert_eq!(e, HttpError::UriTooLong);
        // Exactly at the limit is fine.
        let target = format!("/{}", "a".repeat(8 * 1024 - 1));
        assert_eq!(
            request(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes()).path,
            target
        );
    }

    #[test]
    fn bad_versions() {
        assert_eq!(
            error(b"GET / HTTP/2.0\r\n\r\n"),
            HttpError::UnsupportedVersion
        );
        assert_eq!(
            error(b"GET / HTTP/1.2\r\n\r\n"),
            HttpError::UnsupportedVersion
        );
        assert_eq!(error(b"GET / HTTP/2.0\r\n\r\n").status(), 505);
        // Same verdict when the line is still arriving.
        assert_eq!(error(b"GET / HTTP/2"), HttpError::UnsupportedVersion);
        for garbage in [
            &b"GET / HTTX/1.1\r\n\r\n"[..],
            b"GET / http/1.1\r\n\r\n",
            b"GET / HTTP/1.1x\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / a HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert_eq!(error(garbage).status(), 400, "{garbage:?}");
        }
    }

    #[test]
    fn expect_continue_flow() {
        let mut parser = RequestParser::new(limits());
        let mut buf = BytesMut::from(
            &b"PUT /x HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n"[..],
        );
        assert_eq!(parser.parse(&mut buf), Ok(Parsed::SendContinue));
        assert!(buf.is_empty());
        assert_eq!(parser.parse(&mut buf), Ok(Parsed::NeedMore));
        buf.extend_from_slice(b"ab");
        assert_eq!(parser.parse(&mut buf), Ok(Parsed::NeedMore));
        buf.extend_from_slice(b"cdeGET");
        let Ok(Parsed::Request(r)) = parser.parse(&mut buf) else {
            panic!("expected the request")
        };
        assert_eq!(&r.body[..], b"abcde");
        assert_eq!(&buf[..], b"GET");
        assert_eq!(parser.parse(&mut buf), Ok(Parsed::NeedMore));

        // Body already there: no interim response.
        let r = request(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nz");
        assert_eq!(&r.body[..], b"z");
        // No body: no interim response.
        let r = request(b"GET /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        assert!(r.body.is_empty());
        // HTTP/1.0: ignored.
        assert_eq!(
            parse_one(b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"),
            Ok(Parsed::NeedMore)
        );
    }

    #[test]
    fn other_expectation_is_417() {
        let e = error(b"PUT /x HTTP/1.1\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(e, HttpError::ExpectationFailed);
        assert_eq!(e.status(), 417);
        assert_eq!(e.code(), "expectation_failed");
    }

    #[test]
    fn query_decoding() {
        let r = request(
            b"GET /find?name=John+Doe&city=New%20York&tag=a&tag=b&flag&&e=&patientIDx=7&%41=%3D HTTP/1.1\r\n\r\n",
        );
        assert_eq!(r.query_param("name"), Some("John Doe"));
        assert_eq!(r.query_param("city"), Some("New York"));
        assert_eq!(r.query_param("tag"), Some("a"));
        let tags: Vec<&str> = r
            .query
            .iter()
            .filter(|(n, _)| n == "tag")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(r.query_param("flag"), Some(""));
        assert_eq!(r.query_param("e"), Some(""));
        assert_eq!(r.query_param("A"), Some("="));
        assert_eq!(r.query_param("PatientIDx"), None);
        assert_eq!(r.query_param_ci("PatientIDx"), Some("7"));
        assert_eq!(r.query_param_ci("PATIENTIDX"), Some("7"));
        assert_eq!(r.query.len(), 8);
        assert_eq!(
            r.raw_query,
            "name=John+Doe&city=New%20York&tag=a&tag=b&flag&&e=&patientIDx=7&%41=%3D"
        );
        // '+' stays '+' in the path; UTF-8 escapes decode.
        let r = request(b"GET /a+b/%C3%A9t%C3%A9%2Fx HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/a+b/\u{e9}t\u{e9}/x");
        assert_eq!(r.segments, ["a+b", "\u{e9}t\u{e9}/x"]);
    }

    #[test]
    fn bad_percent_encoding_is_400() {
        for target in [
            "/a%", "/a%2", "/a%zz", "/a?x=%g0", "/a?%=1", "/%FF", "/a?x=%C3",
        ] {
            let e = error(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(e.status(), 400, "{target}");
        }
    }

    #[test]
    fn nul_and_controls_in_path_are_400() {
        assert_eq!(error(b"GET /a%00b HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(error(b"GET /a%0Ab HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(error(b"GET /a?x=%00 HTTP/1.1\r\n\r\n").status(), 400);
    }

    #[test]
    fn target_forms() {
        let r = request(b"OPTIONS * HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "*");
        assert_eq!(error(b"GET * HTTP/1.1\r\n\r\n").status(), 400);
        let r = request(b"GET HTTP://example.org/p/q?a=1 HTTP/1.1\r\n\r\n");
        assert_eq!(r.path, "/p/q");
        assert_eq!(r.query_param("a"), Some("1"));
        assert_eq!(
            request(b"GET https://example.org HTTP/1.1\r\n\r\n").path,
            "/"
        );
        assert_eq!(
            request(b"GET http://h?x=1 HTTP/1.1\r\n\r\n").raw_query,
            "x=1"
        );
        assert_eq!(error(b"GET http:///p HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(
            error(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n").status(),
            400
        );
        assert_eq!(error(b"GET /a#frag HTTP/1.1\r\n\r\n").status(), 400);
        assert_eq!(
            error("GET /\u{e9} HTTP/1.1\r\n\r\n".as_bytes()).status(),
            400
        );
    }

    #[test]
    fn header_rules() {
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").status(),
            400
        );
        // Obsolete line folding.
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nX: a\r\n  b\r\n\r\n").status(),
            400
        );
        // Space before the colon.
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc").status(),
            400
        );
        // Bare CR.
        assert_eq!(error(b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n").status(), 400);
        // Non-UTF-8 value.
        assert_eq!(
            error(b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n").status(),
            400
        );
        // UTF-8 value is kept.
        let r = request("GET / HTTP/1.1\r\nX-Name: M\u{fc}ller\r\n\r\n".as_bytes());
        assert_eq!(r.header("x-name"), Some("M\u{fc}ller"));
        // Bare LF line endings are accepted.
        let r = request(b"GET /lf HTTP/1.1\nHost: h\n\n");
        assert_eq!(r.path, "/lf");
        assert_eq!(r.header("host"), Some("h"));
    }

    #[test]
    fn error_codes_and_messages() {
        let all = [
            HttpError::BadRequest("x".to_owned()),
            HttpError::HeadTooLarge,
            HttpError::BodyTooLarge,
            HttpError::UriTooLong,
            HttpError::NotImplemented("y".to_owned()),
            HttpError::ExpectationFailed,
            HttpError::UnsupportedVersion,
        ];
        let statuses: Vec<u16> = all.iter().map(HttpError::status).collect();
        assert_eq!(statuses, [400, 431, 413, 414, 501, 417, 505]);
        let codes: Vec<&str> = all.iter().map(HttpError::code).collect();
        assert_eq!(
            codes,
            [
                "bad_request",
                "head_too_large",
                "body_too_large",
                "uri_too_long",
                "not_implemented",
                "expectation_failed",
                "unsupported_version"
            ]
        );
        assert_eq!(all[0].message(), "bad request: x");
        for e in &all {
            assert_ne!(reason_phrase(e.status()), "Unknown");
        }
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(499), "Client Error");
    }

    #[test]
    fn write_response_bytes() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            200,
            &[("Content-Type", "text/plain")],
            b"hi",
            true,
            false,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
        );

        let mut out = Vec::new();
        write_response(&mut out, 404, &[], b"nope", false, true);
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\nConnection: close\r\n\r\n"
        );

        let mut out = BytesMut::new();
        write_response(&mut out, 204, &[("ETag", "\"1\"")], b"ignored", true, false);
        assert_eq!(&out[..], b"HTTP/1.1 204 No Content\r\nETag: \"1\"\r\n\r\n");

        let mut out = Vec::new();
        write_response(&mut out, 304, &[], b"", false, false);
        assert_eq!(
            out,
            b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n"
        );

        let mut out = Vec::new();
        write_response(
            &mut out,
            500,
            &[("Connection", "keep-alive")],
            b"",
            false,
            false,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn chunked_writer_bytes() {
        let mut out = Vec::new();
        write_chunked_head(&mut out, 200, &[("Content-Type", "application/json")], true);
        write_chunk(&mut out, b"hello");
        write_chunk(&mut out, b"");
        write_chunk(&mut out, &[b'x'; 26]);
        write_last_chunk(&mut out);
        let mut expected = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1a\r\n".to_vec();
        expected.extend_from_slice(&[b'x'; 26]);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(out, expected);

        let mut out = Vec::new();
        write_chunked_head(&mut out, 206, &[], false);
        assert_eq!(
            out,
            b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn number_formatting() {
        let mut out = Vec::new();
        put_decimal(&mut out, 0);
        out.push(b' ');
        put_decimal(&mut out, usize::MAX);
        out.push(b' ');
        put_hex(&mut out, 0);
        out.push(b' ');
        put_hex(&mut out, usize::MAX);
        let expected = format!("0 {} 0 {:x}", usize::MAX, usize::MAX);
        assert_eq!(out, expected.as_bytes());
    }

    /// xorshift64*: deterministic, dependency-free.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            if n == 0 {
                0
            } else {
                (self.next() % n as u64) as usize
            }
        }
    }

    const SEEDS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /p?x=1&y=%20 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /q HTTP/1.0\r\n\r\n",
        b"PUT /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET http://h/a%2Fb?q=%C3%A9+x HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"\r\n\nOPTIONS * HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
    ];

    const TOKENS: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r",
        b" ",
        b":",
        b"%",
        b"%0",
        b"?",
        b"&",
        b"=",
        b"+",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"Content-Length: ",
        b"Transfer-Encoding: chunked",
        b"Expect: 100-continue",
        b"Connection: close",
        b"\r\n\r\n",
        b"9999999999999999999999",
        b"0",
        b"\0",
        b"\xff",
        b"*",
        b"GET ",
        b"/",
    ];

    fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(input.len() + 1);
            match rng.below(6) {
                0 if at < input.len() => input[at] = rng.next() as u8,
                1 => input.insert(at, rng.next() as u8),
                2 if at < input.len() => {
                    let end = (at + 1 + rng.below(8)).min(input.len());
                    input.drain(at..end);
                }
                3 => {
                    let token = TOKENS[rng.below(TOKENS.len())];
                    input.splice(at..at, token.iter().copied());
                }
                4 => input.truncate(at),
                _ => {
                    let seed = SEEDS[rng.below(SEEDS.len())];
                    input.extend_from_slice(seed);
                }
            }
        }
    }

    #[test]
    fn fuzz_never_panics_and_stays_bounded() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let tight = HttpLimits {
            head_bytes_max: 96,
            headers_max: 3,
            body_bytes_max: 16,
            target_bytes_max: 24,
        };
        let mut requests = 0usize;
        let mut errors = 0usize;
        for case in 0..20_000 {
            let mut input = match case % 4 {
                0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
                1 => {
                    let mut input = Vec::new();
                    for _ in 0..rng.below(24) {
                        input.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
                    }
                    input
                }
                _ => SEEDS[rng.below(SEEDS.len())].to_vec(),
            };
            if case % 4 != 0 {
                mutate(&mut rng, &mut input);
            }
            let limits = if rng.below(3) == 0 {
                tight
            } else {
                HttpLimits::default()
            };
            let mut parser = RequestParser::new(limits);
            let mut buf = BytesMut::new();
            let mut fed = 0;
            // Feed in random-sized pieces; parse until the parser wants more.
            while fed < input.len() {
                let piece = 1 + rng.below(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + piece]);
                fed += piece;
                let mut steps = 0;
                loop {
                    steps += 1;
                    assert!(steps < 10_000, "parser does not make progress");
                    let before = buf.len();
                    let result = parser.parse(&mut buf);
                    assert!(buf.len() <= before);
                    match result {
                        Ok(Parsed::Request(r)) => {
                            requests += 1;
                            assert!(buf.len() < before, "a request consumed nothing");
                            assert!(r.body.len() <= limits.body_bytes_max);
                            assert!(r.headers.len() <= limits.headers_max);
                            assert!(r.target.len() <= limits.target_bytes_max);
                            assert!(r.path.starts_with('/') || r.path == "*");
                            assert!(!r.path.contains('\0'));
                            assert!(r.minor_version <= 1);
                        }
                        Ok(Parsed::SendContinue) => {}
                        Ok(Parsed::NeedMore) => break,
                        Err(e) => {
                            errors += 1;
                            assert!((400..600).contains(&e.status()), "{e:?}");
                            assert!(!e.code().is_empty());
                            assert_ne!(reason_phrase(e.status()), "Unknown");
                            // Failed parsers stay failed.
                            assert_eq!(parser.parse(&mut buf), Err(e));
                            fed = input.len();
                            break;
                        }
                    }
                }
            }
        }
        // The corpus exercises both outcomes.
        assert!(requests > 1_000, "only {requests} requests");
        assert!(errors > 1_000, "only {errors} errors");
    }
}
