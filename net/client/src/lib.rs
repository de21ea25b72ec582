//! Blocking clients of esserver's protocols, over `es_net::client::ClientConn` (TLS or
//! plain TCP):
//!
//! - [`incubator`]: an incubator's connection (HELLO, then requests and their answers),
//!   driving `es_proto::incubator::ClientSession`.
//! - [`viewer`]: a viewer's logged-in connection (requests, answers and pushes).
//! - [`http`]: HTTP/1.1 requests with keep-alive, `Content-Length` and chunked bodies.
//!
//! The server binary uses the viewer client for `esserver viewer`; the load generator and the
//! integration tests use all three. Nothing here links the load generator's dependencies.

pub mod http;
pub mod incubator;
pub mod viewer;
