//! rustls client configurations for the servers the gateway connects to (https upstreams, JWKS and discovery
//! endpoints): the system roots plus an optional private CA, on the one crypto provider (aws-lc-rs).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("{path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("no usable protocol versions: {0}")]
    Versions(String),
}

/// The TLS client config for servers the gateway connects to (https upstreams, JWKS endpoints): the system roots
/// plus, if given, every CA certificate in a PEM file (a private PKI), passed as its path (for messages) and bytes.
pub fn client_config(ca: Option<(&Path, &[u8])>) -> Result<rustls::ClientConfig, ClientTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some((path, pem)) = ca {
        let ca = |detail: String| ClientTlsError::Ca { path: path.display().to_string(), detail };
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots.add(cert.map_err(|e| ca(e.to_string()))?).map_err(|e| ca(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca("no PEM certificate found".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientTlsError::Versions(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
