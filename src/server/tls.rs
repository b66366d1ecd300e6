//! TLS termination: PEM -> rustls `ServerConfig` (TLS 1.2/1.3, AEAD suites, ALPN h2 + http/1.1, no 0-RTT), the
//! self-signed development pair, and a certificate resolver that can be swapped on reload.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use crate::config::{TlsSettings, TlsVersion};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {detail}")]
    BadKey { path: String, detail: String },
    #[error("the certificate and key do not form a usable pair: {0}")]
    Pair(String),
    #[error("cannot generate the self-signed pair: {0}")]
    Generate(String),
    #[error("client certificates: {0}")]
    ClientCa(String),
    #[error("cannot make the session ticket keys: {0}")]
    Tickets(String),
}

/// Returns true if the pair is missing and `self_signed` will generate it at start.
pub fn will_generate(s: &TlsSettings) -> bool {
    s.self_signed && !(s.cert.exists() && s.key.exists())
}

/// Generates a localhost / 127.0.0.1 certificate at the configured paths when `self_signed` is set and the files
/// are missing. The key file is written with mode 0600. Returns true if a pair was generated.
pub fn ensure_self_signed(s: &TlsSettings) -> Result<bool, TlsError> {
    if !will_generate(s) {
        return Ok(false);
    }
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, data: &str, mode: u32| -> Result<(), TlsError> {
        let err = |source| TlsError::Read { path: path.display().to_string(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts.open(path).map_err(err)?;
        f.write_all(data.as_bytes()).map_err(err)
    };
    write(&s.key, &certified.signing_key.serialize_pem(), 0o600)?;
    write(&s.cert, &certified.cert.pem(), 0o644)?;
    tracing::warn!(cert = %s.cert.display(), key = %s.key.display(), "generated a self-signed localhost certificate: for local use only");
    Ok(true)
}

/// Loads a certificate chain and its private key into a rustls `CertifiedKey`.
pub fn load_certified_key(s: &TlsSettings) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
    let cert_pem = read(&s.cert)?;
    let key_pem = read(&s.key)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: s.cert.display().to_string() });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| TlsError::BadKey { path: s.key.display().to_string(), detail: e.to_string() })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::BadKey { path: s.key.display().to_string(), detail: e.to_string() })?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match().map_err(|e| TlsError::Pair(e.to_string()))?;
    Ok(Arc::new(ck))
}

/// Serves the current certificate; `set` swaps it for new handshakes without touching live connections.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    /// Creates a resolver serving `key`.
    pub fn new(key: Arc<CertifiedKey>) -> CertResolver {
        CertResolver { current: ArcSwap::new(key) }
    }

    /// Replaces the certificate for new handshakes.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The suites offered, in the server's order of preference: AEAD and forward secret only (TLS 1.3, and ECDHE on
/// TLS 1.2), strongest first. Listed rather than taken from the provider's defaults, so that a rustls upgrade
/// cannot add a suite or change the order unseen.
const CIPHER_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    &[
        TLS13_AES_256_GCM_SHA384,
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider { cipher_suites: CIPHER_SUITES.to_vec(), ..rustls::crypto::aws_lc_rs::default_provider() })
}

/// Verifies client certificates (`[tls] client_ca`) against the CAs and the CRL of the config in force: a reload
/// swaps in a verifier built from the files as they are then (a new CRL revokes at once). Whether a certificate
/// is asked for, and the CA names hinted to clients, are those of the start.
#[derive(Debug)]
pub struct ClientVerifier {
    current: ArcSwap<VerifierOf>,
    hints: Vec<rustls::DistinguishedName>,
    mandatory: bool,
}

#[derive(Debug)]
struct VerifierOf(Arc<dyn ClientCertVerifier>);

/// The webpki verifier for the config's client CAs and CRL (None without `client_ca`).
fn webpki_client_verifier(s: &TlsSettings) -> Result<Option<Arc<dyn ClientCertVerifier>>, TlsError> {
    let Some(ca) = &s.client_ca else { return Ok(None) };
    let read = |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read(ca)?).filter_map(Result::ok) {
        roots.add(cert).map_err(|e| TlsError::ClientCa(format!("{}: {e}", ca.display())))?;
    }
    let crls: Vec<CertificateRevocationListDer<'static>> = match &s.client_crl {
        Some(p) => CertificateRevocationListDer::pem_slice_iter(&read(p)?).filter_map(Result::ok).collect(),
        None => Vec::new(),
    };
    // The CRL speaks for the certificates its CA issued; a chain through a CA without one is not refused for that.
    let mut b = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status();
    if !s.client_auth_required {
        b = b.allow_unauthenticated();
    }
    b.build().map(Some).map_err(|e| TlsError::ClientCa(e.to_string()))
}

impl ClientVerifier {
    /// The verifier of the config's client CAs (None without `client_ca`).
    pub fn new(s: &TlsSettings) -> Result<Option<Arc<ClientVerifier>>, TlsError> {
        let Some(v) = webpki_client_verifier(s)? else { return Ok(None) };
        let hints = v.root_hint_subjects().to_vec();
        Ok(Some(Arc::new(ClientVerifier { current: ArcSwap::from_pointee(VerifierOf(v)), hints, mandatory: s.client_auth_required })))
    }

    /// On a reload: the CAs and CRL as the files are now.
    pub fn reload(&self, s: &TlsSettings) -> Result<(), TlsError> {
        if let Some(v) = webpki_client_verifier(s)? {
            self.current.store(Arc::new(VerifierOf(v)));
        }
        Ok(())
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current.load().0.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current.load().0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current.load().0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}

/// Builds the server config: TLS 1.2+ (or 1.3 only), the AEAD suites of `CIPHER_SUITES` in the server's order,
/// ALPN h2 then http/1.1, no early data; client certificates verified by `clients` when given.
pub fn server_config(
    s: &TlsSettings,
    resolver: Arc<CertResolver>,
    clients: Option<Arc<ClientVerifier>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = match s.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Pair(e.to_string()))?;
    let builder = match clients {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    // http/1.0 last: an HTTP/1.0 client that names it (curl -0) is served, not refused with no_application_protocol.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    // The server's order decides, not the client's: a client that lists a weaker suite first still gets the
    // strongest both support (scanners rate following the client's order as a finding).
    cfg.ignore_client_order = true;
    // 0-RTT data is replayable; an auth gateway never accepts it.
    cfg.max_early_data_size = 0;
    cfg.send_half_rtt_data = false;
    // Resumption. Tickets: encrypted by keys made at start, kept in memory only and rotated every 6 hours (rustls'
    // RFC 5077 ticketer), so any number of clients resume without server state; TLS 1.3 resumes only with a
    // fresh key exchange (psk_dhe_ke), keeping forward secrecy. Without them, TLS 1.3 does not resume and TLS 1.2
    // resumes by session ID from rustls' in-memory cache of 256 sessions.
    if s.session_tickets {
        cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| TlsError::Tickets(e.to_string()))?;
    } else {
        cfg.send_tls13_tickets = 0;
    }
    Ok(Arc::new(cfg))
}
