//! Keys and tokens, generated here with real crypto; their JWKs; and a ready-made test issuer.

use base64::Engine;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::{spawn_gateway_with_files, TestGateway};

/// A key pair for signing test tokens, with its public half as PEM.
pub struct TestKey {
    pub alg: Algorithm,
    pub encoding: jsonwebtoken::EncodingKey,
    pub public_pem: String,
    pub private_pem: String,
}

/// `der` in PEM armour under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Generates a key for `alg`: RS*/PS* (RSA 2048), ES256 (P-256), ES384 (P-384), EdDSA (Ed25519).
pub fn test_key(alg: Algorithm) -> TestKey {
    use aws_lc_rs::encoding::AsDer;
    use Algorithm::*;
    let (private_pem, public_pem) = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let pkcs8: aws_lc_rs::encoding::Pkcs8V1Der = kp.as_der().unwrap();
            let spki: aws_lc_rs::encoding::PublicKeyX509Der = aws_lc_rs::signature::KeyPair::public_key(&kp).as_der().unwrap();
            (pem("PRIVATE KEY", pkcs8.as_ref()), pem("PUBLIC KEY", spki.as_ref()))
        }
        ES256 | ES384 | EdDSA => {
            let a = match alg {
                ES256 => &rcgen::PKCS_ECDSA_P256_SHA256,
                ES384 => &rcgen::PKCS_ECDSA_P384_SHA384,
                _ => &rcgen::PKCS_ED25519,
            };
            let kp = rcgen::KeyPair::generate_for(a).unwrap();
            (kp.serialize_pem(), kp.public_key_pem())
        }
        HS256 | HS384 | HS512 => panic!("use hmac_key for HMAC"),
    };
    let encoding = match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
        ES256 | ES384 => jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
    };
    TestKey { alg, encoding, public_pem, private_pem }
}

/// An HMAC key from a secret.
pub fn hmac_key(alg: Algorithm, secret: &[u8]) -> TestKey {
    TestKey { alg, encoding: jsonwebtoken::EncodingKey::from_secret(secret), public_pem: String::new(), private_pem: String::new() }
}

/// The time now, in seconds since the epoch (as `iat`, `nbf` and `exp` count).
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Standard claims for `iss`/`sub`, valid for 10 minutes, with the given extra claims merged in.
pub fn claims(iss: &str, sub: &str, extra: Value) -> Value {
    let mut c = json!({"iss": iss, "sub": sub, "aud": "api", "iat": now(), "nbf": now(), "exp": now() + 600});
    if let (Some(m), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            m.insert(k.clone(), v.clone());
        }
    }
    c
}

/// Signs `claims` with `key` (header `typ: JWT`, optional `kid`).
pub fn mint_token(key: &TestKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(key.alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// URL-safe base64 without padding, as JOSE writes it.
pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Signs a header and payload given as raw JSON text (so either may repeat a member name, or take a shape the
/// encoder refuses).
pub fn jws(key: &TestKey, header: &str, payload: &str) -> String {
    let msg = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key.encoding, key.alg).unwrap();
    format!("{msg}.{sig}")
}

/// The raw 32-byte Ed25519 public key inside an SPKI PEM.
pub fn ed25519_raw_public(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body).unwrap();
    der[der.len() - 32..].to_vec()
}

/// A public JWK for `key` with `kid` and `"use": "sig"`.
pub fn jwk(key: &TestKey, kid: &str) -> Value {
    let mut v = match key.alg {
        Algorithm::EdDSA => json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "x": b64(&ed25519_raw_public(&key.public_pem)),
        }),
        alg => serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(&key.encoding, alg).unwrap()).unwrap(),
    };
    v["kid"] = kid.into();
    v["use"] = "sig".into();
    v
}

/// A JWKS of these keys, each under its kid.
pub fn jwks(keys: &[(&TestKey, &str)]) -> Value {
    json!({ "keys": keys.iter().map(|(k, kid)| jwk(k, kid)).collect::<Vec<_>>() })
}

// ------------------------------------------------------------------------------------------------------------
// A test issuer.

/// An issuer with a static Ed25519 key: its config table, the key file to write beside it, and its tokens.
pub struct TestIssuer {
    pub key: TestKey,
}

impl TestIssuer {
    /// The issuer's name (the `iss` of its tokens).
    pub const ISS: &str = "https://issuer.test";

    /// The file its public key is read from, beside the config.
    const KEY_FILE: &str = "issuer.pub.pem";

    pub fn new() -> TestIssuer {
        TestIssuer { key: test_key(Algorithm::EdDSA) }
    }

    /// The `[[issuers]]` table, id `test`, audience `api`.
    pub fn config(&self) -> String {
        format!(
            "[[issuers]]\nid = \"test\"\nissuer = \"{}\"\naudiences = [\"api\"]\nalgorithms = [\"EdDSA\"]\npublic_keys = [\"{}\"]\n",
            Self::ISS,
            Self::KEY_FILE
        )
    }

    /// A token for `sub` with these roles.
    pub fn token(&self, sub: &str, roles: &[&str]) -> String {
        mint_token(&self.key, None, &claims(Self::ISS, sub, json!({ "roles": roles })))
    }

    /// Starts a gateway from `cfg` with the issuer's key file beside it.
    pub async fn gateway(&self, cfg: &str) -> TestGateway {
        self.gateway_with(cfg, &[]).await
    }

    /// [`TestIssuer::gateway`] with more files beside the config.
    pub async fn gateway_with(&self, cfg: &str, more: &[(&str, &[u8])]) -> TestGateway {
        let mut files = vec![(Self::KEY_FILE, self.key.public_pem.as_bytes())];
        files.extend_from_slice(more);
        spawn_gateway_with_files(cfg, &files).await
    }
}
