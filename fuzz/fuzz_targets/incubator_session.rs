#![no_main]
//! Incubator protocol: the frame decoder and the server session.
//! Harness: `es_proto::fuzzing::incubator_server` (its seeded twin runs in es-proto's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    es_proto::fuzzing::incubator_server(data);
});
