//! TLS settings shared by Brume agents and hubs.
//!
//! One config table, [`ClientTls`] (`[forward.tls]`, `[subscribe.tls]` on agents, `[mqtt.tls]`
//! on hubs), turned into a rustls [`ClientConfig`] that trusts only the given CA (never the
//! system's roots: a fleet's broker has its own CA) and, with a certificate and key,
//! presents them (mutual TLS: the broker can tell agents apart by their certificate).
//!
//! rustls runs with the ring provider only ([`install_provider`]): no aws-lc, no OpenSSL,
//! so cross-compiling for ARM needs nothing but a C compiler for ring.
//!
//! Architecture invariant: no network IO here; files are read once, at start, and every
//! error names the file and what to do.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// Why TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{what} {path}: {problem}")]
    File {
        /// `CA file`, `certificate file` or `key file`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// A certificate was given without its key or the other way round.
    #[error("cert_file and key_file go together: give both (mutual TLS) or neither")]
    HalfIdentity,
    /// rustls refused the combination (e.g. the key does not match the certificate).
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS client's files. Present as a table: TLS on; absent: plain TCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM file of the CA certificate(s) the server's certificate must chain to. The
    /// server's certificate must name the host connected to (DNS name or IP address).
    pub ca_file: PathBuf,
    /// PEM file of this client's certificate chain, for brokers that require client
    /// certificates (mutual TLS). With `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM file of this client's private key (PKCS#8, PKCS#1 or SEC1). With `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Makes ring rustls' process-wide crypto provider. Idempotent; call before building any
/// TLS client or server (the settings below call it too).
pub fn install_provider() {
    // Err means a provider is installed already: ours, by an earlier call. Newer rustls
    // releases mark ring's provider deprecated because it has no post-quantum key
    // exchange; ring is kept on purpose (no C toolchain beyond cc for ARM cross builds).
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn file_error(what: &'static str, path: &Path, problem: impl Into<String>) -> TlsError {
    TlsError::File { what, path: path.to_owned(), problem: problem.into() }
}

/// The certificates in a PEM file (at least one).
pub fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(what, path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "holds no `-----BEGIN CERTIFICATE-----` block"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error("key file", path, format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}")))
}

impl ClientTls {
    /// Reads the files and builds the client configuration.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        install_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs("CA file", &self.ca_file)? {
            roots
                .add(cert)
                .map_err(|e| file_error("CA file", &self.ca_file, format!("not a usable CA certificate: {e}")))?;
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(read_certs("certificate file", cert)?, read_key(key)?)?
            }
            _ => return Err(TlsError::HalfIdentity),
        };
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_from_pem_files_and_names_the_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["a1".into()]).unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_file = write("ca.pem", &ca.cert.pem());
        let cert_file = write("a1.pem", &client.cert.pem());
        let key_file = write("a1.key", &client.signing_key.serialize_pem());
        let tls = ClientTls { ca_file: ca_file.clone(), cert_file: Some(cert_file.clone()), key_file: Some(key_file) };
        tls.client_config().unwrap();
        ClientTls { ca_file: ca_file.clone(), cert_file: None, key_file: None }.client_config().unwrap();

        let half = ClientTls { ca_file: ca_file.clone(), cert_file: Some(cert_file), key_file: None };
        assert!(matches!(half.client_config(), Err(TlsError::HalfIdentity)));
        let empty = write("empty.pem", "");
        let err = ClientTls { ca_file: empty.clone(), cert_file: None, key_file: None }.client_config().unwrap_err();
        assert!(err.to_string().contains("empty.pem") && err.to_string().contains("CA file"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = ClientTls { ca_file: missing, cert_file: None, key_file: None }.client_config().unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // A key that is not the certificate's.
        let other = rcgen::generate_simple_self_signed(vec!["a2".into()]).unwrap();
        let wrong_key = write("a2.key", &other.signing_key.serialize_pem());
        let mismatched =
            ClientTls { ca_file, cert_file: Some(write("a1b.pem", &client.cert.pem())), key_file: Some(wrong_key) };
        assert!(mismatched.client_config().is_err());
    }
}
