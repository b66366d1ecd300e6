//! Every way a request can fail, mapped to its HTTP answer in exactly one place.
//!
//! Bodies are short JSON codes; the cause (with its source chain) goes to the log with the request id, never to
//! the client. `status()` is an exhaustive match so a new variant cannot silently become a 500.

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::auth::authz::AuthzError;
use crate::auth::AuthError;
use crate::body::Body;
use crate::edge::client_cert::CertError;
use crate::edge::forward_auth::DecisionError;
use crate::router::RouteError;
use crate::token_endpoint::TokenError;
use crate::upstream::ProxyError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("routing: {0}")]
    Route(#[from] RouteError),
    #[error("authentication: {0}")]
    Auth(#[from] AuthError),
    #[error("authorization: {0}")]
    Authz(#[from] AuthzError),
    #[error("rate limited on {key}")]
    RateLimited { key: &'static str, retry_after_secs: u64, limit: u32 },
    #[error("declared body of {0} bytes exceeds max_body_bytes")]
    BodyTooLarge(u64),
    #[error("forwarding: {0}")]
    Proxy(#[from] ProxyError),
    #[error("token endpoint: {0}")]
    Token(#[from] TokenError),
    #[error("forward-auth decision: {0}")]
    Decision(#[from] DecisionError),
    #[error("client certificate: {0}")]
    ClientCert(#[from] CertError),
    /// A shared limit with `on_store_error = "deny"` while its store is down.
    #[error("the rate-limit store is down and the limit denies without it")]
    LimitStoreDown,
}

impl GatewayError {
    /// Returns the status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::Route(e) => match e {
                RouteError::NotAbsolutePath
                | RouteError::BadEscape
                | RouteError::ForbiddenByte
                | RouteError::NotUtf8
                | RouteError::DoubleEncoded
                | RouteError::LowercaseMethod(_)
                | RouteError::BadHost(_)
                | RouteError::BadScheme => StatusCode::BAD_REQUEST,
                RouteError::NotFound => StatusCode::NOT_FOUND,
                RouteError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
                RouteError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            },
            GatewayError::Auth(e) => match e {
                AuthError::Missing | AuthError::InvalidToken { .. } => StatusCode::UNAUTHORIZED,
                AuthError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
                AuthError::KeysUnavailable(_) | AuthError::IntrospectionUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
            GatewayError::Authz(e) => match e {
                // A token from an issuer the route does not accept is not a credential for it (RFC 6750 §3.1).
                AuthzError::Issuer(_) | AuthzError::Anonymous => StatusCode::UNAUTHORIZED,
                AuthzError::Roles | AuthzError::Scopes { .. } | AuthzError::Claims(_) => StatusCode::FORBIDDEN,
            },
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::LimitStoreDown => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::Proxy(e) => match e {
                ProxyError::Connect { .. } | ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade | ProxyError::BadStatus { .. } => {
                    StatusCode::BAD_GATEWAY
                }
                ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
                ProxyError::ClientTimeout(_) => StatusCode::REQUEST_TIMEOUT,
                ProxyError::Uri(_) => StatusCode::INTERNAL_SERVER_ERROR,
                ProxyError::Saturated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            GatewayError::Token(e) => match e {
                TokenError::InvalidRequest(_)
                | TokenError::UnsupportedGrantType
                | TokenError::InvalidGrant
                | TokenError::InvalidScope
                | TokenError::UnauthorizedClient => StatusCode::BAD_REQUEST,
                TokenError::InvalidClient => StatusCode::UNAUTHORIZED,
                TokenError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
                TokenError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
                TokenError::Busy | TokenError::StoreDown(_) => StatusCode::SERVICE_UNAVAILABLE,
                TokenError::Signing(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            GatewayError::Decision(e) => match e {
                DecisionError::Untrusted(_) => StatusCode::FORBIDDEN,
                DecisionError::Malformed(_) => StatusCode::BAD_REQUEST,
            },
            GatewayError::ClientCert(e) => match e {
                CertError::Missing | CertError::Subject | CertError::San => StatusCode::FORBIDDEN,
                // About the token: it is not a credential on this connection (RFC 8705 §3).
                CertError::Binding => StatusCode::UNAUTHORIZED,
            },
        }
    }

    /// Why the request was refused, for the access log: the `reason` label of `portcullis_auth_failures_total`, the
    /// `rule` of `portcullis_authz_denied_total`, the `key` of `portcullis_rate_limited_total`, or a fixed name for
    /// the rest. Never anything the client sent.
    pub fn reason(&self) -> &'static str {
        match self {
            GatewayError::Auth(e) => e.reason(),
            GatewayError::Authz(AuthzError::Issuer(_)) => "issuer",
            GatewayError::Authz(AuthzError::Anonymous) => "missing",
            GatewayError::Authz(e) => e.rule(),
            GatewayError::RateLimited { key, .. } => key,
            GatewayError::LimitStoreDown => "rate_limit_store_down",
            GatewayError::Route(e) => match e {
                RouteError::NotAbsolutePath => "bad_target",
                RouteError::BadEscape => "bad_escape",
                RouteError::ForbiddenByte => "forbidden_byte",
                RouteError::NotUtf8 => "not_utf8",
                RouteError::DoubleEncoded => "double_encoded",
                RouteError::NotFound => "no_route",
                RouteError::MethodNotAllowed { .. } => "method_not_allowed",
                RouteError::BadHost(_) => "bad_host",
                RouteError::BadScheme => "bad_scheme",
                RouteError::NotImplemented(_) => "method_not_proxied",
                RouteError::LowercaseMethod(_) => "lowercase_method",
            },
            GatewayError::BodyTooLarge(_) | GatewayError::Proxy(ProxyError::BodyTooLarge) => "body_too_large",
            GatewayError::Proxy(e) => match e {
                ProxyError::Connect { .. } => "upstream_connect",
                ProxyError::Timeout { .. } => "upstream_timeout",
                ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade | ProxyError::BadStatus { .. } => "upstream_reset",
                ProxyError::Saturated { .. } => "upstream_saturated",
                ProxyError::BodyTooLarge => "body_too_large",
                ProxyError::ClientBody(_) => "client_body",
                ProxyError::ClientTimeout(_) => "client_timeout",
                ProxyError::Uri(_) => "upstream_uri",
            },
            GatewayError::Token(e) => e.code(),
            GatewayError::Decision(DecisionError::Untrusted(_)) => "untrusted_decision_client",
            GatewayError::Decision(DecisionError::Malformed(_)) => "bad_original_request",
            GatewayError::ClientCert(CertError::Missing) => "client_cert_missing",
            GatewayError::ClientCert(CertError::Subject) => "client_cert_subject",
            GatewayError::ClientCert(CertError::San) => "client_cert_san",
            GatewayError::ClientCert(CertError::Binding) => "cert_binding",
        }
    }

    /// Returns the JSON error code and, for 401/403, the `WWW-Authenticate` challenge.
    fn code_and_challenge(&self) -> (&'static str, Option<String>) {
        const REALM: &str = "Bearer realm=\"portcullis\"";
        match self {
            GatewayError::Auth(AuthError::Missing) | GatewayError::Authz(AuthzError::Anonymous) => {
                ("unauthorized", Some(REALM.to_string()))
            }
            GatewayError::Auth(AuthError::InvalidRequest(_)) => ("invalid_request", Some(format!("{REALM}, error=\"invalid_request\""))),
            GatewayError::Auth(AuthError::KeysUnavailable(_) | AuthError::IntrospectionUnavailable(_)) => ("temporarily_unavailable", None),
            GatewayError::Auth(AuthError::InvalidToken { .. }) | GatewayError::Authz(AuthzError::Issuer(_)) => {
                ("invalid_token", Some(format!("{REALM}, error=\"invalid_token\"")))
            }
            GatewayError::Authz(AuthzError::Scopes { needed }) => {
                ("insufficient_scope", Some(format!("{REALM}, error=\"insufficient_scope\", scope=\"{needed}\"")))
            }
            GatewayError::Authz(AuthzError::Roles | AuthzError::Claims(_)) => ("forbidden", None),
            GatewayError::Route(RouteError::NotFound) => ("not_found", None),
            GatewayError::Route(RouteError::MethodNotAllowed { .. }) => ("method_not_allowed", None),
            GatewayError::Route(RouteError::NotImplemented(_)) => ("not_implemented", None),
            GatewayError::Route(_) => ("bad_request", None),
            GatewayError::RateLimited { .. } => ("rate_limited", None),
            GatewayError::LimitStoreDown => ("temporarily_unavailable", None),
            GatewayError::BodyTooLarge(_) | GatewayError::Proxy(ProxyError::BodyTooLarge) => ("payload_too_large", None),
            GatewayError::Proxy(ProxyError::Timeout { .. }) => ("gateway_timeout", None),
            GatewayError::Proxy(ProxyError::ClientBody(_)) => ("bad_request", None),
            GatewayError::Proxy(ProxyError::ClientTimeout(_)) => ("request_timeout", None),
            GatewayError::Proxy(
                ProxyError::Connect { .. } | ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade | ProxyError::BadStatus { .. },
            ) => ("bad_gateway", None),
            GatewayError::Proxy(ProxyError::Uri(_)) => ("internal_error", None),
            GatewayError::Proxy(ProxyError::Saturated { .. }) => ("upstream_busy", None),
            GatewayError::Token(TokenError::InvalidClient) => ("invalid_client", Some("Basic realm=\"portcullis\"".to_string())),
            GatewayError::Token(e) => (e.code(), None),
            GatewayError::Decision(DecisionError::Untrusted(_)) => ("forbidden", None),
            GatewayError::Decision(DecisionError::Malformed(_)) => ("bad_request", None),
            GatewayError::ClientCert(CertError::Binding) => ("invalid_token", Some(format!("{REALM}, error=\"invalid_token\""))),
            GatewayError::ClientCert(_) => ("forbidden", None),
        }
    }

    /// Builds the client's answer. `close` adds `Connection: close` (the request body was not read).
    pub fn to_response(&self, close: bool) -> Response<Body> {
        let status = self.status();
        let (code, challenge) = self.code_and_challenge();
        let mut rsp = json_response(status, code);
        let h = rsp.headers_mut();
        if let Some(c) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            h.insert(header::WWW_AUTHENTICATE, c);
        }
        match self {
            GatewayError::Route(RouteError::MethodNotAllowed { allow }) => {
                h.insert(header::ALLOW, allow.clone());
            }
            GatewayError::Token(TokenError::MethodNotAllowed { allow }) => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            GatewayError::Token(TokenError::Busy | TokenError::StoreDown(_)) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::Proxy(ProxyError::Saturated { .. }) | GatewayError::LimitStoreDown => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // The refresh loop retries a keyless issuer within seconds.
            GatewayError::Auth(AuthError::KeysUnavailable(_) | AuthError::IntrospectionUnavailable(_)) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            GatewayError::Token(TokenError::TooManyAttempts { retry_after_secs }) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            GatewayError::RateLimited { retry_after_secs, limit, .. } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                h.insert("ratelimit-limit", HeaderValue::from(*limit));
                h.insert("ratelimit-remaining", HeaderValue::from_static("0"));
                h.insert("ratelimit-reset", HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        if let GatewayError::Token(_) = self {
            // RFC 6749 §5.1: token answers are never cached.
            h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        }
        if close {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        rsp
    }
}

impl GatewayError {
    /// The answer to a gRPC client: HTTP 200 with the status in `grpc-status` and `grpc-message` (a
    /// trailers-only response, which gRPC clients read as the call's status), and the same `WWW-Authenticate`
    /// and `Retry-After` the HTTP answer would carry.
    pub fn to_grpc_response(&self, close: bool) -> Response<Body> {
        let http = self.to_response(close);
        let status = http.status();
        let (code, _) = self.code_and_challenge();
        let mut rsp = Response::new(Body::empty());
        let h = rsp.headers_mut();
        for name in [header::WWW_AUTHENTICATE, header::RETRY_AFTER, header::ALLOW, header::CONNECTION] {
            if let Some(v) = http.headers().get(&name) {
                h.insert(name, v.clone());
            }
        }
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from(u16::from(crate::upstream::grpc::code_for(status))));
        // The JSON code: ASCII letters and underscores, so nothing to percent-encode.
        if let Ok(v) = HeaderValue::from_str(code) {
            h.insert("grpc-message", v);
        }
        rsp
    }
}

/// Builds a short JSON answer `{"error":"<code>"}` that is never cached.
pub fn json_response(status: StatusCode, code: &str) -> Response<Body> {
    let mut rsp = Response::new(Body::full(format!("{{\"error\":\"{code}\"}}")));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::FailReason;

    #[test]
    fn bearer_challenges_follow_rfc6750() {
        let r = GatewayError::Auth(AuthError::Missing).to_response(false);
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"portcullis\"");
        let r = GatewayError::Auth(AuthError::InvalidToken { reason: FailReason::Expired, detail: "x".into() }).to_response(false);
        assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"portcullis\", error=\"invalid_token\"");
        let r = GatewayError::Authz(AuthzError::Scopes { needed: "write:items".into() }).to_response(false);
        assert_eq!(r.status(), 403);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("scope=\"write:items\""));
        let r = GatewayError::RateLimited { key: "ip", retry_after_secs: 2, limit: 5 }.to_response(true);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["connection"], "close");
    }
}
