//! The harnesses of the fuzz targets `config_ini` and `license_file` (`fuzz/`), shared with
//! their seeded twins below, which run on every `cargo test`. Built only for tests and with
//! the `fuzzing` feature.

use crate::config::{parse_size, Config};
use crate::license::{self, License, LicenseError, SigningKey, TrustedKey};
use std::sync::OnceLock;

/// Parses arbitrary bytes (as lossy UTF-8) as `EmbryoServer.ini`: a configuration or an
/// error naming a line of the file, never a panic; a configuration that parsed writes back
/// (`to_ini`) to a file that parses to the same configuration.
pub fn config_file(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, "fuzz.ini") {
        Ok(config) => {
            let written = config.to_ini();
            match Config::parse(&written, "written.ini") {
                Ok(again) => assert_eq!(again, config, "written back:\n{written}"),
                Err(error) => {
                    panic!("the written configuration does not parse: {error}\n{written}")
                }
            }
        }
        Err(error) => {
            assert_eq!(error.file, "fuzz.ini");
            assert!(!error.message.is_empty());
            assert!(error.line as usize <= text.split('\n').count(), "{error}");
        }
    }
    if text.len() < 64 {
        let _ = parse_size(&text);
    }
}

/// The server id the fuzzed licences are checked against.
pub const FUZZ_SERVER_ID: &str = "0123456789abcdef0123456789abcdef";

/// The signing key of the fuzzed licences (PKCS#8, hex): fixed, so a corpus of licence files
/// keeps verifying from one run to the next. Trusted by nothing but these harnesses.
const FUZZ_KEY_PKCS8: &str = concat!(
    "3053020101300506032b657004220420",
    "ed6ff72245ca9221d8f63cd7aabd83d5489ba3105ac4e86aa11598608e5c8a12",
    "a123032100",
    "0de87de09dc5048bbb161c35fdddc377df0da0f181a305008c49890c1a93e1aa",
);

fn fuzz_key() -> &'static (SigningKey, [TrustedKey; 1]) {
    static KEY: OnceLock<(SigningKey, [TrustedKey; 1])> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = SigningKey::from_hex(FUZZ_KEY_PKCS8).expect("the fuzzing key is valid");
        let trusted = [TrustedKey::from_hex(&key.public_hex()).expect("its public key")];
        (key, trusted)
    })
}

/// A licence file the fuzzing key signed: the seed of the corpus and of the twin.
pub fn signed_license_file() -> Vec<u8> {
    let (key, _) = fuzz_key();
    key.issue(&License {
        license_id: "L-FUZZ-1".into(),
        clinic: "Clinic A".into(),
        server_id: FUZZ_SERVER_ID.into(),
        configuration: license::Configuration::Basic,
        viewer_computers: vec!["LAB-1".into()],
        mobile_devices: 2,
        issued_at_ms: 1_750_000_000_000,
        expires_at_ms: Some(1_900_000_000_000),
        demo: false,
    })
    .into_bytes()
}

/// Checks arbitrary bytes as a model document (`es_models`): a refusal names where and why;
/// an accepted model survives export and import unchanged and evaluates without panicking, on
/// an embryo whose timings and annotations come from the same bytes, to an outcome whose
/// score (if any) is a finite number.
pub fn model_document(data: &[u8]) {
    let model = match es_models::Model::from_json(data) {
        Ok(model) => model,
        Err(error) => {
            assert!(!error.at.is_empty() && !error.message.is_empty());
            assert_eq!(error.code(), "invalid_model");
            return;
        }
    };
    let again = es_models::Model::from_json(model.to_json().as_bytes()).expect("exported");
    assert_eq!(again, model);
    let mut embryo = es_models::Embryo::default();
    for (index, byte) in data.iter().take(64).enumerate() {
        let event = es_models::EVENTS[index % es_models::EVENTS.len()];
        embryo.set_event(event, f64::from(*byte) / 2.0);
    }
    embryo.annotations.insert("MN4".into(), "yes".into());
    let evaluation = model.evaluate(&embryo);
    if let es_models::Outcome::Score(score) = evaluation.outcome {
        assert!(score.is_finite(), "{evaluation:?}");
    }
    assert!(!evaluation.rule.is_empty());
}

