#![no_main]
//! The HTTP/1.1 request parser of the public API and the web interface.
//! Harness: `es_net::fuzzing::http_request_parser` (its seeded twin runs in es-net's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    es_net::fuzzing::http_request_parser(data);
});
