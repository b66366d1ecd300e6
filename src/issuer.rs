//! Signing keys for tokens the gateway issues itself, and token minting (`portcullis token`, the demo).

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    ECDSA_P384_SHA384_FIXED_SIGNING,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::authn::IssuerSettings;

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuer {0:?} has no signing key (an HMAC secret or private_key)")]
    NoSigningKey(String),
    #[error("signing key: {0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Reads a PKCS#8 PEM private key and returns its public half as a decoding key, with its family.
pub fn public_key_of(pem: &[u8]) -> Result<(DecodingKey, AlgorithmFamily), String> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem)
        .map_err(|e| format!("not a PKCS#8 PEM private key: {e}"))?;
    let der = der.secret_pkcs8_der();
    if let Ok(k) = Ed25519KeyPair::from_pkcs8(der) {
        return Ok((
            DecodingKey::from_ed_der(k.public_key().as_ref()),
            AlgorithmFamily::Ed,
        ));
    }
    for alg in [
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &ECDSA_P384_SHA384_FIXED_SIGNING,
    ] {
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, der) {
            return Ok((
                DecodingKey::from_ec_der(k.public_key().as_ref()),
                AlgorithmFamily::Ec,
            ));
        }
    }
    if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
        return Ok((
            DecodingKey::from_rsa_der(k.public_key().as_ref()),
            AlgorithmFamily::Rsa,
        ));
    }
    Err("unsupported private key type (Ed25519, EC P-256/P-384 or RSA in PKCS#8)".into())
}

/// The key that signs for an issuer, with the algorithm it signs with.
pub fn signing_key(issuer: &IssuerSettings) -> Result<(EncodingKey, Algorithm), IssuerError> {
    if let Some(path) = &issuer.private_key {
        let pem = std::fs::read(path)
            .map_err(|e| IssuerError::Key(format!("{}: {e}", path.display())))?;
        let (_, family) = public_key_of(&pem).map_err(IssuerError::Key)?;
        let alg = issuer
            .algorithms
            .iter()
            .copied()
            .find(|a| a.family() == family)
            .ok_or_else(|| IssuerError::NoSigningKey(issuer.id.clone()))?;
        let key = match family {
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .map_err(|e| IssuerError::Key(e.to_string()))?;
        return Ok((key, alg));
    }
    if let Some(secret) = &issuer.hmac_secret {
        let alg = issuer
            .algorithms
            .iter()
            .copied()
            .find(|a| a.family() == AlgorithmFamily::Hmac)
            .ok_or_else(|| IssuerError::NoSigningKey(issuer.id.clone()))?;
        return Ok((EncodingKey::from_secret(secret), alg));
    }
    Err(IssuerError::NoSigningKey(issuer.id.clone()))
}

/// Mints an access token (`typ: at+jwt`) for `sub` with roles and scopes, valid for `ttl_secs`.
pub fn mint(
    issuer: &IssuerSettings,
    sub: &str,
    roles: &[String],
    scopes: &[String],
    ttl_secs: u64,
) -> Result<String, IssuerError> {
    let (key, alg) = signing_key(issuer)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), issuer.issuer.clone().into());
    claims.insert("sub".into(), sub.into());
    if let Some(aud) = issuer.audiences.first() {
        claims.insert("aud".into(), aud.clone().into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), (now + ttl_secs).into());
    claims.insert(
        "jti".into(),
        crate::headers::new_request_id()
            .to_str()
            .unwrap_or_default()
            .into(),
    );
    claims.insert(issuer.roles_claim.clone(), roles.to_vec().into());
    claims.insert(issuer.scopes_claim.clone(), scopes.join(" ").into());
    let mut header = Header::new(alg);
    header.typ = Some("at+jwt".into());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// Writes a new Ed25519 PKCS#8 private key (mode 0600) for local use.
pub fn generate_ed25519(path: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| e.to_string())?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(|e| e.to_string())?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(|e| e.to_string())?;
    tracing::warn!(path = %path.display(), "generated an Ed25519 token signing key: for local use only");
    Ok(())
}