/// Checks arbitrary bytes as a licence file (first byte: the clock and whether a demo
/// licence is allowed), and again as the content of a file with a valid signature, so that
/// the parsing of what is signed is reached too. Every refusal has a code and a reason; an
/// accepted licence is for this server, not expired, re-issues to itself, and its checks of
/// names and computers do not panic.
pub fn license_file(data: &[u8]) {
    let (control, body) = match data.split_first() {
        Some((control, body)) => (*control, body),
        None => (0, data),
    };
    let (key, trusted) = fuzz_key();
    let now_ms = 1_700_000_000_000 + i64::from(control & 0x7f) * 7 * 86_400_000 * 4;
    let demo_allowed = control & 0x80 != 0;
    let check = |result: Result<License, LicenseError>, signed: bool| match result {
        Ok(accepted) => {
            assert_eq!(accepted.server_id, FUZZ_SERVER_ID);
            assert!(accepted
                .expires_at_ms
                .is_none_or(|expires| now_ms < expires));
            assert!(demo_allowed || !accepted.demo);
            let again = license::verify(
                key.issue(&accepted).as_bytes(),
                trusted,
                FUZZ_SERVER_ID,
                now_ms,
                demo_allowed,
            );
            assert_eq!(again.as_ref(), Ok(&accepted), "re-issued");
            let _ = license::check_content(&accepted);
            let connected = ["lab-1".to_string(), "x".to_string()].into_iter().collect();
            for computer in ["LAB-1", "", "lab-2"] {
                let _ = license::allow_computer(&accepted, computer, &connected);
            }
        }
        Err(error) => {
            assert!(!error.code().is_empty());
            assert!(!error.to_string().is_empty());
            if signed {
                assert!(
                    !matches!(
                        error,
                        LicenseError::BadSignature | LicenseError::UntrustedKey(_)
                    ),
                    "a valid signature refused: {error}"
                );
            }
        }
    };
    check(
        license::verify(body, trusted, FUZZ_SERVER_ID, now_ms, demo_allowed),
        false,
    );
    let payload = String::from_utf8_lossy(body).into_owned();
    let signed = key.sign_payload(payload);
    check(
        license::verify(
            signed.as_bytes(),
            trusted,
            FUZZ_SERVER_ID,
            now_ms,
            demo_allowed,
        ),
        signed.len() <= license::FILE_BYTES_MAX,
    );
}

#[cfg(test)]
mod tests {
    //! The twins of the fuzz targets `config_ini` and `license_file`: seeded, replayable.
    //! (`config::tests::random_and_mutated_files_never_panic` and
    //! `license::tests::random_and_mutated_files_are_refused_without_panic` check the
    //! parsers themselves the same way.)

    use super::*;
    use rand::{Rng, SeedableRng};

    fn mutate(rng: &mut rand::rngs::StdRng, bytes: &mut Vec<u8>, alphabet: &[u8]) {
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..=bytes.len());
            let byte = alphabet[rng.random_range(0..alphabet.len())];
            match rng.random_range(0..5) {
                0 if at < bytes.len() => bytes[at] = byte,
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                2 => bytes.insert(at, byte),
                3 if at < bytes.len() => {
                    let end = (at + 1 + rng.random_range(0..40)).min(bytes.len());
                    let copy = bytes[at..end].to_vec();
                    let to = rng.random_range(0..=bytes.len());
                    bytes.splice(to..to, copy);
                }
                _ => bytes.truncate(at),
            }
        }
    }

    #[test]
    fn twin_config_ini_random_and_mutated_files() {
        let seed = 0x0c0f_1171_u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid = Config::default().to_ini().into_bytes();
        let alphabet = b"[]=;#\n\r\t abcdefghijklmnopqrstuvwxyzKMGBi0123456789.:-_/\\\xff\xc3";
        for case in 0..3000 {
            let mut bytes = if case % 3 == 0 {
                (0..rng.random_range(0..300))
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect()
            } else {
                valid.clone()
            };
            mutate(&mut rng, &mut bytes, alphabet);
            let outcome = std::panic::catch_unwind(|| config_file(&bytes));
            assert!(
                outcome.is_ok(),
                "seed {seed:#x} case {case}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn twin_model_document_random_and_mutated_files() {
        let seed = 0x0de1_5eed_u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let cases: serde_json::Value =
            serde_json::from_str(include_str!("../storage/models/tests/cases.json")).unwrap();
        let valid: Vec<Vec<u8>> = cases["models"]
            .as_object()
            .unwrap()
            .values()
            .map(|model| serde_json::to_vec(model).unwrap())
            .collect();
        let alphabet = b"{}[]\":,.-0123456789eE truefalsnulcategoryvariableat_leastbelow";
        for case in 0..3000 {
            let mut bytes = valid[case % valid.len()].clone();
            mutate(&mut rng, &mut bytes, alphabet);
            let outcome = std::panic::catch_unwind(|| model_document(&bytes));
            assert!(
                outcome.is_ok(),
                "seed {seed:#x} case {case}: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
        for model in &valid {
            model_document(model);
        }
    }

    #[test]
    fn twin_license_file_random_and_mutated_files() {
        let seed = 0x11ce_0f22_u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid = signed_license_file();
        // The valid file is accepted as it is.
        let (_, trusted) = fuzz_key();
        assert!(license::verify(&valid, trusted, FUZZ_SERVER_ID, 1_750_000_000_000, false).is_ok());
        let payload_start = valid.windows(9).position(|w| w == b"\"payload\"").unwrap();
        let alphabet: Vec<u8> = (0..=255u8).collect();
        for case in 0..1500 {
            let mut bytes = vec![rng.random::<u8>()];
            match case % 3 {
                0 => bytes.extend((0..rng.random_range(0..200)).map(|_| rng.random::<u8>())),
                1 => bytes.extend_from_slice(&valid),
                // Mostly the signed content: a licence's JSON, mutated, then signed again.
                _ => bytes.extend_from_slice(&valid[payload_start..]),
            }
            let (control, body) = bytes.split_at(1);
            let mut body = body.to_vec();
            mutate(&mut rng, &mut body, &alphabet);
            let input = [control, &body].concat();
            let outcome = std::panic::catch_unwind(|| license_file(&input));
            assert!(outcome.is_ok(), "seed {seed:#x} case {case}: {input:02x?}");
        }
    }
}
