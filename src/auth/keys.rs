//! Keys: binding a verification key to an issuer's algorithms, reading PEM keys, generating a local signing key.

use aws_lc_rs::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::issuer::SignatureCheck;
use super::VerifyKey;

pub fn parse_alg(s: &str) -> Option<Algorithm> {
    // Case-sensitive on purpose (RFC 7518 names); "none" never parses.
    s.parse().ok()
}

/// An algorithm's name as the config and JOSE headers spell it, the one [`parse_alg`] reads.
pub fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::HS256 => "HS256",
        Algorithm::HS384 => "HS384",
        Algorithm::HS512 => "HS512",
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::RS256 => "RS256",
        Algorithm::RS384 => "RS384",
        Algorithm::RS512 => "RS512",
        Algorithm::PS256 => "PS256",
        Algorithm::PS384 => "PS384",
        Algorithm::PS512 => "PS512",
        Algorithm::EdDSA => "EdDSA",
    }
}

/// Returns the length in bits of the modulus of a PKCS#1 RSAPublicKey DER, as jsonwebtoken stores it.
fn rsa_modulus_bits(key: &DecodingKey) -> Option<usize> {
    use jsonwebtoken::DecodingKeyKind;
    let n: &[u8] = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, .. } => n,
        DecodingKeyKind::SecretOrDer(der) => {
            // SEQUENCE { INTEGER n, INTEGER e }
            let read_len = |d: &[u8], at: usize| -> Option<(usize, usize)> {
                let first = *d.get(at)?;
                if first < 0x80 {
                    return Some((usize::from(first), at + 1));
                }
                let k = usize::from(first & 0x7f);
                let mut len = 0usize;
                for i in 0..k {
                    len = len.checked_mul(256)? + usize::from(*d.get(at + 1 + i)?);
                }
                Some((len, at + 1 + k))
            };
            if der.first() != Some(&0x30) {
                return None;
            }
            let (_, at) = read_len(der, 1)?;
            if der.get(at) != Some(&0x02) {
                return None;
            }
            let (len, at) = read_len(der, at + 1)?;
            der.get(at..at + len)?
        }
    };
    let n = match n.iter().position(|&b| b != 0) {
        Some(i) => &n[i..],
        None => return Some(0),
    };
    Some(n.len() * 8 - n[0].leading_zeros() as usize)
}

/// Binds a key to the issuer's allowed algorithms of its family, refusing weak keys.
pub fn bind_key(kid: Option<String>, key: DecodingKey, allowed: &[Algorithm], jwk_alg: Option<Algorithm>) -> Result<VerifyKey, String> {
    let family = key.family();
    if family == AlgorithmFamily::Rsa {
        match rsa_modulus_bits(&key) {
            Some(bits) if bits >= 2048 => {}
            Some(bits) => return Err(format!("RSA key of {bits} bits is too small (at least 2048)")),
            None => return Err("RSA key could not be read".into()),
        }
    }
    let algorithms: Vec<Algorithm> = allowed.iter().copied().filter(|a| a.family() == family && jwk_alg.is_none_or(|j| j == *a)).collect();
    if algorithms.is_empty() {
        return Err(format!("key type {family:?} fits none of the issuer's algorithms {allowed:?}"));
    }
    let checks = algorithms.iter().map(|&a| Ok((a, signature_check(&key, a)?))).collect::<Result<_, String>>()?;
    Ok(VerifyKey { kid, key, algorithms, checks })
}

