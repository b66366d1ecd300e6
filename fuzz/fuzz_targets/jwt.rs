//! The JWT path: the strict JSON reading of header and payload (`auth::verify::decode_json`), and
//! `Authenticator::verify` for an HS256 issuer built from a config (a throwaway secret made up here).
//!
//! Oracles: the strict reading agrees with serde_json's own `Value` (a second reading) on every segment without
//! a repeated member name, and refuses every segment with one at any depth (found by a third, order-keeping
//! reading); verify accepts a token only if its signature is exactly (canonical base64url) the HMAC of its first two
//! segments under the issuer's secret, its header says HS256, and its payload's iss, sub and exp are what the
//! issuer requires. Inputs: raw token text; header and payload JSON signed here with the key; and byte edits of a
//! valid token.
#![no_main]

use std::future::Future;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use libfuzzer_sys::fuzz_target;
use portcullis::auth::Authenticator;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

const SECRET: &[u8] = b"fuzz-only hs256 secret, not used anywhere else";
const ISS: &str = "https://fuzz.invalid";
const NOW: u64 = 1_700_000_000;

fn authenticator() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        std::env::set_var("PORTCULLIS_FUZZ_HS256_SECRET", std::str::from_utf8(SECRET).unwrap());
        let text = format!(
            r#"
[listen]
http = "127.0.0.1:0"
[upstreams.api]
url = "http://127.0.0.1:3000"
[[issuers]]
id = "fuzz"
issuer = "{ISS}"
audiences = ["api"]
algorithms = ["HS256"]
secret_env = "PORTCULLIS_FUZZ_HS256_SECRET"
[[routes]]
name = "all"
path = "/*"
upstream = "api"
"#
        );
        let config = portcullis::fuzzing::check_config_text(std::path::Path::new("/nonexistent/gateway.toml"), &text)
            .expect("the fuzz issuer's config");
        let client = portcullis::auth::jwks::fetch_client(None).expect("a fetch client");
        Authenticator::new(&config.issuers, &client, None)
    })
}

/// JSON as written, members in order and repeats kept.
#[derive(Debug)]
enum J {
    Scalar,
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = J;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_bool<E>(self, _: bool) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_u64<E>(self, _: u64) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_str<E>(self, _: &str) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_unit<E>(self) -> Result<J, E> {
                Ok(J::Scalar)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<J, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = s.next_element()? {
                    out.push(v);
                }
                Ok(J::Arr(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<J, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, J>()? {
                    out.push((k, v));
                }
                Ok(J::Obj(out))
            }
        }
        d.deserialize_any(V)
    }
}

fn has_repeat(j: &J) -> bool {
    match j {
        J::Scalar => false,
        J::Arr(a) => a.iter().any(has_repeat),
        J::Obj(o) => o.iter().enumerate().any(|(i, (k, v))| o[..i].iter().any(|(k2, _)| k2 == k) || has_repeat(v)),
    }
}

/// The strict reading against the others; returns the object when it was accepted.
fn check_segment(seg: &str) -> Option<Map<String, Value>> {
    let strict = portcullis::fuzzing::decode_jwt_segment(seg);
    let bytes = URL_SAFE_NO_PAD.decode(seg);
    let Ok(bytes) = bytes else {
        assert!(strict.is_err(), "{seg:?} is not base64url but was read");
        return None;
    };
    let plain = serde_json::from_slice::<Value>(&bytes);
    let kept = serde_json::from_slice::<J>(&bytes);
    match (&strict, plain, kept) {
        (Ok(m), Ok(Value::Object(p)), Ok(k)) => {
            assert!(!has_repeat(&k), "a repeated member name was accepted: {:?}", String::from_utf8_lossy(&bytes));
            assert_eq!(m, &p, "the strict and the plain reading differ");
        }
        (Ok(_), plain, kept) => panic!("accepted {:?}; serde_json: {plain:?} / {kept:?}", String::from_utf8_lossy(&bytes)),
        (Err(_), Ok(Value::Object(_)), Ok(k)) => {
            assert!(has_repeat(&k), "refused without a repeated name: {:?} ({strict:?})", String::from_utf8_lossy(&bytes))
        }
        (Err(_), Ok(Value::Object(_)), Err(e)) => panic!("serde_json reads an object the order-keeping reading does not: {e}"),
        (Err(_), _, _) => {}
    }
    strict.ok()
}

fn verify(token: &str) -> Option<portcullis::auth::Principal> {
    let fut = std::pin::pin!(authenticator().verify(token, NOW));
    let mut fut = fut;
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r.ok(),
        Poll::Pending => panic!("verify waited on something with no JWKS configured"),
    }
}

fn hmac(message: &[u8]) -> Vec<u8> {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET);
    aws_lc_rs::hmac::sign(&key, message).as_ref().to_vec()
}

fn check_token(token: &str) {
    let parts: Vec<&str> = token.split('.').collect();
    let segments: Vec<Option<Map<String, Value>>> = parts.iter().take(2).map(|s| check_segment(s)).collect();
    let Some(p) = verify(token) else { return };
    assert_eq!(parts.len(), 3, "accepted {token:?}");
    let message_len = parts[0].len() + 1 + parts[1].len();
    let mac = hmac(&token.as_bytes()[..message_len]);
    assert_eq!(parts[2], URL_SAFE_NO_PAD.encode(&mac), "accepted a signature that is not the key's (or not in canonical form)");
    let header = segments[0].as_ref().expect("an accepted header reads strictly");
    let claims = segments[1].as_ref().expect("accepted claims read strictly");
    assert_eq!(header.get("alg").and_then(Value::as_str), Some("HS256"));
    assert_eq!(claims.get("iss").and_then(Value::as_str), Some(ISS));
    assert_eq!(claims.get("sub").and_then(Value::as_str), Some(p.subject.as_str()));
    assert!(!p.subject.is_empty());
    let exp = claims.get("exp").and_then(Value::as_f64).expect("an exp");
    // The issuer's default leeway (30 s) forgives clock skew, so "expired" is past exp + leeway.
    assert!(exp + 30.0 > NOW as f64, "accepted a token expired beyond the leeway");
}

fn sign(header: &[u8], payload: &[u8]) -> String {
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let sig = URL_SAFE_NO_PAD.encode(hmac(message.as_bytes()));
    format!("{message}.{sig}")
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => {
            if let Ok(token) = std::str::from_utf8(rest) {
                check_token(token);
            }
        }
        1 => {
            let (header, payload) = match rest.iter().position(|&b| b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
            };
            check_token(&sign(header, payload));
        }
        _ => {
            let payload = format!(r#"{{"iss":"{ISS}","sub":"alice","aud":"api","exp":{},"iat":{NOW},"roles":["admin"]}}"#, NOW + 600);
            let mut token = sign(br#"{"alg":"HS256","typ":"JWT"}"#, payload.as_bytes()).into_bytes();
            // Edits: (position, byte) pairs; a position past the end appends.
            for e in rest.chunks_exact(3) {
                let at = usize::from(u16::from_le_bytes([e[0], e[1]]));
                match token.get_mut(at) {
                    Some(b) => *b = e[2],
                    None => token.push(e[2]),
                }
            }
            if let Ok(token) = std::str::from_utf8(&token) {
                check_token(token);
            }
        }
    }
});
