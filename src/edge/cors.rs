//! CORS: preflights answered by the gateway (no token, no upstream), and allow headers on actual responses.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

/// A checked CORS policy (global `[cors]` or a route's own).
#[derive(Debug, Clone)]
pub struct CorsPolicy {
    /// Exact origins; `None` means any (`"*"`, only allowed without credentials).
    pub origins: Option<Vec<HeaderValue>>,
    pub methods: Vec<Method>,
    pub methods_value: HeaderValue,
    pub headers_value: Option<HeaderValue>,
    pub expose_value: Option<HeaderValue>,
    pub credentials: bool,
    pub max_age: HeaderValue,
}

impl CorsPolicy {
    fn allows_origin(&self, origin: &HeaderValue) -> bool {
        match &self.origins {
            None => true,
            Some(list) => list.iter().any(|o| o == origin),
        }
    }
}

/// Returns true for a CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ORIGIN) && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The method a preflight asks about.
pub fn requested_method(headers: &HeaderMap) -> Option<Method> {
    headers.get(header::ACCESS_CONTROL_REQUEST_METHOD).and_then(|v| Method::from_bytes(v.as_bytes()).ok())
}

/// Answers a preflight: 204, with the allow headers only for an allowed origin and method.
pub fn preflight(policy: &CorsPolicy, headers: &HeaderMap, method: &Method) -> Response<()> {
    let mut rsp = Response::new(());
    *rsp.status_mut() = StatusCode::NO_CONTENT;
    let h = rsp.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    let Some(origin) = headers.get(header::ORIGIN) else { return rsp };
    if !policy.allows_origin(origin) || !policy.methods.contains(method) {
        return rsp;
    }
    allow_origin(policy, origin, h);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, policy.methods_value.clone());
    if let Some(v) = &policy.headers_value {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, policy.max_age.clone());
    rsp
}

fn allow_origin(policy: &CorsPolicy, origin: &HeaderValue, h: &mut HeaderMap) {
    let value = if policy.origins.is_none() { HeaderValue::from_static("*") } else { origin.clone() };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    if policy.credentials {
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

/// The CORS fields of an answer: the gateway's policy decides them, never the upstream.
const ANSWER_FIELDS: [HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

/// Removes an upstream's own CORS fields from its answer on a route with a policy: the route then lets exactly the
/// origins the policy allows read it.
pub fn remove_upstreams_own(h: &mut HeaderMap) {
    for name in &ANSWER_FIELDS {
        h.remove(name);
    }
}

/// Adds the CORS headers to an actual response for an allowed origin (and `Vary: Origin` always).
pub fn apply(policy: &CorsPolicy, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
    // Once: a preflight answer has it already.
    if !h.get_all(header::VARY).iter().any(|v| v == "Origin") {
        h.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    let Some(origin) = origin else { return };
    if !policy.allows_origin(origin) {
        return;
    }
    allow_origin(policy, origin, h);
    if let Some(v) = &policy.expose_value {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
    }
}
