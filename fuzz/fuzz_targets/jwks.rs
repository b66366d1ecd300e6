//! JWKS and OIDC discovery documents (`auth::jwks`): the keys a JWKS yields (`KeySet::parse_keys`), the
//! `jwks_uri` a discovery document names, and a JWKS answer's `Cache-Control: max-age`.
//!
//! Oracles: nothing panics; every key taken fits the issuer: it is bound to at least one algorithm, only to the
//! issuer's, all of the key's own family, never HMAC (no symmetric key comes from a JWKS), and never a family the
//! document's `kty` does not name; a key listed under a kid is filed under that kid; no more keys than the document
//! lists; a discovery document is taken only when its `issuer` is the configured one and its `jwks_uri` is https
//! (or http to loopback). The first byte picks the issuer's algorithms.
#![no_main]

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const ALGS: [Algorithm; 8] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::HS256,
    Algorithm::RS512,
    Algorithm::PS384,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    if let Ok(text) = std::str::from_utf8(rest) {
        if let Some(age) = portcullis::fuzzing::jwks_max_age(text) {
            assert!(text.contains("max-age="), "{age:?} from {text:?}");
        }
    }
    let Ok(doc) = serde_json::from_slice::<Value>(rest) else { return };
    let issuer = "https://idp.example/realms/x";
    if let Ok(uri) = portcullis::fuzzing::discovered_jwks_uri(&doc, issuer) {
        assert_eq!(doc.get("issuer").and_then(Value::as_str), Some(issuer));
        assert!(portcullis::auth::jwks::allowed_fetch_uri(&uri), "{uri}");
    }
    let algorithms: Vec<Algorithm> = ALGS.iter().enumerate().filter(|(i, _)| pick & (1 << i) != 0).map(|(_, a)| *a).collect();
    let (by_kid, keyless) = portcullis::fuzzing::jwks_keys(&doc, &algorithms);
    let listed = doc.get("keys").and_then(Value::as_array).map_or(0, Vec::len);
    assert!(by_kid.len() + keyless.len() <= listed, "more keys than listed");
    let kinds: Vec<&str> = doc.get("keys").and_then(Value::as_array).into_iter().flatten().filter_map(|k| k.get("kty")?.as_str()).collect();
    for (kid, k) in &by_kid {
        assert_eq!(k.key.kid.as_deref(), Some(kid.as_str()));
    }
    for k in by_kid.values().chain(keyless.iter()) {
        assert!(keyless.iter().all(|k| k.key.kid.is_none()));
        let family = k.key.key.family();
        assert_ne!(family, AlgorithmFamily::Hmac, "a symmetric key was taken from a JWKS");
        assert!(!k.key.algorithms.is_empty(), "a key bound to no algorithm");
        for a in &k.key.algorithms {
            assert!(algorithms.contains(a), "{a:?} is not the issuer's {algorithms:?}");
            assert_eq!(a.family(), family, "{a:?} does not fit a {family:?} key");
        }
        let kty = match family {
            AlgorithmFamily::Rsa => "RSA",
            AlgorithmFamily::Ec => "EC",
            AlgorithmFamily::Ed => "OKP",
            AlgorithmFamily::Hmac => "oct",
        };
        assert!(kinds.contains(&kty), "a {family:?} key from a document listing {kinds:?}");
    }
});
