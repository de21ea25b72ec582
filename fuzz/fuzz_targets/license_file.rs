#![no_main]
//! Licence files, and arbitrary content behind a valid signature.
//! Harness: `esserver::fuzzing::license_file` (its seeded twin runs in esserver's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    esserver::fuzzing::license_file(data);
});
