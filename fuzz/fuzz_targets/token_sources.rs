//! Token sources (`auth::extract`): `extract_token` over Authorization, a cookie and a query parameter,
//! `strip_query_token` and `extract_bearer`.
//!
//! Oracles: after `strip_query_token(q, name)`, the query left names the token parameter in no spelling
//! `extract_token` reads (so it is neither forwarded nor logged), it keeps the other parts as they were, in order,
//! and each part removed does name it; a token found in the Authorization field is `extract_bearer`'s, one
//! found in the query is the decoded value of one of its parameters; a found token is never empty; nothing
//! panics. Input: four lines (Authorization value, Cookie value, query, the configured parameter/cookie name).
#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::auth::{extract_bearer, extract_token, strip_query_token, TokenSources};

fn from_query(q: &str, name: &str) -> Result<Option<String>, ()> {
    let sources = TokenSources { cookie: None, query: Some(name.to_string()) };
    match extract_token(&HeaderMap::new(), Some(q), &sources) {
        Ok(found) => Ok(found.map(|(t, _)| t.into_owned())),
        Err(_) => Err(()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.splitn(4, '\n');
    let (auth, cookie, query, name) = (lines.next().unwrap_or(""), lines.next(), lines.next(), lines.next().unwrap_or("access_token"));
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(auth) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        headers.insert(http::header::COOKIE, v);
    }
    let sources = TokenSources { cookie: Some(name.to_string()), query: Some(name.to_string()) };
    if let Ok(Some((token, source))) = extract_token(&headers, query, &sources) {
        assert!(!token.is_empty());
        if source == portcullis::auth::TokenSource::Header {
            assert_eq!(extract_bearer(&headers).ok().flatten(), Some(&*token));
        }
    }
    let Some(q) = query else { return };
    if let Ok(Some(t)) = from_query(q, name) {
        let values: Vec<String> =
            q.split(['&', ';']).flat_map(|kv| form_urlencoded::parse(kv.as_bytes()).map(|(_, v)| v.into_owned())).collect();
        assert!(values.contains(&t), "token {t:?} is no parameter's value in {q:?}");
    }
    let stripped = strip_query_token(q, name);
    if let Some(s) = &stripped {
        assert_eq!(from_query(s, name), Ok(None), "the token parameter {name:?} survives stripping {q:?} as {s:?}");
        assert!(!portcullis::auth::extract::has_param(s, name), "has_param still finds {name:?} in {s:?}");
    }
    let kept: Vec<&str> = stripped.as_deref().map(|s| s.split('&').collect()).unwrap_or_default();
    let mut rest = kept.iter().peekable();
    for part in q.split('&') {
        if rest.peek() == Some(&&part) {
            rest.next();
        } else {
            // A removed part names the token on its own (or is one of two that do).
            assert!(matches!(from_query(part, name), Ok(Some(_)) | Err(_)), "{part:?} of {q:?} was removed but does not name {name:?}");
        }
    }
    assert!(rest.next().is_none(), "stripping {q:?} made up parts: {stripped:?}");
});
