//! A blocking S3 client for the archive tier: rusty-s3 signs (sans-I/O, presigned URLs with
//! `UNSIGNED-PAYLOAD`, so a volume streams from its file without being read twice), ureq
//! sends. It runs on the archiver's thread and on the workers, never on an event loop.
//!
//! Errors never carry a URL: a presigned URL holds the access key id and a signature. Messages
//! name the endpoint's host and the object key only.

use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

/// How long a signed URL stays valid; each request signs its own just before it is sent.
const SIGNED_URL_VALID: Duration = Duration::from_secs(3600);
/// Bytes of an error answer's body kept for the message.
const ERROR_BODY_BYTES_MAX: u64 = 64 * 1024;
/// Most keys one listing returns, and most pages it reads: a store that keeps answering
/// "more" is cut off there.
const LIST_KEYS_MAX: usize = 1_000_000;
const LIST_PAGES_MAX: usize = 10_000;

/// Why a request to the object store failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectError {
    /// No answer: connection refused or reset, name not found, timed out, TLS failure.
    Unreachable(String),
    /// The store answered with an error status (its S3 code and message when it gave them).
    Status { status: u16, detail: String },
    /// The object is not there (404).
    NotFound,
    /// Reading the local file failed, or the transfer was stopped.
    Local(String),
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ObjectError::Unreachable(reason) => write!(f, "object store unreachable: {reason}"),
            ObjectError::Status { status, detail } => {
                write!(f, "object store answered HTTP {status}")?;
                if !detail.is_empty() {
                    write!(f, " ({detail})")?;
                }
                Ok(())
            }
            ObjectError::NotFound => write!(f, "the object is not in the object store"),
            ObjectError::Local(reason) => write!(f, "{reason}"),
        }
    }
}

/// The body-less requests the store is sent.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Get,
    Head,
    Delete,
}

/// Where and how to reach the bucket; the secret is never shown.
#[derive(Clone)]
pub struct ObjectStore {
    bucket: Bucket,
    credentials: Credentials,
    agent: ureq::Agent,
    /// For messages: the endpoint's host and port.
    host: String,
    request_timeout: Duration,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("host", &self.host)
            .field("bucket", &self.bucket.name())
            .finish_non_exhaustive()
    }
}

