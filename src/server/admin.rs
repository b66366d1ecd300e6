//! The admin listener: `/healthz`, `/readyz` and `/metrics`. Never served on the public listeners.

use http::{Method, Request, Response, StatusCode};

use crate::body::Body;
use crate::error::json_response;
use crate::server::Shared;

/// Answers one admin request.
pub fn handle<B>(shared: &Shared, req: Request<B>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut rsp = json_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        rsp.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return rsp;
    }
    // Health probes stay open (load balancers and kubelets probe without credentials); metrics are protected.
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz");
    if let Some(want) = shared.gateway.load().config.admin_token.clone().filter(|_| !probe) {
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let got = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim_start_matches(' '));
        // Constant-time comparison: the admin token must not leak byte by byte through timing.
        let ok = got.is_some_and(|g| {
            g.len() == want.len() && aws_lc_rs::constant_time::verify_slices_are_equal(g.as_bytes(), want.as_bytes()).is_ok()
        });
        if !ok {
            let mut rsp = json_response(StatusCode::UNAUTHORIZED, "unauthorized");
            rsp.headers_mut().insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer realm=\"portcullis-admin\""));
            return rsp;
        }
    }
    match req.uri().path() {
        "/healthz" => json_ok("{\"status\":\"ok\"}"),
        "/readyz" => {
            if shared.is_draining() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else if !shared.gateway.load().ready() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "issuer_keys_missing")
            } else {
                // Still ready: the other upstreams serve, and a gateway taken out of rotation would not bring a
                // dead backend back. The list says which ones have no target taking requests.
                let down = shared.gateway.load().upstreams_without_healthy_target();
                if down.is_empty() {
                    json_ok("{\"status\":\"ready\"}")
                } else {
                    let body = serde_json::json!({"status": "ready", "upstreams_without_healthy_target": down});
                    let mut rsp = Response::new(Body::full(body.to_string()));
                    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
                    rsp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
                    rsp
                }
            }
        }
        "/metrics" => {
            let mut rsp = Response::new(Body::full(shared.metrics.render()));
            rsp.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            rsp
        }
        _ => json_response(StatusCode::NOT_FOUND, "not_found"),
    }
}

fn json_ok(body: &'static str) -> Response<Body> {
    let mut rsp = Response::new(Body::full(body));
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    rsp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    rsp
}
