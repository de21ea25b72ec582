#![no_main]
//! Model documents (es-models): parsing, export and import, evaluation.
//! Harness: `esserver::fuzzing::model_document` (its seeded twin runs in esserver's tests).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    esserver::fuzzing::model_document(data);
});