/// Parses a key once for one algorithm of its family (the same aws-lc-rs algorithms jsonwebtoken would pick).
fn signature_check(key: &DecodingKey, alg: Algorithm) -> Result<SignatureCheck, String> {
    use aws_lc_rs::{hmac, signature as sig};
    use jsonwebtoken::DecodingKeyKind;
    // Key bytes: an HMAC secret, or the DER or raw public key jsonwebtoken keeps (never RSA components here:
    // the family filter in bind_key sends those to `rsa`).
    let bytes = || match key.kind() {
        DecodingKeyKind::SecretOrDer(bytes) => Ok(bytes.as_slice()),
        DecodingKeyKind::RsaModulusExponent { .. } => Err(format!("{alg:?} does not take an RSA key")),
    };
    let public = |algorithm: &'static dyn sig::VerificationAlgorithm| -> Result<SignatureCheck, String> {
        sig::ParsedPublicKey::new(algorithm, bytes()?).map(SignatureCheck::Public).map_err(|e| format!("{alg:?} key rejected: {e}"))
    };
    let rsa = |params: &'static sig::RsaParameters| -> Result<SignatureCheck, String> {
        let parsed = match key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => sig::RsaPublicKeyComponents { n, e }.to_parsed_public_key(params),
            DecodingKeyKind::SecretOrDer(der) => sig::ParsedPublicKey::new(params, der),
        };
        parsed.map(SignatureCheck::Public).map_err(|e| format!("{alg:?} key rejected: {e}"))
    };
    match alg {
        Algorithm::HS256 => Ok(SignatureCheck::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, bytes()?)))),
        Algorithm::HS384 => Ok(SignatureCheck::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA384, bytes()?)))),
        Algorithm::HS512 => Ok(SignatureCheck::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA512, bytes()?)))),
        Algorithm::ES256 => public(&sig::ECDSA_P256_SHA256_FIXED),
        Algorithm::ES384 => public(&sig::ECDSA_P384_SHA384_FIXED),
        Algorithm::EdDSA => public(&sig::ED25519),
        Algorithm::RS256 => rsa(&sig::RSA_PKCS1_2048_8192_SHA256),
        Algorithm::RS384 => rsa(&sig::RSA_PKCS1_2048_8192_SHA384),
        Algorithm::RS512 => rsa(&sig::RSA_PKCS1_2048_8192_SHA512),
        Algorithm::PS256 => rsa(&sig::RSA_PSS_2048_8192_SHA256),
        Algorithm::PS384 => rsa(&sig::RSA_PSS_2048_8192_SHA384),
        Algorithm::PS512 => rsa(&sig::RSA_PSS_2048_8192_SHA512),
    }
}

/// Reads a PEM public key (or certificate) of any supported type.
pub fn read_public_pem(pem: &[u8]) -> Option<DecodingKey> {
    DecodingKey::from_rsa_pem(pem).ok().or_else(|| DecodingKey::from_ec_pem(pem).ok()).or_else(|| DecodingKey::from_ed_pem(pem).ok())
}

/// Reads the public half of a PEM private key (PKCS#8: Ed25519, EC P-256/P-384, RSA).
pub fn public_from_private_pem(pem: &[u8]) -> Result<DecodingKey, String> {
    public_key_of(pem).map(|(key, _)| key)
}

/// Reads a PKCS#8 PEM private key and returns its public half as a decoding key, with its family.
pub fn public_key_of(pem: &[u8]) -> Result<(DecodingKey, AlgorithmFamily), String> {
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| format!("not a PKCS#8 PEM private key: {e}"))?;
    let der = der.secret_pkcs8_der();
    if let Ok(k) = Ed25519KeyPair::from_pkcs8(der) {
        return Ok((DecodingKey::from_ed_der(k.public_key().as_ref()), AlgorithmFamily::Ed));
    }
    for alg in [&ECDSA_P256_SHA256_FIXED_SIGNING, &ECDSA_P384_SHA384_FIXED_SIGNING] {
        if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, der) {
            return Ok((DecodingKey::from_ec_der(k.public_key().as_ref()), AlgorithmFamily::Ec));
        }
    }
    if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
        return Ok((DecodingKey::from_rsa_der(k.public_key().as_ref()), AlgorithmFamily::Rsa));
    }
    Err("unsupported private key type (Ed25519, EC P-256/P-384 or RSA in PKCS#8)".into())
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
    f.write_all(key.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
    tracing::warn!(path = %path.display(), "generated an Ed25519 token signing key: for local use only");
    Ok(())
}
