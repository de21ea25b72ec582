#![no_main]
//! The `EmbryoServer.ini` parser and its write-back.
//! Harness: `esserver::fuzzing::config_file` (its seeded twin runs in esserver's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    esserver::fuzzing::config_file(data);
});
