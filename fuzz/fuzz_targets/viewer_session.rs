#![no_main]
//! Viewer protocol: the frame decoder and the server session.
//! Harness: `es_proto::fuzzing::viewer_server` (its seeded twin runs in es-proto's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    es_proto::fuzzing::viewer_server(data);
});
