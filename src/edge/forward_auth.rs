//! Forward-auth decisions: the proxy in front (nginx `auth_request`, Traefik ForwardAuth, Caddy `forward_auth`,
//! Envoy `ext_authz`) asks about a request it holds, and the gateway answers with the same route match,
//! authentication, authorization and rate limit it would apply to a proxied request, without forwarding anything.
//!
//! The original request is read from the fields each proxy sends, and only from a trusted proxy
//! (`trusted_proxies`): from anyone else, those fields would let a client ask about one path and use another.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

/// `[forward_auth]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuthSettings {
    /// The decision endpoint's path on the public listeners. Envoy's `path_prefix` puts the original path after it.
    pub path: String,
}

/// The request a decision is about.
#[derive(Debug, Clone)]
pub struct Original {
    pub method: Method,
    /// The original target: path and query.
    pub uri: Uri,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DecisionError {
    #[error("a decision was asked by {0}, which is not in trusted_proxies")]
    Untrusted(std::net::IpAddr),
    #[error("the original request's {0} is malformed")]
    Malformed(&'static str),
}

static X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
static X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
static X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
static X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");

impl ForwardAuthSettings {
    /// True when `path` (as sent) asks for a decision: the endpoint itself, or under it (Envoy's prefix).
    pub fn serves(&self, path: &str) -> bool {
        path.strip_prefix(self.path.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// The original request of a decision request, from the fields its proxy sends: nginx's `X-Original-URI`
    /// and `X-Original-Method`, then Traefik's and Caddy's `X-Forwarded-Uri` and `X-Forwarded-Method`, then
    /// Envoy's convention (the decision request's own method, and its path after the endpoint's).
    /// On the decisions listener (`[listen] decisions`) every path is a decision, Envoy's without a prefix.
    pub fn original(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Original, DecisionError> {
        let target = headers.get(&X_ORIGINAL_URI).or_else(|| headers.get(&X_FORWARDED_URI));
        let uri = match target {
            Some(v) => parse_target(v)?,
            None => {
                let rest = match self.serves(uri.path()) {
                    true => uri.path().strip_prefix(self.path.as_str()).unwrap_or(""),
                    false => uri.path(),
                };
                let path = if rest.is_empty() { "/" } else { rest };
                let target = match uri.query() {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_string(),
                };
                target.parse::<Uri>().map_err(|_| DecisionError::Malformed("path"))?
            }
        };
        let method = match headers.get(&X_ORIGINAL_METHOD).or_else(|| headers.get(&X_FORWARDED_METHOD)) {
            Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| DecisionError::Malformed("method"))?,
            None => method.clone(),
        };
        Ok(Original { method, uri })
    }
}

/// An origin-form target (`/path?query`): anything else (an absolute URL, `*`, a bare name) is refused.
fn parse_target(v: &HeaderValue) -> Result<Uri, DecisionError> {
    let s = v.to_str().map_err(|_| DecisionError::Malformed("URI"))?;
    if !s.starts_with('/') || s.starts_with("//") {
        return Err(DecisionError::Malformed("URI"));
    }
    let uri: Uri = s.parse().map_err(|_| DecisionError::Malformed("URI"))?;
    match uri.scheme() {
        None => Ok(uri),
        Some(_) => Err(DecisionError::Malformed("URI")),
    }
}

/// The answer that allows a request: 200 with the identity fields the proxy copies to its upstream.
pub fn allowed(identity: &crate::edge::headers_request::IdentitySettings, values: Option<&[Option<HeaderValue>]>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(values) = values {
        for ((name, _), value) in identity.headers.iter().zip(values) {
            if let Some(v) = value {
                h.insert(name.clone(), v.clone());
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ForwardAuthSettings {
        ForwardAuthSettings { path: "/auth".into() }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn each_proxys_fields_give_the_original_request() {
        let s = settings();
        let decision: Uri = "/auth".parse().unwrap();
        let nginx =
            s.original(&Method::GET, &decision, &headers(&[("x-original-uri", "/admin/x?a=1"), ("x-original-method", "DELETE")])).unwrap();
        assert_eq!((nginx.method, nginx.uri.to_string()), (Method::DELETE, "/admin/x?a=1".to_string()));
        let traefik = s.original(&Method::GET, &decision, &headers(&[("x-forwarded-uri", "/r"), ("x-forwarded-method", "POST")])).unwrap();
        assert_eq!((traefik.method, traefik.uri.to_string()), (Method::POST, "/r".to_string()));
        let envoy = s.original(&Method::PUT, &"/auth/orders/7?x=y".parse().unwrap(), &HeaderMap::new()).unwrap();
        assert_eq!((envoy.method, envoy.uri.to_string()), (Method::PUT, "/orders/7?x=y".to_string()));
        let bare = s.original(&Method::GET, &decision, &HeaderMap::new()).unwrap();
        assert_eq!(bare.uri.to_string(), "/");
    }

    #[test]
    fn malformed_originals_are_refused() {
        let s = settings();
        let decision: Uri = "/auth".parse().unwrap();
        for bad in ["http://evil/x", "//evil/x", "x", "*"] {
            let h = headers(&[("x-original-uri", bad)]);
            assert!(s.original(&Method::GET, &decision, &h).is_err(), "{bad}");
        }
        let h = headers(&[("x-original-method", "G E T")]);
        assert!(s.original(&Method::GET, &decision, &h).is_err());
    }

    #[test]
    fn the_endpoint_serves_its_path_and_below_only() {
        let s = settings();
        assert!(s.serves("/auth") && s.serves("/auth/x"));
        assert!(!s.serves("/authz") && !s.serves("/") && !s.serves("/x/auth"));
    }
}
