//! A blocking HTTP/1.1 client over es-net's client connection (TLS with the server's
//! certificate pinned): what the public API tests and the API benchmark use. Keep-alive,
//! `Content-Length` and chunked bodies; it reconnects when the server closed the connection.

use es_net::client::{ClientConn, ClientTls};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Largest response body accepted (a time-lapse ZIP of a test embryo is far smaller).
pub const RESPONSE_BYTES_MAX: usize = 512 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (Null when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub struct HttpClient {
    address: SocketAddr,
    tls: ClientTls,
    timeout: Duration,
    conn: Option<ClientConn>,
}

impl HttpClient {
    pub fn new(address: SocketAddr, tls: ClientTls, timeout: Duration) -> HttpClient {
        HttpClient {
            address,
            tls,
            timeout,
            conn: None,
        }
    }

    /// Sends one request and reads its response (connecting first when needed).
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> io::Result<HttpResponse> {
        let deadline = Instant::now() + self.timeout;
        if self.conn.as_ref().is_none_or(ClientConn::is_eof) {
            self.conn = Some(ClientConn::connect(self.address, &self.tls, self.timeout)?);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let mut head = format!("{method} {target} HTTP/1.1\r\nhost: esserver\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            head.push_str(&format!("content-length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        conn.queue(head.as_bytes());
        if let Some(body) = body {
            conn.queue(body);
        }
        let result = read_response(conn, method == "HEAD", deadline);
        match &result {
            Ok(response) if response.header("connection") == Some("close") => self.conn = None,
            Err(_) => self.conn = None,
            Ok(_) => {}
        }
        result
    }

    pub fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> io::Result<HttpResponse> {
        self.request("GET", target, headers, None)
    }
}

fn timeout(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("timed out reading {what}"))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Pumps until `ready` finds what it needs in the input buffer.
fn pump_until<T>(
    conn: &mut ClientConn,
    deadline: Instant,
    what: &str,
    mut ready: impl FnMut(&mut bytes::BytesMut) -> io::Result<Option<T>>,
) -> io::Result<T> {
    loop {
        if let Some(found) = ready(conn.input())? {
            return Ok(found);
        }
        if conn.is_eof() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the server closed the connection before {what}"),
            ));
        }
        if Instant::now() >= deadline {
            return Err(timeout(what));
        }
        conn.pump(deadline)?;
    }
}

fn read_response(
    conn: &mut ClientConn,
    head_only: bool,
    deadline: Instant,
) -> io::Result<HttpResponse> {
    let (status, headers) = pump_until(conn, deadline, "the response head", |input| {
        let mut storage = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut storage);
        match parsed.parse(input) {
            Ok(httparse::Status::Complete(length)) => {
                let status = parsed.code.unwrap_or(0);
                let headers = parsed
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).trim().to_string(),
                        )
                    })
                    .collect::<Vec<_>>();
                let _ = input.split_to(length);
                Ok(Some((status, headers)))
            }
            Ok(httparse::Status::Partial) => Ok(None),
            Err(error) => Err(invalid(format!("bad response head: {error}"))),
        }
    })?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut response = HttpResponse {
        status,
        headers: headers.clone(),
        body: Vec::new(),
    };
    if status == 100 {
        return read_response(conn, head_only, deadline);
    }
    if head_only || status == 204 || status == 304 {
        return Ok(response);
    }
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let size = pump_until(conn, deadline, "a chunk size", |input| {
                let Some(end) = input.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                let line = String::from_utf8_lossy(&input[..end]).to_string();
                let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
                let _ = input.split_to(end + 2);
                Ok(Some(size))
            })?;
            if body.len() + size > RESPONSE_BYTES_MAX {
                return Err(invalid("response body too large".into()));
            }
            let chunk = pump_until(conn, deadline, "a chunk", |input| {
                if input.len() < size + 2 {
                    return Ok(None);
                }
                let data = input.split_to(size + 2);
                Ok(Some(data[..size].to_vec()))
            })?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        response.body = body;
        return Ok(response);
    }
    let length: usize = match header("content-length") {
        Some(value) => value
            .parse()
            .map_err(|_| invalid(format!("bad content-length {value:?}")))?,
        None => {
            // Delimited by the end of the connection.
            let mut body = Vec::new();
            loop {
                body.extend_from_slice(&conn.input().split());
                if conn.is_eof() {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(timeout("the body"));
                }
                conn.pump(deadline)?;
            }
            response.body = body;
            return Ok(response);
        }
    };
    if length > RESPONSE_BYTES_MAX {
        return Err(invalid("response body too large".into()));
    }
    response.body = pump_until(conn, deadline, "the body", |input| {
        if input.len() < length {
            return Ok(None);
        }
        Ok(Some(input.split_to(length).to_vec()))
    })?;
    Ok(response)
}
