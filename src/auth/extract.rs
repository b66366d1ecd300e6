//! Token sources: the one credential of a request across `Authorization`, a configured cookie and a query
//! parameter, read as leniently as the most lenient upstream would read it.

use http::HeaderMap;

use super::{invalid, AuthError, FailReason};

/// Where a route accepts tokens besides `Authorization: Bearer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSources {
    /// A cookie holding the token.
    pub cookie: Option<String>,
    /// A query parameter holding the token (opt-in per route; removed before forwarding).
    pub query: Option<String>,
}

/// RFC 6750 §2.3's name for the query parameter, also read as a cookie name by some frameworks. An upstream may
/// take a token from there even where the route does not: so it counts as a credential whether or not the route
/// accepts it, and never reaches the upstream unverified.
pub const DEFAULT_TOKEN_NAME: &str = "access_token";

impl TokenSources {
    /// The cookie names that may carry a token for an upstream: the route's, and the default name.
    pub fn cookie_names(&self) -> impl Iterator<Item = &str> {
        self.cookie.as_deref().into_iter().chain((self.cookie.as_deref() != Some(DEFAULT_TOKEN_NAME)).then_some(DEFAULT_TOKEN_NAME))
    }

    /// The query parameter names that may carry a token for an upstream: the route's, and the default name.
    pub fn query_names(&self) -> impl Iterator<Item = &str> {
        self.query.as_deref().into_iter().chain((self.query.as_deref() != Some(DEFAULT_TOKEN_NAME)).then_some(DEFAULT_TOKEN_NAME))
    }
}

/// Where the verified token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    Header,
    Cookie,
    Query,
}

/// Finds the one credential across the configured sources, and where it came from. Each source is read as
/// leniently as the most lenient upstream would read it (a cookie name with spaces around it, a query name in
/// another case or after a `;`), so nothing an upstream could take for a token goes unverified. A token under the
/// default name (`access_token`) where the route does not accept it still counts: beside another credential it
/// makes two (RFC 6750 §2: one method only), which is a 400.
pub fn extract_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    sources: &TokenSources,
) -> Result<Option<(std::borrow::Cow<'a, str>, TokenSource)>, AuthError> {
    const TWO: AuthError = AuthError::InvalidRequest("more than one credential (header, cookie or query)");
    let mut found: Option<(std::borrow::Cow<'a, str>, TokenSource)> =
        extract_bearer(headers)?.map(|t| (std::borrow::Cow::Borrowed(t), TokenSource::Header));
    let mut add = |t: std::borrow::Cow<'a, str>, source| {
        if found.is_some() {
            return Err(TWO);
        }
        found = Some((t, source));
        Ok(())
    };
    if let Some(name) = &sources.cookie {
        let mut values = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.split_once('='))
            .filter(|(k, _)| k.trim_matches(is_space).eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim_matches(is_space));
        if let Some(v) = values.next() {
            if values.next().is_some() {
                return Err(AuthError::InvalidRequest("the token cookie appears more than once"));
            }
            add(std::borrow::Cow::Borrowed(v), TokenSource::Cookie)?;
        }
    }
    if let (Some(name), Some(q)) = (&sources.query, query) {
        let mut values = query_params(q).filter(|(k, _)| names_token(k, name)).map(|(_, v)| v.into_owned());
        if let Some(v) = values.next() {
            if values.next().is_some() {
                return Err(AuthError::InvalidRequest("the token parameter appears more than once"));
            }
            add(std::borrow::Cow::Owned(v), TokenSource::Query)?;
        }
    }
    if found.is_some()
        && (sources.cookie.is_none() && has_cookie(headers, DEFAULT_TOKEN_NAME)
            || sources.query.is_none() && query.is_some_and(|q| has_param(q, DEFAULT_TOKEN_NAME)))
    {
        return Err(TWO);
    }
    match found {
        Some((t, _)) if t.is_empty() => Err(invalid(FailReason::Malformed, "empty token")),
        other => Ok(other),
    }
}

/// Whether a cookie of this name (read as leniently as [`extract_token`] reads one) is among the Cookie fields.
pub fn has_cookie(headers: &HeaderMap, name: &str) -> bool {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).any(|c| cookie_named(c, name))
}

/// Whether one `name=value` pair of a Cookie field is the cookie `name` (spaces around the name aside, any case).
pub fn cookie_named(pair: &str, name: &str) -> bool {
    pair.split_once('=').is_some_and(|(k, _)| k.trim_matches(is_space).eq_ignore_ascii_case(name))
}

/// Whether the query holds the token parameter `name` in any spelling `names_token` accepts.
pub fn has_param(query: &str, name: &str) -> bool {
    query_params(query).any(|(k, _)| names_token(&k, name))
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A query's parameters, split at `&` and at `;` (which older servers and frameworks also take as a separator).
fn query_params(q: &str) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    q.split(['&', ';']).filter_map(|kv| form_urlencoded::parse(kv.as_bytes()).next())
}

/// Removes the token parameter from a query string (before forwarding and logging): every `&`-separated part
/// that names it in any spelling `names_token` accepts, also after a `;`.
pub fn strip_query_token(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query.split('&').filter(|part| !query_params(part).any(|(k, _)| names_token(&k, name))).collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Whether a decoded query parameter name is the token parameter `name` as some framework reads it: case aside,
/// PHP reads `.`, a space and an unclosed `[` as `_`, drops leading spaces and ends a name at NUL; PHP, Rack and
/// qs read `name[]` and `name[x]` as `name`. Every such spelling is the token: verified (a second one is a 400)
/// and removed before forwarding. Either reading of a `[` counts (stricter, never looser).
fn names_token(key: &str, name: &str) -> bool {
    let key = key.split('\0').next().unwrap_or_default().trim_start_matches(' ');
    let fold = |b: u8| if matches!(b, b'.' | b' ' | b'[') { b'_' } else { b.to_ascii_lowercase() };
    let same = |k: &str| {
        let k = k.trim_end_matches(']');
        k.len() == name.len() && k.bytes().zip(name.bytes()).all(|(a, b)| fold(a) == fold(b))
    };
    same(key) || key.split_once('[').is_some_and(|(k, _)| same(k))
}

/// Finds the one bearer credential of a request. Two `Authorization` headers are a 400; a scheme other than
/// Bearer counts as no token. A tab after the scheme is taken as a space (lenient servers do), so
/// `Bearer<TAB>token` is verified, not ignored.
pub fn extract_bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::InvalidRequest("more than one Authorization header"));
    }
    let value = value.to_str().map_err(|_| invalid(FailReason::Malformed, "Authorization header is not visible ASCII"))?;
    let (scheme, rest) = value.split_once(is_space).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_matches(is_space);
    if token.is_empty() {
        return Err(invalid(FailReason::Malformed, "Bearer with no token"));
    }
    // Bytes, not chars: a token is hundreds of bytes, and this runs on every request.
    if token.bytes().any(|b| b == b' ' || b == b'\t') {
        return Err(AuthError::InvalidRequest("more than one credential in Authorization"));
    }
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_extraction() {
        let mut h = HeaderMap::new();
        assert!(matches!(extract_bearer(&h), Ok(None)));
        h.insert("authorization", "bEaReR abc".parse().unwrap());
        assert_eq!(extract_bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert!(extract_bearer(&h).is_err());
        h.insert("authorization", "Bearer\tabc\t".parse().unwrap());
        assert_eq!(extract_bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Bearer abc\tdef".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Err(AuthError::InvalidRequest(_))));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Ok(None)));
        h.append("authorization", "Bearer x".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Err(AuthError::InvalidRequest(_))));
    }
}
