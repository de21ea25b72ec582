//! es-loadtest: the load generator.
//!
//! Owns simulated incubators speaking the real incubator protocol, and the viewer client
//! speaking the real viewer protocol (through es-proto's
//! client session and es-net's client connection, nothing else of the server), real-sized
//! JPEG frames, open-loop schedules measured from the intended send time into HdrHistogram,
//! spawning a server on a temporary data directory, measuring the disk's own limit, and
//! the reports; and, for a same-run comparison (`pg-compare`), a private PostgreSQL server
//! fed the same ingestion workload. The `loadtest` binary drives it; the server's integration
//! tests reuse the client and the simulator.

pub mod api_bench;
pub mod bench;
pub mod browser_bench;
pub mod cleanup;
pub mod disk;
pub mod frames;
pub mod pg;
pub mod plot;
pub mod run;
pub mod sim;
pub mod spawn;
pub mod viewer_bench;

// The protocol clients live in es-client (the server binary uses the viewer client without
// linking the load generator); their old paths stay for the load generator and the tests.
pub use es_client::http as http_client;
pub use es_client::incubator as client;
pub use es_client::viewer as viewer_client;
