//! Keys: binding a verification key to an issuer's algorithms, reading PEM keys, generating a local signing key.

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};

use super::VerifyKey;

pub fn parse_alg(s: &str) -> Option<Algorithm> {
    // Case-sensitive on purpose (RFC 7518 names); "none" never parses.
    s.parse().ok()
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
    Ok(VerifyKey { kid, key, algorithms })
}

/// Reads a PEM public key (or certificate) of any supported type.
pub fn read_public_pem(pem: &[u8]) -> Option<DecodingKey> {
    DecodingKey::from_rsa_pem(pem).ok().or_else(|| DecodingKey::from_ec_pem(pem).ok()).or_else(|| DecodingKey::from_ed_pem(pem).ok())
}

/// Reads the public half of a PEM private key (PKCS#8: Ed25519, EC P-256/P-384, RSA).
pub fn public_from_private_pem(pem: &[u8]) -> Result<DecodingKey, String> {
    crate::token_endpoint::public_key_of(pem).map(|(key, _)| key)
}
