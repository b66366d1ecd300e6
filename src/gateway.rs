//! The Gateway: everything one config needs at run time, and the request path through it.
//!
//! `handle()` is infallible: it times the request, turns any error into its answer, and writes the access log.
//! `handle_inner()` runs one stage per line: route -> authenticate -> authorize -> forward -> finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::authn::{Authenticator, Principal};
use crate::authz::authorize;
use crate::body::Body;
use crate::config::Config;
use crate::error::GatewayError;
use crate::headers::{self, Forwarding};
use crate::issuer::TokenEndpoint;
use crate::jwks::{fetch_client, FetchClient};
use crate::proxy::{self, Upstream};
use crate::ratelimit::{client_ip, is_trusted};
use crate::router::normalize_path;

/// The connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Background tasks owned by one Gateway (JWKS refresh); aborted when it is dropped.
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What a request did, for the access log.
#[derive(Default)]
struct Outcome<'a> {
    route: Option<&'a str>,
    upstream_time: Option<Duration>,
    principal: Option<Arc<Principal>>,
    request_has_body: bool,
}

/// Everything the request path needs for one config, built once and swapped whole on reload.
pub struct Gateway {
    pub config: Arc<Config>,
    authn: Authenticator,
    /// The upstream of each route, by route index.
    route_upstreams: Vec<Arc<Upstream>>,
    token_endpoint: Option<TokenEndpoint>,
    _tasks: Tasks,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("route {route:?} names upstream {upstream:?}, which does not exist")]
    MissingUpstream { route: String, upstream: String },
    #[error(transparent)]
    Jwks(#[from] crate::jwks::JwksError),
    #[error("token endpoint: {0}")]
    Issuer(#[from] crate::issuer::IssuerError),
}

impl Gateway {
    /// Builds the runtime state for a checked config. Must run inside a tokio runtime (JWKS tasks start here).
    pub fn new(config: Arc<Config>) -> Result<Gateway, BuildError> {
        let tls = proxy::upstream_tls();
        let mut by_name = std::collections::HashMap::new();
        for (name, s) in &config.upstreams {
            by_name.insert(name.clone(), Arc::new(Upstream::new(s.clone(), &tls)));
        }
        let mut route_upstreams = Vec::new();
        for r in config.routes.routes() {
            let up = by_name
                .get(&r.upstream)
                .ok_or_else(|| BuildError::MissingUpstream { route: r.name.clone(), upstream: r.upstream.clone() })?;
            route_upstreams.push(up.clone());
        }
        let client: FetchClient = fetch_client(None)?;
        let authn = Authenticator::new(&config.issuers, &client);
        let mut tasks = Tasks::default();
        for issuer in authn.issuers() {
            if let Some(ks) = &issuer.jwks {
                let ks = ks.clone();
                tasks.0.push(tokio::spawn(ks.run_refresh(|_issuer, _ok, _keys| {})));
            }
        }
        let token_endpoint = match &config.token_endpoint {
            Some(te) => {
                let issuer = config
                    .issuers
                    .iter()
                    .find(|i| i.id == te.issuer)
                    .ok_or_else(|| crate::issuer::IssuerError::NoSigningKey(te.issuer.clone()))?;
                Some(TokenEndpoint::new(te.clone(), issuer)?)
            }
            None => None,
        };
        Ok(Gateway { config, authn, route_upstreams, token_endpoint, _tasks: tasks })
    }

    /// Returns true when every issuer has keys (the admin `readyz`).
    pub fn ready(&self) -> bool {
        self.authn.ready()
    }

    /// Serves one request. Never fails: errors become their HTTP answer here, and every request is logged.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let trusted = is_trusted(&self.config.trusted_proxies, conn.peer.ip());
        let request_id = headers::request_id(req.headers(), trusted);
        // Before anything else: a client can never forge its identity to the upstream.
        headers::strip_identity(req.headers_mut(), &self.config.identity);
        let method = req.method().clone();
        let uri = req.uri().clone();
        let mut outcome = Outcome { request_has_body: has_body(&req), ..Outcome::default() };
        let fwd = Forwarding { peer: conn.peer, tls: conn.tls, from_trusted_proxy: trusted };
        let mut rsp = match self.handle_inner(req, &uri, &fwd, &request_id, &mut outcome).await {
            Ok(rsp) => rsp,
            Err(e) => {
                let status = e.status();
                if status.is_server_error() {
                    tracing::warn!(request_id = ?request_id, error = %e, source = ?std::error::Error::source(&e), "request failed");
                } else {
                    tracing::debug!(request_id = ?request_id, error = %e, "request refused");
                }
                // An unread HTTP/1 body would be taken as the next request; close instead.
                let close = outcome.request_has_body && outcome.upstream_time.is_none();
                e.to_response(close)
            }
        };
        rsp.headers_mut().insert(headers::request_id_header().clone(), request_id.clone());
        let bytes = rsp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        tracing::info!(
            target: "portcullis::access",
            request_id = ?request_id,
            client = %conn.peer,
            method = %method,
            path = uri.path(),
            route = outcome.route.unwrap_or("-"),
            status = rsp.status().as_u16(),
            bytes,
            subject = outcome.principal.as_ref().map(|p| p.subject.as_str()),
            duration_us = start.elapsed().as_micros() as u64,
            upstream_us = outcome.upstream_time.map(|d| d.as_micros() as u64),
        );
        rsp
    }

    async fn handle_inner<'a>(
        &'a self,
        mut req: Request<Incoming>,
        uri: &http::Uri,
        fwd: &Forwarding,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, GatewayError> {
        let path = normalize_path(uri.path())?;
        if let Some(te) = &self.token_endpoint {
            if *path == te.settings.path {
                outcome.route = Some("token");
                // The password grant only over TLS, unless allowed for local use.
                if !fwd.tls && !te.settings.allow_plaintext {
                    return Err(GatewayError::Route(crate::router::RouteError::NotFound));
                }
                let ip = client_ip(fwd.peer, req.headers(), &self.config.trusted_proxies);
                return Ok(te.handle(req, ip).await?);
            }
            if let Some(rsp) = te.well_known(&path, "") {
                outcome.route = Some("well-known");
                return Ok(rsp);
            }
        }
        let matched = self.config.routes.match_route(req.method(), &path)?;
        let route = matched.route;
        outcome.route = Some(route.name.as_str());
        let max_body = self.config.limits.max_body_bytes;
        if let Some(len) = declared_length(&req) {
            if len > max_body {
                return Err(GatewayError::BodyTooLarge(len));
            }
        }
        let auth = self.authn.authenticate(req.headers(), route.policy.auth).await?;
        outcome.principal = auth.principal.clone();
        authorize(auth.principal.as_deref(), &route.policy, &matched)?;

        let upgrading = req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let host =
            req.headers().get(header::HOST).cloned().or_else(|| uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        let upstream = &self.route_upstreams[route.index];
        let (mut parts, body) = req.into_parts();
        headers::prepare_upstream(
            &mut parts.headers,
            fwd,
            host.as_ref(),
            request_id,
            auth.principal.as_deref(),
            &self.config.identity,
            upgrading,
        );
        let mut up_req = Request::from_parts(parts, Body::limited(body, max_body));
        proxy::rewrite_uri(&mut up_req, &upstream.settings, route.upstream_path(&path), host)?;

        let sent = Instant::now();
        let result = proxy::forward(upstream, up_req).await;
        outcome.upstream_time = Some(sent.elapsed());
        let mut rsp = result?;
        let upgraded = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if upgraded {
            match client_upgrade {
                Some(client) => proxy::splice_upgrade(client, hyper::upgrade::on(&mut rsp)),
                None => return Err(GatewayError::Proxy(proxy::ProxyError::UnexpectedUpgrade)),
            }
        }
        let (mut parts, body) = rsp.into_parts();
        headers::finish_response(&mut parts.headers, request_id, upgraded);
        Ok(Response::from_parts(parts, Body::Stream(body)))
    }
}

fn has_body<B>(req: &Request<B>) -> bool {
    declared_length(req).is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING)
}

fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}