impl ObjectStore {
    pub fn new(
        endpoint: &str,
        virtual_host_style: bool,
        bucket: &str,
        region: &str,
        credentials: Credentials,
        request_timeout: Duration,
    ) -> Result<ObjectStore, String> {
        let url: url::Url = endpoint
            .parse()
            .map_err(|error| format!("endpoint {endpoint:?} is not a URL: {error}"))?;
        let host = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(format!("endpoint {endpoint:?} names no host")),
        };
        let style = if virtual_host_style {
            UrlStyle::VirtualHost
        } else {
            UrlStyle::Path
        };
        let bucket = Bucket::new(url, style, bucket.to_owned(), region.to_owned())
            .map_err(|error| format!("bucket {bucket:?} at {host}: {error}"))?;
        // Every read and write of a socket waits at most the request timeout: a transfer that
        // stalls fails, one that progresses (a 4 GiB volume on a slow uplink) may take long.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5).min(request_timeout)))
            .timeout_per_read(Some(request_timeout))
            .timeout_per_write(Some(request_timeout))
            .max_idle_connections_per_host(8)
            .build()
            .into();
        Ok(ObjectStore {
            bucket,
            credentials,
            agent,
            host,
            request_timeout,
        })
    }

    /// `host:port` of the endpoint, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn bucket_name(&self) -> &str {
        self.bucket.name()
    }

    /// Uploads `bytes` bytes from `body` as `key` (one PUT: the object appears whole or not
    /// at all). Returns the SHA-256 of what was sent.
    pub fn put(&self, key: &str, body: &mut dyn Read, bytes: u64) -> Result<[u8; 32], ObjectError> {
        let url = self
            .bucket
            .put_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        let mut hashing = Hashing {
            inner: body.take(bytes),
            sha: Sha256::new(),
            read: 0,
        };
        let result = self
            .agent
            .put(url.as_str())
            .header("content-length", bytes.to_string())
            .send(ureq::SendBody::from_reader(&mut hashing));
        let response = result.map_err(|error| self.transport(error))?;
        self.check(response)?;
        if hashing.read != bytes {
            return Err(ObjectError::Local(format!(
                "the local file ended after {} of {bytes} bytes",
                hashing.read
            )));
        }
        Ok(hashing.sha.finalize().into())
    }

    /// Reads the whole object `key` back: its size and SHA-256. Reads at most `bytes_max` + 1
    /// bytes (a longer object fails, naming the limit). Ends early once `stop` is set.
    pub fn read_back(
        &self,
        key: &str,
        bytes_max: u64,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(u64, [u8; 32]), ObjectError> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        let mut response = self.send(Verb::Get, &url, false, None)?;
        let mut reader = response
            .body_mut()
            .with_config()
            .limit(bytes_max.saturating_add(1))
            .reader();
        let mut sha = Sha256::new();
        let mut total = 0u64;
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(ObjectError::Local("the read-back was stopped".into()));
            }
            let n = match reader.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(self.body_error(error)),
            };
            sha.update(&buffer[..n]);
            total += n as u64;
        }
        Ok((total, sha.finalize().into()))
    }

    /// `length` bytes of `key` from `offset` (an HTTP range request).
    pub fn get_range(&self, key: &str, offset: u64, length: u32) -> Result<Vec<u8>, ObjectError> {
        if length == 0 {
            return Ok(Vec::new());
        }
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        let last = offset + u64::from(length) - 1;
        let mut response = self.send(Verb::Get, &url, true, Some((offset, last)))?;
        if response.status().as_u16() != 206 {
            return Err(ObjectError::Status {
                status: response.status().as_u16(),
                detail: "the object store ignored the range request".into(),
            });
        }
        let bytes = response
            .body_mut()
            .with_config()
            .limit(u64::from(length) + 1)
            .read_to_vec()
            .map_err(|error| self.transport(error))?;
        Ok(bytes)
    }

    /// The whole object `key`, as a stream (a restore or a verification of a backup file).
    pub fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, ObjectError> {
        let url = self
            .bucket
            .get_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        // No overall timeout: a backup file may take hours; every read of it is bounded.
        let response = self.send(Verb::Get, &url, false, None)?;
        let host = self.host.clone();
        let reader = response
            .into_body()
            .into_with_config()
            .limit(u64::MAX)
            .reader();
        Ok(Box::new(Named {
            inner: reader,
            host,
        }))
    }

    /// The size of object `key`, None when there is none.
    pub fn size(&self, key: &str) -> Result<Option<u64>, ObjectError> {
        let url = self
            .bucket
            .head_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        match self.send(Verb::Head, &url, true, None) {
            Ok(response) => Ok(response
                .headers()
                .get("content-length")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            Err(ObjectError::NotFound) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Every object whose key starts with `prefix`: (key, size), in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, ObjectError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            action.with_prefix(prefix);
            if let Some(token) = &token {
                action.with_continuation_token(token.clone());
            }
            let url = action.sign(SIGNED_URL_VALID);
            let mut response = self.send(Verb::Get, &url, true, None)?;
            let text = response
                .body_mut()
                .with_config()
                .limit(LIST_BODY_BYTES_MAX)
                .read_to_string()
                .map_err(|error| self.transport(error))?;
            let page =
                rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|error| {
                    ObjectError::Status {
                        status: 200,
                        detail: format!("the object list does not parse: {error}"),
                    }
                })?;
            out.extend(
                page.contents
                    .into_iter()
                    .map(|object| (object.key, object.size.unwrap_or(0))),
            );
            if out.len() > LIST_KEYS_MAX {
                break;
            }
            match page.next_continuation_token {
                Some(next) if Some(&next) == token.as_ref() => break,
                Some(next) => token = Some(next),
                None => return Ok(out),
            }
        }
        Err(ObjectError::Status {
            status: 200,
            detail: format!(
                "listing {prefix} did not end within {LIST_PAGES_MAX} pages or \
                 {LIST_KEYS_MAX} keys"
            ),
        })
    }

    /// Removes object `key` (absent is fine).
    pub fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), key)
            .sign(SIGNED_URL_VALID);
        match self.send(Verb::Delete, &url, true, None) {
            Ok(_) | Err(ObjectError::NotFound) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Creates the bucket (tests and first setup; answers Ok when it exists already).
    pub fn create_bucket(&self) -> Result<(), ObjectError> {
        let action = self.bucket.create_bucket(&self.credentials);
        let url = action.sign(SIGNED_URL_VALID);
        let response = self
            .agent
            .put(url.as_str())
            .config()
            .timeout_global(Some(self.request_timeout))
            .build()
            .send(action.body())
            .map_err(|error| self.transport(error))?;
        match self.check(response) {
            Ok(_) => Ok(()),
            Err(ObjectError::Status { status: 409, .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Sends a request without a body to a signed URL (`bounded`: the whole exchange within
    /// the request timeout; else each read and write of the socket) and checks the answer.
    fn send(
        &self,
        verb: Verb,
        url: &url::Url,
        bounded: bool,
        range: Option<(u64, u64)>,
    ) -> Result<ureq::http::Response<ureq::Body>, ObjectError> {
        let mut request = match verb {
            Verb::Get => self.agent.get(url.as_str()),
            Verb::Head => self.agent.head(url.as_str()),
            Verb::Delete => self.agent.delete(url.as_str()),
        };
        if bounded {
            request = request
                .config()
                .timeout_global(Some(self.request_timeout))
                .build();
        }
        if let Some((first, last)) = range {
            request = request.header("range", format!("bytes={first}-{last}"));
        }
        let response = request.call().map_err(|error| self.transport(error))?;
        self.check(response)
    }

    fn check(
        &self,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> Result<ureq::http::Response<ureq::Body>, ObjectError> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        if status == 404 {
            return Err(ObjectError::NotFound);
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(ERROR_BODY_BYTES_MAX)
            .read_to_string()
            .unwrap_or_default();
        Err(ObjectError::Status {
            status,
            detail: s3_error_detail(&body),
        })
    }

    fn transport(&self, error: ureq::Error) -> ObjectError {
        let host = &self.host;
        match error {
            ureq::Error::StatusCode(status) => ObjectError::Status {
                status,
                detail: String::new(),
            },
            ureq::Error::Io(error) if error.kind() == io::ErrorKind::Other => {
                // A body reader's own error (the local file, or a stop) surfaces as Other.
                ObjectError::Local(error.to_string())
            }
            ureq::Error::BadUri(_) => {
                ObjectError::Unreachable(format!("{host}: the request URL was refused"))
            }
            other => ObjectError::Unreachable(format!("{host}: {other}")),
        }
    }

    fn body_error(&self, error: io::Error) -> ObjectError {
        ObjectError::Unreachable(format!("{}: reading the answer: {error}", self.host))
    }
}

/// Longest object-list page read (a page of 1000 keys is about 300 KB).
const LIST_BODY_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// A response body whose errors name the host.
struct Named<R> {
    inner: R,
    host: String,
}

impl<R: Read> Read for Named<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("object store {}: reading the answer: {error}", self.host),
            )
        })
    }
}

/// A reader that hashes what it hands out.
struct Hashing<R> {
    inner: R,
    sha: Sha256,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// `Code: Message` of an S3 XML error body, else nothing.
fn s3_error_detail(body: &str) -> String {
    let field = |name: &str| -> Option<String> {
        let start = body.find(&format!("<{name}>"))? + name.len() + 2;
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].chars().take(200).collect())
    };
    match (field("Code"), field("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_error_bodies_give_their_code_and_message() {
        let body = "<?xml version=\"1.0\"?><Error><Code>NoSuchBucket</Code>\
                    <Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(
            s3_error_detail(body),
            "NoSuchBucket: The specified bucket does not exist"
        );
        assert_eq!(s3_error_detail("<html>bad gateway</html>"), "");
    }

    #[test]
    fn an_unreachable_store_is_named_by_host_without_the_signed_url() {
        let store = ObjectStore::new(
            "http://127.0.0.1:9",
            false,
            "b",
            "us-east-1",
            Credentials::new("AKIDSECRETLOOKING", "s3cr3t"),
            Duration::from_millis(500),
        )
        .unwrap();
        let error = store.get_range("k", 0, 10).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, ObjectError::Unreachable(_)), "{text}");
        assert!(text.contains("127.0.0.1:9"), "{text}");
        assert!(
            !text.contains("AKID") && !text.contains("Signature"),
            "{text}"
        );
    }
}
