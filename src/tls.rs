//! The listener's TLS: a rustls server configuration, with client certificates (mutual TLS)
//! verified against `server.tls.client_ca_file` when set, and the identity a verified
//! certificate gives (its subject). axum-server hands each request the connection's peer
//! certificates; rustls has verified them before the first request.

use crate::config::ClientAuth;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::Path;
use std::sync::Arc;

fn invalid(what: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", what.display()),
    )
}

/// The certificate chain in `cert` and the private key in `key` (PEM).
fn identity(
    cert: &Path,
    key: &Path,
) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| invalid(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert, e))?;
    if chain.is_empty() {
        return Err(invalid(cert, "no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, e))?;
    Ok((chain, key_der))
}

/// The listener's TLS configuration for `cert`/`key`; with `ca`, it asks for client
/// certificates and verifies them against those CAs. `check-config` builds it too, to fail on
/// files that would stop a start.
pub fn listener_config(
    cert: &Path,
    key: &Path,
    ca: Option<&Path>,
    mode: ClientAuth,
) -> io::Result<axum_server::tls_rustls::RustlsConfig> {
    let (chain, key_der) = identity(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let builder = match ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| invalid(ca, e))? {
                roots
                    .add(c.map_err(|e| invalid(ca, e))?)
                    .map_err(|e| invalid(ca, e))?;
            }
            if roots.is_empty() {
                return Err(invalid(ca, "no CA certificate in the file"));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match mode {
                ClientAuth::Required => verifier.build(),
                ClientAuth::Optional => verifier.allow_unauthenticated().build(),
            }
            .map_err(|e| invalid(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| invalid(cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        Arc::new(config),
    ))
}

/// The subject of a (verified) DER certificate, as RFC 4514 writes it (`CN=ci-runner,O=Example`).
pub fn subject(der: &[u8]) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(der).ok()?;
    Some(cert.tbs_certificate.subject.to_string())
}
