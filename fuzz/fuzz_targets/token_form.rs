//! The token endpoint's request parsers (`token_endpoint`): the form (`parse_form`), HTTP Basic client
//! credentials (`parse_basic`) and the `scope` parameter (`requested_scopes`).
//!
//! Oracles: against `form_urlencoded::parse` on the same bytes (RFC 6749 §3.1, §3.2): a form is refused exactly
//! when a name with a non-empty value repeats, and otherwise holds exactly the pairs with a non-empty value;
//! what it holds is bounded by the body (at most 3 bytes per byte, the replacement character for invalid UTF-8);
//! Basic credentials are taken only from `Basic <base64 of id:secret>`, and re-encoding them reads back the same;
//! scopes are distinct, non-empty, printable ASCII without `"` or `\`, in the order given.
#![no_main]

use std::collections::HashMap;

use base64::Engine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let ours = portcullis::fuzzing::parse_token_form(data);
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(data).filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    let mut reference = HashMap::new();
    let mut repeated = false;
    for (k, v) in &pairs {
        repeated |= reference.insert(k.clone(), v.clone()).is_some();
    }
    match ours {
        Ok(map) => {
            assert!(!repeated, "a repeated parameter was accepted");
            assert_eq!(map, reference);
            let size: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
            assert!(size <= 3 * data.len());
        }
        Err(e) => assert!(repeated, "refused without a repeat: {e}"),
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(v) = http::HeaderValue::from_str(text) {
            if let Ok((id, secret)) = portcullis::fuzzing::parse_token_basic(&v) {
                assert!(text.len() > 6 && text[..6].eq_ignore_ascii_case("basic "), "{text:?}");
                // Encoded back as RFC 6749 §2.3.1 says, then read again: the same two parts.
                let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let again = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(&id), enc(&secret))));
                let again = portcullis::fuzzing::parse_token_basic(&http::HeaderValue::from_str(&again).unwrap());
                assert_eq!(again, Ok((id, secret)));
            }
        }
        if let Ok(scopes) = portcullis::fuzzing::requested_scopes(text) {
            for (i, s) in scopes.iter().enumerate() {
                assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'), "{s:?}");
                assert!(!scopes[..i].contains(s), "{s:?} twice");
            }
            let given: Vec<&str> = text.split(' ').filter(|s| !s.is_empty()).collect();
            let mut firsts = given.clone();
            let mut seen = std::collections::HashSet::new();
            firsts.retain(|s| seen.insert(*s));
            assert_eq!(scopes, firsts);
        }
    }
});
