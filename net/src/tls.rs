//! TLS glue: server configurations from certificate files, the self-signed certificate a
//! fresh installation generates, and the client side's certificate pinning.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::version::{TLS12, TLS13};
use rustls::{
    ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme, SupportedProtocolVersion,
};
use sha2::{Digest, Sha256};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// The TLS versions every listener and client of ours speaks: TLS 1.3 and TLS 1.2, nothing
/// older. rustls implements nothing older either; naming them keeps a change of rustls's
/// defaults from changing what the server accepts. A TLS 1.0 or 1.1 ClientHello is answered
/// with a `protocol_version` alert (`tests/tls.rs`).
pub const PROTOCOL_VERSIONS: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads the first certificate of a PEM file.
pub fn read_certificate(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let chain = read_chain(path)?;
    chain
        .into_iter()
        .next()
        .ok_or_else(|| TlsError::NoCertificate {
            path: path.to_path_buf(),
        })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// A server configuration ([`PROTOCOL_VERSIONS`]: TLS 1.3 and 1.2; ring's default cipher
/// suites and key exchange groups) from a PEM certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_chain(cert)?;
    let key_bytes = fs::read(key).map_err(|source| TlsError::Read {
        path: key.to_path_buf(),
        source,
    })?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|error| TlsError::BadKey {
        path: key.to_path_buf(),
        detail: error.to_string(),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    Ok(Arc::new(config))
}

/// Where the generated certificate and key live in a data directory.
pub fn self_signed_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("tls");
    (dir.join("server.crt"), dir.join("server.key"))
}

/// Makes sure the data directory holds a self-signed certificate and key, generating them
/// on first start. Returns their paths and whether they were generated now.
pub fn ensure_self_signed(
    data_dir: &Path,
    names: &[String],
) -> Result<(PathBuf, PathBuf, bool), TlsError> {
    let (cert_path, key_path) = self_signed_paths(data_dir);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path, false));
    }
    let dir = cert_path.parent().expect("has a parent");
    fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let generated = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|error| TlsError::Generate(error.to_string()))?;
    write_private(&key_path, generated.signing_key.serialize_pem().as_bytes())?;
    fs::write(&cert_path, generated.cert.pem()).map_err(|source| TlsError::Write {
        path: cert_path.clone(),
        source,
    })?;
    Ok((cert_path, key_path, true))
}

/// Generates a new self-signed certificate and key for `names`, replacing the data
/// directory's (a server reads them at its next start). Returns their paths.
pub fn renew_self_signed(
    data_dir: &Path,
    names: &[String],
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = self_signed_paths(data_dir);
    for path in [&cert_path, &key_path] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(TlsError::Write {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
    let (cert, key, _) = ensure_self_signed(data_dir, names)?;
    Ok((cert, key))
}

/// The `names` (host names, IP addresses) the certificate's subject alternative names lack.
pub fn names_missing(cert: &CertificateDer<'_>, names: &[String]) -> Vec<String> {
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(cert) else {
        return names.to_vec();
    };
    names
        .iter()
        .filter(|name| {
            let Ok(server_name) = ServerName::try_from(name.as_str()) else {
                return true;
            };
            rustls::client::verify_server_name(&parsed, &server_name).is_err()
        })
        .cloned()
        .collect()
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let temporary = path.with_extension("tmp");
    let result = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&temporary)?;
        io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        fs::rename(&temporary, path)
    })();
    result.map_err(|source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// SHA-256 of a certificate, as lowercase hex (what operators compare when pinning).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// A client configuration that trusts exactly one server certificate (pinned), whatever
/// its name or issuer: the server's certificate is self-signed by default.
pub fn pinned_client_config(pinned: CertificateDer<'static>) -> Arc<ClientConfig> {
    pinned_client_config_with_versions(pinned, PROTOCOL_VERSIONS)
}

/// [`pinned_client_config`] speaking only `versions` (a subset of [`PROTOCOL_VERSIONS`]):
/// tests use it to check that the server completes a handshake in each version.
pub fn pinned_client_config_with_versions(
    pinned: CertificateDer<'static>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    client_config(
        Some(fingerprint(&pinned)),
        Arc::new(parking_lot::Mutex::new(None)),
        versions,
    )
}

/// Trust on first use: with `expected` (a SHA-256 fingerprint from [`fingerprint`]) only that
/// certificate is accepted; without, any certificate is accepted once and its fingerprint is
/// put into `seen`, for the caller to store and expect from then on.
pub fn first_use_client_config(
    expected: Option<String>,
    seen: Arc<parking_lot::Mutex<Option<String>>>,
) -> Arc<ClientConfig> {
    client_config(expected, seen, PROTOCOL_VERSIONS)
}

fn client_config(
    expected: Option<String>,
    seen: Arc<parking_lot::Mutex<Option<String>>>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let verifier = Arc::new(FingerprintVerifier {
        expected,
        seen,
        algorithms: provider().signature_verification_algorithms,
    });
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

/// A client configuration that verifies the server's chain against the CA certificates of a
/// PEM file, and the server's name as usual.
pub fn ca_client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca_file)
        .map_err(|error| TlsError::Config(format!("{}: {error}", ca_file.display())))?;
    for certificate in certificates {
        let certificate = certificate
            .map_err(|error| TlsError::Config(format!("{}: {error}", ca_file.display())))?;
        roots
            .add(certificate)
            .map_err(|error| TlsError::Config(error.to_string()))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: ca_file.to_path_buf(),
        });
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct FingerprintVerifier {
    expected: Option<String>,
    seen: Arc<parking_lot::Mutex<Option<String>>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = fingerprint(end_entity);
        *self.seen.lock() = Some(presented.clone());
        match &self.expected {
            Some(expected) if *expected != presented => Err(rustls::Error::General(format!(
                "the server's certificate changed: it presents {presented}, pinned is {expected}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
