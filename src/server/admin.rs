//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and `POST /revocations` (what `portcullis revoke`
//! sends when there is no store). Never served on the public listeners.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::Body;
use crate::error::json_response;
use crate::server::Shared;
use crate::store::{Revocation, Revoked};

/// A revocation as `POST /revocations` takes it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    entry: Revocation,
    until: u64,
}

/// Answers one admin request.
pub async fn handle<B>(shared: &Shared, req: Request<B>, peer: SocketAddr) -> Response<Body>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let revoking = req.uri().path() == "/revocations" && req.method() == Method::POST;
    if !revoking && req.method() != Method::GET && req.method() != Method::HEAD {
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
    if revoking {
        // Revoking refuses every token of a user: without an admin token, only from this host.
        if shared.gateway.load().config.admin_token.is_none() && !peer.ip().is_loopback() {
            return json_response(StatusCode::FORBIDDEN, "forbidden");
        }
        return revoke(shared, req).await;
    }
    match req.uri().path() {
        "/healthz" => json_ok("{\"status\":\"ok\"}"),
        "/readyz" => {
            if shared.is_draining() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else if !shared.gateway.load().ready() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "issuer_keys_missing")
            } else if shared.gateway.load().revocations_unknown() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, "revocations_not_loaded")
            } else {
                // Still ready: the other upstreams serve, and a gateway taken out of rotation would not bring a
                // dead backend back. The list says which ones have no target taking requests.
                let gateway = shared.gateway.load();
                let down = gateway.upstreams_without_healthy_target();
                let store = gateway.store_up();
                if down.is_empty() && store.is_none() {
                    json_ok("{\"status\":\"ready\"}")
                } else {
                    // Still ready with the store down: shared limits fall back, revocations held here still hold.
                    let mut body = serde_json::json!({"status": "ready"});
                    if !down.is_empty() {
                        body["upstreams_without_healthy_target"] = down.into();
                    }
                    if let Some(up) = store {
                        body["store"] = if up { "up" } else { "down" }.into();
                    }
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

/// Adds a revocation here and, with a store, for every replica.
async fn revoke<B>(shared: &Shared, req: Request<B>) -> Response<Body>
where
    B: http_body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body = match http_body_util::Limited::new(req.into_body(), 16 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json_response(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
    };
    let Ok(RevokeBody { entry, until }) = serde_json::from_slice(&body) else {
        return json_response(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let gateway = shared.gateway.load();
    let entry = Revoked { what: entry, until };
    gateway.revocations().add_local(entry.clone());
    if let Some(store) = gateway.store() {
        if let Err(e) = store.revoke(&entry).await {
            tracing::warn!(error = %e, "revocation held on this replica only: the store did not take it");
            return json_response(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable");
        }
    }
    tracing::info!(revocation = ?entry.what, until = entry.until, "token revocation added");
    json_ok("{\"status\":\"revoked\"}")
}

fn json_ok(body: &'static str) -> Response<Body> {
    let mut rsp = Response::new(Body::full(body));
    rsp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    rsp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    rsp
}
