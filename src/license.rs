//! Licences (manual 3.3 and 5): a signed document naming the clinic, the server it is for,
//! the configuration (basic or high capacity), the viewer computers allowed by name, the
//! number of mobile devices and an optional expiry.
//!
//! # File format
//!
//! A licence file is JSON: `{"format": "esserver-license-1", "key_id": "<16 hex>",
//! "payload": "<the licence as JSON text>", "signature": "<128 hex>"}`. The signature is
//! Ed25519 over the UTF-8 bytes of `payload` exactly as they stand in the file, so no
//! canonical JSON is needed: the payload is parsed only after its signature checked out.
//! `key_id` is the first 8 bytes of the SHA-256 of the signing public key, in hex; it only
//! selects which trusted key to try.
//!
//! # Keys
//!
//! The issuing side keeps its private key (PKCS#8, hex, in a file readable by its owner only)
//! away from the server; the server trusts public keys (64 hex characters each) named in its
//! configuration. Signing and verification use `ring`, already linked for TLS.

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` of every licence file this server reads.
pub const FORMAT: &str = "esserver-license-1";
/// Largest licence file read, in bytes.
pub const FILE_BYTES_MAX: usize = 64 * 1024;
/// Most viewer computers one licence may name.
pub const COMPUTERS_MAX: usize = 64;

/// The configuration a licence grants (manual 3.3): the capacity planner's own rules.
pub use es_perf::config_rules::Configuration;

/// What a licence says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct License {
    /// An identifier the issuer chooses, shown in logs and on the web interface.
    pub license_id: String,
    pub clinic: String,
    /// The server id this licence is for (`esserver info` prints it).
    pub server_id: String,
    pub configuration: Configuration,
    /// The viewer computers allowed, by name.
    pub viewer_computers: Vec<String>,
    pub mobile_devices: u32,
    /// Unix ms.
    pub issued_at_ms: i64,
    /// Unix ms; None: does not expire.
    pub expires_at_ms: Option<i64>,
    /// A licence the server made for itself on a fresh installation.
    #[serde(default)]
    pub demo: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LicenseFile {
    format: String,
    key_id: String,
    payload: String,
    signature: String,
}

/// Why a licence is not valid. Each says exactly what is wrong, for the log and the web
/// interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenseError {
    #[error("no licence is installed")]
    Missing,
    #[error("the licence file cannot be read: {0}")]
    Unreadable(String),
    #[error("the licence file is malformed: {0}")]
    Malformed(String),
    #[error("the licence is signed by key {0}, which this server does not trust")]
    UntrustedKey(String),
    #[error(
        "the licence's signature does not match its content (the file was changed after signing)"
    )]
    BadSignature,
    #[error("the licence is for server {licensed}, but this server is {actual}")]
    OtherServer { licensed: String, actual: String },
    #[error("the licence has expired: it was {0}")]
    Expired(String),
    #[error("demo licences are not accepted when trusted licence keys are configured")]
    DemoNotAccepted,
}

impl LicenseError {
    /// A stable snake_case code.
    pub fn code(&self) -> &'static str {
        match self {
            LicenseError::Missing => "license_missing",
            LicenseError::Unreadable(_) => "license_unreadable",
            LicenseError::Malformed(_) => "license_malformed",
            LicenseError::UntrustedKey(_) => "license_untrusted_key",
            LicenseError::BadSignature => "license_bad_signature",
            LicenseError::OtherServer { .. } => "license_other_server",
            LicenseError::Expired(_) => "license_expired",
            LicenseError::DemoNotAccepted => "license_demo_not_accepted",
        }
    }
}

/// A signing key of the issuing side.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, String> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| "no randomness for a signing key".to_string())?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, String> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        Ok(SigningKey {
            pair,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// The key as stored: PKCS#8 in hex.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.pkcs8)
    }

    pub fn from_hex(text: &str) -> Result<SigningKey, String> {
        let bytes = hex::decode(text.trim()).map_err(|e| format!("not hex: {e}"))?;
        SigningKey::from_pkcs8(&bytes)
    }

    /// The public key, 64 hex characters: what a server's configuration trusts.
    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// Signs `license` into the text of a licence file.
    pub fn issue(&self, license: &License) -> String {
        let payload = serde_json::to_string_pretty(license).expect("a licence serialises");
        self.sign_payload(payload)
    }

    /// The text of a licence file holding `payload` (whatever it says) with this key's
    /// signature: [`SigningKey::issue`] and the fuzzing harness, which needs signed files
    /// whose content is arbitrary.
    pub(crate) fn sign_payload(&self, payload: String) -> String {
        let signature = self.pair.sign(payload.as_bytes());
        let file = LicenseFile {
            format: FORMAT.into(),
            key_id: key_id(self.pair.public_key().as_ref()),
            payload,
            signature: hex::encode(signature.as_ref()),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a licence file serialises");
        text.push('\n');
        text
    }
}

/// The id of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// A trusted public key, parsed from its 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub public_key: [u8; 32],
}

impl TrustedKey {
    pub fn from_hex(text: &str) -> Result<TrustedKey, String> {
        let mut public_key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut public_key)
            .map_err(|_| format!("a licence public key is 64 hex characters, not {text:?}"))?;
        Ok(TrustedKey { public_key })
    }

    pub fn key_id(&self) -> String {
        key_id(&self.public_key)
    }
}

/// Checks a licence file: its form, its signature against the trusted keys, that it names
/// `server_id` and has not expired at `now_ms`. `demo_allowed` is false when the
/// configuration names trusted keys of its own (a demo licence is then refused).
pub fn verify(
    text: &[u8],
    trusted: &[TrustedKey],
    server_id: &str,
    now_ms: i64,
    demo_allowed: bool,
) -> Result<License, LicenseError> {
    if text.len() > FILE_BYTES_MAX {
        return Err(LicenseError::Malformed(format!(
            "it is larger than {FILE_BYTES_MAX} bytes"
        )));
    }
    let file: LicenseFile =
        serde_json::from_slice(text).map_err(|e| LicenseError::Malformed(e.to_string()))?;
    if file.format != FORMAT {
        return Err(LicenseError::Malformed(format!(
            "format {:?} is not {FORMAT}",
            file.format
        )));
    }
    let key = trusted
        .iter()
        .find(|k| k.key_id() == file.key_id)
        .ok_or_else(|| LicenseError::UntrustedKey(file.key_id.clone()))?;
    let signature = hex::decode(&file.signature).map_err(|_| LicenseError::BadSignature)?;
    UnparsedPublicKey::new(&ED25519, &key.public_key)
        .verify(file.payload.as_bytes(), &signature)
        .map_err(|_| LicenseError::BadSignature)?;
    let license: License = serde_json::from_str(&file.payload)
        .map_err(|e| LicenseError::Malformed(format!("signed content: {e}")))?;
    if license.demo && !demo_allowed {
        return Err(LicenseError::DemoNotAccepted);
    }
    if license.server_id != server_id {
        return Err(LicenseError::OtherServer {
            licensed: license.server_id,
            actual: server_id.to_string(),
        });
    }
    if let Some(expires) = license.expires_at_ms {
        if now_ms >= expires {
            return Err(LicenseError::Expired(crate::times::valid_through(expires)));
        }
    }
    Ok(license)
}

/// Checks what a licence names before it is signed.
pub fn check_content(license: &License) -> Result<(), String> {
    if license.server_id.len() != 32 || !license.server_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "server id {:?} is not the 32 hex characters `esserver info` prints",
            license.server_id
        ));
    }
    if license.clinic.trim().is_empty() || license.clinic.len() > 200 {
        return Err("the clinic's name has 1 to 200 bytes".into());
    }
    if license.viewer_computers.len() > COMPUTERS_MAX {
        return Err(format!("at most {COMPUTERS_MAX} viewer computers"));
    }
    for name in &license.viewer_computers {
        if name.trim().is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(format!(
                "viewer computer name {name:?} must have 1 to 128 bytes and no control characters"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: &str = "0123456789abcdef0123456789abcdef";

    fn license() -> License {
        License {
            license_id: "L-1".into(),
            clinic: "Clinic".into(),
            server_id: SERVER.into(),
            configuration: Configuration::HighCapacity,
            viewer_computers: vec!["LAB-1".into(), "LAB-2".into()],
            mobile_devices: 2,
            issued_at_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_800_000_000_000),
            demo: false,
        }
    }

    #[test]
    fn a_signed_licence_verifies_and_any_changed_byte_is_refused() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_hex(&key.to_hex()).unwrap();
        assert_eq!(again.public_hex(), key.public_hex());
        let trusted = [TrustedKey::from_hex(&key.public_hex()).unwrap()];
        let text = key.issue(&license());
        let now = 1_750_000_000_000;
        assert_eq!(
            verify(text.as_bytes(), &trusted, SERVER, now, false).unwrap(),
            license()
        );
        // Every single-byte change is refused, whatever the byte.
        let bytes = text.as_bytes();
        for at in 0..bytes.len() {
            let mut tampered = bytes.to_vec();
            tampered[at] ^= 0x01;
            if tampered == bytes {
                continue;
            }
            let result = verify(&tampered, &trusted, SERVER, now, false);
            // Whitespace between JSON tokens is not signed: flipping a space to '!' breaks
            // the JSON; flipping '\n' (0x0a) to 0x0b is a control character JSON refuses.
            assert!(result.is_err(), "byte {at} changed and still accepted");
        }
    }

    /// Random and mutated licence files are refused with a reason, never a panic, and never
    /// accepted (a seeded loop, so a failure replays).
    #[test]
    fn random_and_mutated_files_are_refused_without_panic() {
        use rand::{Rng, SeedableRng};
        let seed = 0x11ce_45e5_u64;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let key = SigningKey::generate().unwrap();
        let trusted = [TrustedKey::from_hex(&key.public_hex()).unwrap()];
        let valid = key.issue(&license()).into_bytes();
        for case in 0..2000 {
            let mut bytes = if case % 4 == 0 {
                (0..rng.random_range(0..300))
                    .map(|_| rng.random::<u8>())
                    .collect()
            } else {
                valid.clone()
            };
            for _ in 0..rng.random_range(1..6) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.random_range(0..bytes.len());
                match rng.random_range(0..3) {
                    0 => bytes[at] = rng.random::<u8>(),
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, rng.random::<u8>()),
                }
            }
            if bytes == valid {
                continue;
            }
            if let Ok(accepted) = verify(&bytes, &trusted, SERVER, 1_750_000_000_000, true) {
                // Only a change outside the signed payload (whitespace between JSON tokens)
                // may keep a file valid, and then it says exactly what was signed.
                assert_eq!(accepted, license(), "seed {seed:#x} case {case}");
            }
        }
    }

    #[test]
    fn refusals_say_why() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let trusted = [TrustedKey::from_hex(&key.public_hex()).unwrap()];
        let now = 1_750_000_000_000;
        let text = other.issue(&license());
        let error = verify(text.as_bytes(), &trusted, SERVER, now, false).unwrap_err();
        assert_eq!(error.code(), "license_untrusted_key");
        let text = key.issue(&license());
        let error = verify(
            text.as_bytes(),
            &trusted,
            "ffffffffffffffffffffffffffffffff",
            now,
            false,
        )
        .unwrap_err();
        assert_eq!(error.code(), "license_other_server");
        assert!(error.to_string().contains(SERVER));
        let error =
            verify(text.as_bytes(), &trusted, SERVER, 1_900_000_000_000, false).unwrap_err();
        assert_eq!(error.code(), "license_expired");
        let demo = License {
            demo: true,
            ..license()
        };
        let text = key.issue(&demo);
        let error = verify(text.as_bytes(), &trusted, SERVER, now, false).unwrap_err();
        assert_eq!(error.code(), "license_demo_not_accepted");
        assert!(verify(text.as_bytes(), &trusted, SERVER, now, true).is_ok());
        let error = verify(b"{}", &trusted, SERVER, now, true).unwrap_err();
        assert_eq!(error.code(), "license_malformed");
        assert!(check_content(&license()).is_ok());
        // Named computers only, and no more than the configuration allows.
        let basic = License {
            configuration: Configuration::Basic,
            ..license()
        };
        let none = std::collections::BTreeSet::new();
        assert!(allow_computer(&basic, "lab-1", &none).is_ok());
        assert!(allow_computer(&basic, "LAB-9", &none)
            .unwrap_err()
            .contains("not named"));
        let one: std::collections::BTreeSet<String> = ["lab-1".to_string()].into();
        assert!(
            allow_computer(&basic, "LAB-1", &one).is_ok(),
            "the same computer again"
        );
        assert!(allow_computer(&basic, "LAB-2", &one)
            .unwrap_err()
            .contains("allows 1 viewer computer"));
        let demo = License {
            demo: true,
            viewer_computers: Vec::new(),
            ..license()
        };
        assert!(allow_computer(&demo, "ANY", &one).is_ok());
        let bad = License {
            server_id: "nope".into(),
            ..license()
        };
        assert!(check_content(&bad).unwrap_err().contains("esserver info"));
    }
}

/// Whether `computer` may connect a viewer, given the computers already connected
/// (lowercased): the licence must name it (a DEMO licence naming none allows any), and the
/// configuration's computers must not all be taken by others.
pub fn allow_computer(
    license: &License,
    computer: &str,
    connected: &std::collections::BTreeSet<String>,
) -> Result<(), String> {
    let named = license
        .viewer_computers
        .iter()
        .any(|name| name.eq_ignore_ascii_case(computer));
    let any_allowed = license.demo && license.viewer_computers.is_empty();
    if !named && !any_allowed {
        return Err(format!(
            "computer {computer:?} is not named in the licence {} (it allows: {})",
            license.license_id,
            license.viewer_computers.join(", ")
        ));
    }
    let max = license.configuration.computers_max() as usize;
    let key = computer.to_lowercase();
    if !connected.contains(&key) && connected.len() >= max {
        return Err(format!(
            "the {} configuration allows {max} viewer computer(s) and {} are connected ({}); \
             close a viewer on one of them first",
            license.configuration.name(),
            connected.len(),
            connected.iter().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(())
}

/// The licence file in the data directory.
pub const LICENSE_FILE: &str = "license.json";
/// The local licence authority's private key (demo mode only), in the data directory.
pub const AUTHORITY_KEY_FILE: &str = "license-authority.key";

/// The server's licence: loaded at start, checked again (expiry) at every use, replaced at
/// once by [`Licensing::install`].
pub struct Licensing {
    trusted: Vec<TrustedKey>,
    demo_allowed: bool,
    server_id: String,
    path: std::path::PathBuf,
    state: parking_lot::RwLock<Result<License, LicenseError>>,
}

impl Licensing {
    /// Loads the licence of `data_dir`. With no `trusted_keys` configured, a local licence
    /// authority (its key in the data directory) is trusted, and when no licence is
    /// installed it issues a DEMO high-capacity licence for this server, so a fresh
    /// installation works out of the box.
    pub fn load(
        data_dir: &std::path::Path,
        trusted_keys: &[String],
        server_id: &str,
        now_ms: i64,
    ) -> Result<Licensing, String> {
        let path = data_dir.join(LICENSE_FILE);
        let (trusted, demo_allowed) = if trusted_keys.is_empty() {
            let authority = local_authority(data_dir)?;
            let trusted = TrustedKey::from_hex(&authority.public_hex())?;
            if !path.exists() {
                let demo = License {
                    license_id: format!("DEMO-{}", &server_id[..8.min(server_id.len())]),
                    clinic: "DEMO (no licence installed)".into(),
                    server_id: server_id.to_string(),
                    configuration: Configuration::HighCapacity,
                    viewer_computers: Vec::new(),
                    mobile_devices: 0,
                    issued_at_ms: now_ms,
                    expires_at_ms: None,
                    demo: true,
                };
                write_atomically(&path, authority.issue(&demo).as_bytes())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
                tracing::warn!(path = %path.display(), "no licence keys are configured: made a DEMO high-capacity licence for this server; configure [License] trusted_keys and install a real licence for production");
            }
            (vec![trusted], true)
        } else {
            let trusted = trusted_keys
                .iter()
                .map(|k| TrustedKey::from_hex(k))
                .collect::<Result<Vec<_>, _>>()?;
            (trusted, false)
        };
        let licensing = Licensing {
            trusted,
            demo_allowed,
            server_id: server_id.to_string(),
            path,
            state: parking_lot::RwLock::new(Err(LicenseError::Missing)),
        };
        let state = licensing.read_file(now_ms);
        match &state {
            Ok(license) => tracing::info!(
                license = %license.license_id,
                clinic = %license.clinic,
                configuration = license.configuration.name(),
                demo = license.demo,
                "licence valid"
            ),
            Err(error) => tracing::error!(code = error.code(), "licence invalid: {error}; viewers and the public API are refused until a valid licence is installed (incubators keep uploading)"),
        }
        *licensing.state.write() = state;
        Ok(licensing)
    }

    fn read_file(&self, now_ms: i64) -> Result<License, LicenseError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(LicenseError::Missing)
            }
            Err(error) => return Err(LicenseError::Unreadable(error.to_string())),
        };
        verify(
            &text,
            &self.trusted,
            &self.server_id,
            now_ms,
            self.demo_allowed,
        )
    }

    /// The licence if it is valid now, else why not.
    pub fn current(&self, now_ms: i64) -> Result<License, LicenseError> {
        let state = self.state.read().clone();
        let license = state?;
        match license.expires_at_ms {
            Some(expires) if now_ms >= expires => {
                Err(LicenseError::Expired(crate::times::valid_through(expires)))
            }
            _ => Ok(license),
        }
    }

    /// Reads the licence file again (a reload): a valid one is in force at once; an invalid
    /// or missing one changes nothing (the error says why; the next start would refuse it).
    pub fn reread(&self, now_ms: i64) -> Result<License, LicenseError> {
        // Held across the read: an install meanwhile is either read here or comes after.
        let mut state = self.state.write();
        let license = self.read_file(now_ms)?;
        *state = Ok(license.clone());
        Ok(license)
    }

    /// Verifies `text` and, when valid, makes it the server's licence at once (written to
    /// the data directory first, atomically). An invalid one changes nothing.
    pub fn install(&self, text: &[u8], now_ms: i64) -> Result<License, LicenseError> {
        let license = verify(
            text,
            &self.trusted,
            &self.server_id,
            now_ms,
            self.demo_allowed,
        )?;
        let mut state = self.state.write();
        write_atomically(&self.path, text)
            .map_err(|e| LicenseError::Unreadable(format!("cannot store it: {e}")))?;
        tracing::info!(license = %license.license_id, clinic = %license.clinic, configuration = license.configuration.name(), "licence installed");
        *state = Ok(license.clone());
        Ok(license)
    }
}

/// The local authority's key, made on first use (demo mode only).
fn local_authority(data_dir: &std::path::Path) -> Result<SigningKey, String> {
    let path = data_dir.join(AUTHORITY_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => SigningKey::from_hex(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = SigningKey::generate()?;
            write_private(&path, key.to_hex().as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(error) => Err(format!("cannot read {}: {error}", path.display())),
    }
}

fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Writes a temporary file beside `path`, syncs it, and renames it over `path`.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod licensing_tests {
    use super::*;

    const SERVER: &str = "0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn a_fresh_installation_gets_a_demo_licence_and_trusted_keys_refuse_it() {
        let dir = tempfile::tempdir().unwrap();
        let licensing = Licensing::load(dir.path(), &[], SERVER, NOW).unwrap();
        let license = licensing.current(NOW).unwrap();
        assert!(license.demo);
        assert_eq!(license.configuration, Configuration::HighCapacity);
        // Loading again keeps the same authority and licence.
        let again = Licensing::load(dir.path(), &[], SERVER, NOW).unwrap();
        assert_eq!(again.current(NOW).unwrap(), license);
        // With a trusted key configured, the demo licence is refused, and a real one works.
        let issuer = SigningKey::generate().unwrap();
        let strict = Licensing::load(dir.path(), &[issuer.public_hex()], SERVER, NOW).unwrap();
        assert_eq!(
            strict.current(NOW).unwrap_err().code(),
            "license_untrusted_key"
        );
        let real = License {
            license_id: "L-9".into(),
            clinic: "Clinic".into(),
            server_id: SERVER.into(),
            configuration: Configuration::Basic,
            viewer_computers: vec!["LAB-1".into()],
            mobile_devices: 0,
            issued_at_ms: NOW,
            expires_at_ms: Some(NOW + 1000),
            demo: false,
        };
        let mut tampered = issuer.issue(&real).into_bytes();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x01;
        assert!(strict.install(&tampered, NOW).is_err());
        assert!(
            strict.current(NOW).is_err(),
            "a refused file changes nothing"
        );
        let installed = strict.install(issuer.issue(&real).as_bytes(), NOW).unwrap();
        assert_eq!(strict.current(NOW).unwrap(), installed);
        assert_eq!(
            strict.current(NOW + 1000).unwrap_err().code(),
            "license_expired"
        );
        // It was stored: a restart finds it.
        let restarted = Licensing::load(dir.path(), &[issuer.public_hex()], SERVER, NOW).unwrap();
        assert_eq!(restarted.current(NOW).unwrap().license_id, "L-9");
    }
}
