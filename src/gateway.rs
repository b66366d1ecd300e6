//! The Gateway: everything one config needs at run time, and the request path through it.
//!
//! `handle()` is infallible: it times the request, turns any error into its answer, adds the response headers,
//! counts it, and writes the access log. `admit()` and `routed()` run one stage per line:
//! global limit -> route -> authenticate -> authorize -> route limit -> forward -> finish.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, Version};

use crate::auth::authz::{authorize, AuthMode};
use crate::auth::jwks::{fetch_client, FetchClient};
use crate::auth::revocation::{follow, Revocations};
use crate::auth::{Authenticated, Authenticator, Principal, TokenSource};
use crate::body::{Body, RequestBody};
use crate::config::Config;
use crate::edge::client_addr::{client_ip, is_trusted};
use crate::edge::client_cert::{self, ClientCert};
use crate::edge::cors;
use crate::edge::forward_auth::{self, DecisionError, Original};
use crate::edge::headers_request::{self, identity_values, Forwarding};
use crate::edge::headers_response::{self, Additions, AnswerFields};
use crate::edge::ratelimit::{reuse_or_new, Limiter};
use crate::error::GatewayError;
use crate::metrics::{Metrics, RouteMetrics};
use crate::router::{normalize_path, request_host, Route, RouteError};
use crate::store::Store;
use crate::telemetry::{RequestSpans, Timing, TraceIds, Tracer, UpstreamCall};
use crate::token_endpoint::TokenEndpoint;
use crate::upstream::{self, Budget, Call, Outbound, Target, Upstream};

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's address as an `X-Forwarded-For` value, rendered once per connection.
    pub peer_ip: HeaderValue,
    /// The requests its client address has in flight, over all its connections and streams (None: a trusted
    /// proxy, not limited).
    pub client_in_flight: Option<Arc<AtomicUsize>>,
    /// The client certificate rustls verified during the handshake (mTLS).
    pub client_cert: Option<Arc<ClientCert>>,
    /// Accepted on `[listen] decisions`: every request is a forward-auth decision.
    pub decisions_only: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo { peer, tls, peer_ip, client_in_flight: None, client_cert: None, decisions_only: false }
    }
}

/// Background tasks owned by one Gateway (JWKS refresh, limiter pruning); aborted when it is dropped.
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// What the stages know of a request besides its message: the URI as sent, who sent it, its id.
struct Context<'r> {
    uri: &'r http::Uri,
    client: IpAddr,
    request_id: &'r HeaderValue,
    fwd: Forwarding<'r>,
    client_in_flight: Option<&'r AtomicUsize>,
    /// The request's trace, with `[tracing]`.
    trace: Option<&'r TraceIds>,
    /// A forward-auth decision request: the original request it asks about.
    decision: Option<&'r Result<Original, DecisionError>>,
    /// The connection's verified client certificate.
    client_cert: Option<&'r ClientCert>,
}

/// Where a matched request goes: its route, its normalised path and the authority the client addressed.
struct Routed<'r> {
    route: &'r Route,
    path: &'r str,
    host: Option<HeaderValue>,
}

/// A request's place among its client's requests in flight, given back when the request is answered.
struct InFlight<'c>(&'c AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The route labels of the token endpoint and the well-known documents, in metrics and the access log.
const TOKEN_LABEL: &str = "token";
const WELL_KNOWN_LABEL: &str = "well-known";

/// What a request did, for the answer's headers, the metrics and the access log.
#[derive(Default)]
struct Outcome<'a> {
    route: Option<&'a Route>,
    /// A name for answers that no route gave (token endpoint, well-known documents).
    label: Option<&'static str>,
    upstream_time: Option<Duration>,
    principal: Option<Arc<Principal>>,
    /// An HTTP/1 request with a body: refused unread, its connection must close.
    http1_body: bool,
    /// The answer came from the upstream (not made by the gateway).
    proxied: bool,
    /// A lean answer's fields, left in the upstream's head.
    passed: AnswerFields,
    rate_limited: bool,
    /// The upstream the request was sent to, and the status it answered.
    upstream: Option<&'a str>,
    upstream_status: Option<u16>,
    /// The target of the last attempt.
    target: Option<Arc<Target>>,
    /// A gRPC request: refusals are gRPC-shaped.
    grpc: bool,
    /// The status a gRPC-shaped refusal stands for (its HTTP status is 200), for the metrics and the log.
    refused: Option<http::StatusCode>,
    /// A forward-auth decision (counted in `portcullis_decisions_total` too).
    decision: bool,
    /// Why the gateway refused the request ([`GatewayError::reason`]).
    reason: Option<&'static str>,
    /// Stage timings, kept only for a sampled trace.
    timed: bool,
    auth_timing: Option<(Timing, Option<bool>)>,
    limit_timing: Option<(Timing, bool)>,
    upstream_timing: Option<Timing>,
}

/// What the access log says of a request beyond what the stages record, read before they take the request apart.
struct LogFacts {
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    trace: Option<crate::telemetry::TraceParent>,
}

impl LogFacts {
    fn of(req: &Request<RequestBody>, uri: &http::Uri) -> LogFacts {
        let h = req.headers();
        let host = h.get(header::HOST).cloned().or_else(|| uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
        let trace = h.get(crate::telemetry::TRACEPARENT).and_then(|v| crate::telemetry::TraceParent::parse(v.as_bytes()));
        LogFacts { host, user_agent: h.get(header::USER_AGENT).cloned(), trace }
    }
}

/// Everything the request path needs for one config, built once and swapped whole on reload.
pub struct Gateway {
    pub config: Arc<Config>,
    metrics: Arc<Metrics>,
    authn: Authenticator,
    /// Per-route state, by route index.
    route_upstreams: Vec<Arc<Upstream>>,
    route_limiters: Vec<Option<Arc<Limiter>>>,
    route_metrics: Vec<RouteMetrics>,
    /// `portcullis_upstream_duration_seconds{upstream}` of each route's upstream, resolved once.
    route_upstream_time: Vec<prometheus::Histogram>,
    /// The retry budget of each route that retries.
    route_budgets: Vec<Option<Budget>>,
    /// Some CORS policy exists (global or on a route): only then is a request's `Origin` looked up.
    cors_configured: bool,
    unrouted_metrics: RouteMetrics,
    /// The token endpoint's and the well-known documents' own route labels.
    token_metrics: RouteMetrics,
    well_known_metrics: RouteMetrics,
    global_limiter: Option<Arc<Limiter>>,
    token_endpoint: Option<TokenEndpoint>,
    tracer: Option<Tracer>,
    /// The shared store, with `[store]`.
    store: Option<Arc<Store>>,
    _tasks: Tasks,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("route {route:?} names upstream {upstream:?}, which does not exist")]
    MissingUpstream { route: String, upstream: String },
    #[error(transparent)]
    Jwks(#[from] crate::auth::jwks::JwksError),
    #[error("token endpoint: {0}")]
    Issuer(#[from] crate::token_endpoint::IssuerError),
    #[error(transparent)]
    Tracing(#[from] crate::telemetry::TracingError),
    #[error("upstream {name:?}: ca_file {source}")]
    UpstreamTls {
        name: String,
        #[source]
        source: crate::tls_client::ClientTlsError,
    },
}

impl Gateway {
    /// Builds the runtime state for a checked config. Must run inside a tokio runtime (background tasks start
    /// here). With `previous`, limiter state of unchanged limits is carried over.
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        previous: Option<&Gateway>,
        resolver: &upstream::Resolver,
    ) -> Result<Gateway, BuildError> {
        // An unchanged store keeps its connections (and the limiters counting in it their state) across a reload.
        let store = config.store.as_ref().map(|settings| match previous.and_then(|p| p.store.as_ref()) {
            Some(old) if old.settings == *settings => old.clone(),
            _ => Store::start(settings.clone(), metrics.clone()),
        });
        let mut system_roots = None;
        let mut by_name = std::collections::HashMap::new();
        for (name, s) in &config.upstreams {
            // An unchanged upstream keeps its pools and health across a reload: no reconnect storm; a changed one
            // keeps its unchanged targets.
            let old = previous.and_then(|p| p.route_upstreams.iter().find(|u| u.settings.name == *name));
            let up = match old {
                Some(up) if up.settings == *s => up.clone(),
                _ => {
                    let failed = |source| BuildError::UpstreamTls { name: name.clone(), source };
                    let tls = match &s.ca {
                        Some(ca) => upstream::upstream_tls(Some(ca)).map_err(failed)?,
                        None => match &system_roots {
                            Some(tls) => Arc::clone(tls),
                            None => system_roots.insert(upstream::upstream_tls(None).map_err(failed)?).clone(),
                        },
                    };
                    Upstream::new(s.clone(), &tls, &metrics, resolver, old.map(|o| &**o))
                }
            };
            by_name.insert(name.clone(), up);
        }
        let mut route_upstreams = Vec::new();
        let mut route_limiters = Vec::new();
        let mut route_metrics = Vec::new();
        let mut route_upstream_time = Vec::new();
        let mut route_budgets = Vec::new();
        for r in config.routes.routes() {
            let up = by_name
                .get(&r.upstream)
                .ok_or_else(|| BuildError::MissingUpstream { route: r.name.clone(), upstream: r.upstream.clone() })?;
            route_upstreams.push(up.clone());
            let old = previous.and_then(|p| p.limiter_of(&r.name));
            let counted_in = store.as_ref().map(|s| (s, Some(r.name.as_str())));
            route_limiters.push(r.rate_limit.as_ref().map(|s| reuse_or_new(old.as_ref(), s, config.ipv6_prefix, counted_in)));
            route_metrics.push(RouteMetrics::new(&metrics, &r.name));
            route_upstream_time.push(metrics.upstream_duration.with_label_values(&[&r.upstream]));
            let retries = config.route_calls.get(r.index).and_then(|c| c.retries.as_ref());
            route_budgets.push(retries.map(|p| Budget::new(p.budget_percent)));
        }
        let global_limiter = config.global_limit.as_ref().map(|s| {
            reuse_or_new(previous.and_then(|p| p.global_limiter.as_ref()), s, config.ipv6_prefix, store.as_ref().map(|s| (s, None)))
        });
        let client: FetchClient = fetch_client(None)?;
        let authn = Authenticator::new(&config.issuers, &client, previous.map(|p| &p.authn));
        let mut tasks = Tasks::default();
        for issuer in authn.issuers() {
            if let Some(ks) = &issuer.jwks {
                let m = metrics.clone();
                ks.report_to(Box::new(move |issuer, ok, keys| {
                    m.jwks_refresh.with_label_values(&[issuer, if ok { "ok" } else { "error" }]).inc();
                    m.jwks_keys.with_label_values(&[issuer]).set(i64::try_from(keys).unwrap_or(i64::MAX));
                }));
                tasks.0.push(tokio::spawn(ks.clone().run_refresh()));
            }
        }
        let limiters: Vec<Arc<Limiter>> = route_limiters.iter().flatten().chain(global_limiter.iter()).cloned().collect();
        if !limiters.is_empty() {
            tasks.0.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(30));
                loop {
                    tick.tick().await;
                    // Pruning a million keys takes each shard's lock for a while: not on a request thread.
                    let ls = limiters.clone();
                    let _ = tokio::task::spawn_blocking(move || ls.iter().for_each(|l| l.prune())).await;
                }
            }));
        }
        let token_endpoint = match &config.token_endpoint {
            Some(te) => {
                let issuer = config
                    .issuers
                    .iter()
                    .find(|i| i.id == te.issuer)
                    .ok_or_else(|| crate::token_endpoint::IssuerError::NoSigningKey(te.issuer.clone()))?;
                let shared = store.as_ref().filter(|_| te.shared_attempts);
                let endpoint =
                    TokenEndpoint::new(te.clone(), issuer, config.ipv6_prefix, previous.and_then(|p| p.token_endpoint.as_ref()), shared)?;
                tasks.0.push(tokio::spawn(endpoint.pruner()));
                Some(endpoint)
            }
            None => None,
        };
        let gauge = metrics.revocations_active.clone();
        let revocations = Arc::downgrade(authn.revocations());
        tasks.0.push(tokio::spawn(follow(store.as_ref().map(Arc::downgrade), revocations, move |n| gauge.set(n as i64))));
        let cors_configured = config.cors.is_some() || config.routes.routes().iter().any(|r| r.cors.is_some());
        let tracer = config.tracing.as_ref().map(|t| Tracer::start(Arc::clone(t), &metrics)).transpose()?;
        Ok(Gateway {
            unrouted_metrics: RouteMetrics::new(&metrics, "-"),
            token_metrics: RouteMetrics::new(&metrics, TOKEN_LABEL),
            well_known_metrics: RouteMetrics::new(&metrics, WELL_KNOWN_LABEL),
            config,
            metrics,
            authn,
            route_upstreams,
            route_limiters,
            route_metrics,
            route_upstream_time,
            route_budgets,
            cors_configured,
            global_limiter,
            token_endpoint,
            tracer,
            store,
            _tasks: tasks,
        })
    }

    fn limiter_of(&self, route_name: &str) -> Option<Arc<Limiter>> {
        let r = self.config.routes.routes().iter().find(|r| r.name == route_name)?;
        self.route_limiters.get(r.index).cloned().flatten()
    }

    /// On a reload, before this gateway replaces `previous`: see [`Authenticator::fetch_keys_lost_since`].
    pub async fn fetch_keys_lost_since(&self, previous: &Gateway) -> Result<(), (String, crate::auth::jwks::JwksError)> {
        self.authn.fetch_keys_lost_since(&previous.authn).await
    }

    /// After `now` has replaced this gateway: removes the metrics series of targets and upstreams it has no more.
    pub fn forget_upstream_metrics_missing_from(&self, now: &Gateway) {
        for up in &self.route_upstreams {
            let kept = now.route_upstreams.iter().find(|n| n.settings.name == up.settings.name);
            up.forget_targets_missing_from(kept.map(|k| &**k));
        }
    }

    /// The upstreams none of whose targets takes requests now (the admin `readyz` lists them).
    pub fn upstreams_without_healthy_target(&self) -> Vec<String> {
        let mut down: Vec<String> =
            self.route_upstreams.iter().filter(|u| !u.has_healthy_target()).map(|u| u.settings.name.clone()).collect();
        down.sort();
        down.dedup();
        down
    }

    /// With a store, whether the store's revocations are still unknown here (never loaded): such a replica
    /// would accept tokens every other one refuses, so it is not ready (fail closed).
    pub fn revocations_unknown(&self) -> bool {
        self.store.is_some() && !self.authn.revocations().loaded()
    }

    /// Whether the shared store answers (None: no `[store]`), for the admin `readyz`.
    pub fn store_up(&self) -> Option<bool> {
        self.store.as_ref().map(|s| s.is_up())
    }

    /// The revocations this gateway enforces (the admin listener adds to them without a store).
    pub fn revocations(&self) -> &Arc<Revocations> {
        self.authn.revocations()
    }

    /// The shared store, with `[store]`.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref()
    }

    /// Returns true when every issuer has keys (the admin `readyz`).
    pub fn ready(&self) -> bool {
        self.authn.ready()
    }

    /// Serves one request. Never fails: errors become their HTTP answer here, and every request is counted
    /// and logged.
    pub async fn handle(&self, req: Request<RequestBody>, conn: &ConnInfo) -> Response<Body> {
        let (mut rsp, additions) = self.serve(req, conn).await;
        additions.insert_into(rsp.headers_mut());
        rsp
    }

    /// [`Gateway::handle`] for a codec that writes the answer's [`Additions`] itself, straight into the head.
    pub async fn serve(&self, mut req: Request<RequestBody>, conn: &ConnInfo) -> (Response<Body>, Additions<'_>) {
        let start = Instant::now();
        let trusted = is_trusted(&self.config.trusted_proxies, conn.peer.ip());
        let request_id = headers_request::request_id(req.headers(), trusted);
        // Read before the routing overrides go: a decision's original request is in them, from a trusted proxy.
        let decision =
            self.config.forward_auth.as_ref().filter(|f| conn.decisions_only || f.serves(req.uri().path())).map(|f| match trusted {
                true => f.original(req.method(), req.uri(), req.headers()),
                false => Err(DecisionError::Untrusted(conn.peer.ip())),
            });
        // Before anything else: a client can never forge its identity to the upstream.
        headers_request::strip_forged(req.headers_mut(), &self.config.identity);
        let method = req.method().clone();
        // Taken, not cloned: every stage after this reads the URI from here (the forwarded one is built anew).
        let uri = std::mem::take(req.uri_mut());
        let origin = if self.cors_configured { req.headers().get(header::ORIGIN).cloned() } else { None };
        let client = client_ip(conn.peer, req.headers(), &self.config.trusted_proxies, self.config.forwarded_from);
        // Only an HTTP/1 body left unread needs the connection closed (HTTP/2 resets just the stream).
        let version = req.version();
        let unread_closes = version < Version::HTTP_2 && has_body(&req);
        // gRPC calls are POSTs: other methods skip the header lookup.
        let grpc = req.method() == http::Method::POST && upstream::is_grpc(req.headers());
        let mut outcome = Outcome { http1_body: unread_closes, grpc, ..Outcome::default() };
        let fwd = Forwarding { peer: conn.peer, peer_ip: &conn.peer_ip, tls: conn.tls, from_trusted_proxy: trusted };
        let trace = self.tracer.as_ref().map(|t| t.begin(req.headers(), trusted));
        outcome.timed = trace.as_ref().is_some_and(|t| t.sampled);
        let client_in_flight = conn.client_in_flight.as_deref();
        let cx = Context {
            uri: &uri,
            client,
            request_id: &request_id,
            fwd,
            client_in_flight,
            trace: trace.as_ref(),
            decision: decision.as_ref(),
            client_cert: conn.client_cert.as_deref(),
        };
        let facts = self.config.access_log.then(|| LogFacts::of(&req, &uri));
        let result = self.handle_inner(req, &cx, &mut outcome).await;
        let mut rsp = result.unwrap_or_else(|e| self.refusal(&e, &mut outcome, &request_id));
        let h = rsp.headers_mut();
        let secure = outcome.route.and_then(|r| r.headers.as_ref()).unwrap_or(&self.config.headers);
        let mut passed = std::mem::take(&mut outcome.passed);
        let secure = headers_response::prepare_answer(h, &mut passed, secure, conn.tls, !outcome.proxied);
        if let Some(policy) = outcome.route.and_then(|r| r.cors.as_ref()).or(self.config.cors.as_ref()) {
            // The policy decides alone: an upstream's own CORS fields go (in the map, where removing is cheap).
            if outcome.proxied {
                passed.move_into(h);
                cors::remove_upstreams_own(h);
            }
            cors::apply(policy, origin.as_ref(), h);
        }

        let ready_at = Instant::now();
        let elapsed = ready_at.saturating_duration_since(start);
        let status = outcome.refused.unwrap_or(rsp.status());
        self.metrics_of(&outcome).observe(&self.metrics, &method, status, elapsed.as_secs_f64());
        if outcome.decision {
            let result = if status.is_success() {
                "allow"
            } else if status.is_server_error() {
                "error"
            } else {
                "deny"
            };
            let route = outcome.route.map_or("-", |r| r.name.as_str());
            self.metrics.decisions.with_label_values(&[route, result]).inc();
        }
        let done = Answered {
            method: &method,
            route: outcome.route.map(|r| r.name.as_str()).or(outcome.label).unwrap_or("-"),
            status: status.as_u16(),
            http_version: version_text(version),
            timing: Timing { start, end: ready_at },
        };
        let trace_id = trace.as_ref().map(TraceIds::trace_id_hex);
        if let (Some(tracer), Some(ids)) = (&self.tracer, trace.filter(|t| t.sampled)) {
            tracer.record(spans_of(ids, &done, &outcome));
        }
        if let Some(facts) = facts {
            let declared = rsp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
            crate::logging::access(&crate::logging::AccessRecord {
                request_id: request_id.to_str().unwrap_or("-"),
                client,
                client_text: (client == conn.peer.ip()).then(|| conn.peer_ip.to_str().ok()).flatten(),
                method: method.as_str(),
                path: uri.path(),
                route: done.route,
                status: done.status,
                bytes: declared.or(passed.content_length),
                subject: outcome.principal.as_ref().map(|p| p.subject.as_str()),
                issuer: outcome.principal.as_ref().map(|p| p.issuer_id.as_str()),
                rate_limited: outcome.rate_limited,
                duration_us: elapsed.as_micros() as u64,
                upstream_us: outcome.upstream_time.map(|d| d.as_micros() as u64),
                reason: outcome.reason,
                host: facts.host.as_ref().map(HeaderValue::as_bytes),
                user_agent: facts.user_agent.as_ref().map(HeaderValue::as_bytes),
                http_version: done.http_version,
                upstream: outcome.upstream,
                target: outcome.target.as_deref().map(|t| &*t.label),
                upstream_status: outcome.upstream_status,
                trace_id: trace_id.or(facts.trace.map(|t| t.trace_id_hex())),
                at: ready_at,
            });
        }
        (rsp, Additions { passed, secure, request_id })
    }

    /// The answer to a refused or failed request: counted, logged by its cause, and closing the connection when
    /// an HTTP/1 body was left unread (it would be taken as the next request).
    fn refusal(&self, e: &GatewayError, outcome: &mut Outcome<'_>, request_id: &HeaderValue) -> Response<Body> {
        self.count_refusal(e, outcome);
        outcome.reason = Some(e.reason());
        if e.status().is_server_error() {
            tracing::warn!(request_id = ?request_id, error = %e, source = ?std::error::Error::source(e), "request failed");
        } else {
            tracing::debug!(request_id = ?request_id, error = %e, "request refused");
        }
        let client_body_broke =
            matches!(e, GatewayError::Proxy(upstream::ProxyError::ClientBody(_) | upstream::ProxyError::ClientTimeout(_)));
        let close = outcome.http1_body && (outcome.upstream_time.is_none() || client_body_broke);
        if outcome.grpc {
            outcome.refused = Some(e.status());
            return e.to_grpc_response(close);
        }
        e.to_response(close)
    }

    /// The request path, one stage per line: each returns early with the error that answers the request.
    async fn handle_inner<'a>(
        &'a self,
        req: Request<RequestBody>,
        cx: &Context<'_>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, GatewayError> {
        let _in_flight = self.admit_client(cx.client_in_flight, outcome)?;
        let host = request_host(req.headers(), cx.uri, req.version())?;
        self.check_global_limit(cx.client, outcome).await?;
        if let Some(decision) = cx.decision {
            return self.decide(req, decision, cx, outcome).await;
        }
        let path = normalize_path(cx.uri.path())?;
        if let Some(te) = self.token_endpoint.as_ref().filter(|te| te.serves(&path)) {
            return self.token_endpoint(te, req, &path, cx, outcome).await;
        }
        if let Some(rsp) = self.preflight(&req, &path, outcome) {
            return Ok(rsp);
        }
        let matched = self.config.routes.match_route(req.method(), &path)?;
        let route = *outcome.route.insert(matched.route);
        check_declared_length(&req, self.config.limits.max_body_bytes)?;
        check_client_cert(route, cx.client_cert)?;
        let auth = self.authenticate(&req, cx.uri, route, outcome).await?;
        check_binding(auth.principal.as_deref(), cx.client_cert)?;
        authorize(auth.principal.as_deref(), &route.policy, |n| matched.param(n))?;
        self.check_route_limit(route, cx.client, auth.principal.as_deref(), outcome).await?;
        let identity = auth.principal.as_deref().map(|p| identity_values(p, &self.config.identity)).transpose()?;
        let outbound = self.prepare_upstream(req, Routed { route, path: &path, host }, &auth, identity, cx);
        self.forward(route, outbound, auth.principal.as_deref(), cx.client, outcome).await
    }

    /// A forward-auth decision: the original request through the same route match, authentication,
    /// authorization and rate limit as a proxied one; allowed, 200 with the identity fields, and nothing forwarded.
    async fn decide<'a>(
        &'a self,
        mut req: Request<RequestBody>,
        decision: &Result<Original, DecisionError>,
        cx: &Context<'_>,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, GatewayError> {
        outcome.decision = true;
        let original = decision.as_ref().map_err(|e| GatewayError::Decision(e.clone()))?;
        *req.method_mut() = original.method.clone();
        let path = normalize_path(original.uri.path())?;
        let matched = self.config.routes.match_route(&original.method, &path)?;
        let route = *outcome.route.insert(matched.route);
        let auth = self.authenticate(&req, &original.uri, route, outcome).await?;
        authorize(auth.principal.as_deref(), &route.policy, |n| matched.param(n))?;
        self.check_route_limit(route, cx.client, auth.principal.as_deref(), outcome).await?;
        let identity = auth.principal.as_deref().map(|p| identity_values(p, &self.config.identity)).transpose()?;
        let mut rsp = Response::new(Body::empty());
        *rsp.headers_mut() = forward_auth::allowed(&self.config.identity, identity);
        Ok(rsp)
    }

    /// The client's requests in flight (all its connections and HTTP/2 streams): one client cannot make the
    /// gateway hold upstream connections without bound by opening streams.
    fn admit_client<'c>(
        &self,
        in_flight: Option<&'c AtomicUsize>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Option<InFlight<'c>>, GatewayError> {
        let Some(count) = in_flight else { return Ok(None) };
        let max = self.config.limits.max_requests_per_client;
        let place = InFlight(count);
        if count.fetch_add(1, Ordering::Relaxed) >= max {
            outcome.rate_limited = true;
            let limit = u32::try_from(max).unwrap_or(u32::MAX);
            return Err(GatewayError::RateLimited { key: "client_concurrency", retry_after_secs: 1, limit });
        }
        Ok(Some(place))
    }

    /// The global limit, before any parsing or signature check, so a flood of bad tokens costs almost nothing.
    async fn check_global_limit(&self, client: IpAddr, outcome: &mut Outcome<'_>) -> Result<(), GatewayError> {
        match &self.global_limiter {
            Some(l) => self.check_limit(l, client, None, outcome).await,
            None => Ok(()),
        }
    }

    /// Serves the token endpoint and the well-known documents.
    async fn token_endpoint(
        &self,
        te: &TokenEndpoint,
        req: Request<RequestBody>,
        path: &str,
        cx: &Context<'_>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Body>, GatewayError> {
        if let Some(rsp) = te.well_known(req.method(), path) {
            outcome.label = Some(WELL_KNOWN_LABEL);
            return rsp.map_err(GatewayError::Token);
        }
        outcome.label = Some(TOKEN_LABEL);
        // The password grant only over TLS, unless allowed for local use.
        if !cx.fwd.tls && !te.settings.allow_plaintext {
            return Err(GatewayError::Route(RouteError::NotFound));
        }
        if path == te.settings.revocation_path {
            let result = te.revoke(req, cx.client, &self.authn, self.authn.revocations(), self.store.as_ref()).await;
            if let Err(e) = &result {
                self.metrics.token_failures.with_label_values(&["revocation", e.code()]).inc();
            }
            return result.map_err(GatewayError::Token);
        }
        let (grant, result) = te.handle(req, cx.client).await;
        match &result {
            Ok(_) => self.metrics.token_issued.with_label_values(&[grant]).inc(),
            Err(e) => self.metrics.token_failures.with_label_values(&[grant, e.code()]).inc(),
        }
        result.map_err(GatewayError::Token)
    }

    /// Authenticates the request by the route's token sources, counting cache hits.
    async fn authenticate<'a>(
        &self,
        req: &Request<RequestBody>,
        uri: &http::Uri,
        route: &Route,
        outcome: &mut Outcome<'a>,
    ) -> Result<Authenticated, GatewayError> {
        // A public route has nothing to authenticate: no span for it.
        let started = (outcome.timed && route.policy.auth != AuthMode::Public).then(Instant::now);
        let result = self.authn.authenticate_from(req.headers(), uri.query(), &route.token_sources, route.policy.auth).await;
        if let Some(start) = started {
            let cache_hit = result.as_ref().ok().map(|a| a.cache_hit);
            outcome.auth_timing = Some((Timing { start, end: Instant::now() }, cache_hit));
        }
        let auth = result?;
        if auth.principal.is_some() {
            if auth.cache_hit { &self.metrics.jwt_cache_hits } else { &self.metrics.jwt_cache_misses }.inc();
        }
        outcome.principal = auth.principal.clone();
        Ok(auth)
    }

    async fn check_route_limit(
        &self,
        route: &Route,
        client: IpAddr,
        principal: Option<&Principal>,
        outcome: &mut Outcome<'_>,
    ) -> Result<(), GatewayError> {
        let Some(l) = &self.route_limiters[route.index] else { return Ok(()) };
        let started = outcome.timed.then(Instant::now);
        let result = self.check_limit(l, client, principal, outcome).await;
        if let Some(start) = started {
            outcome.limit_timing = Some((Timing { start, end: Instant::now() }, result.is_err()));
        }
        result
    }

    /// The request as its upstream gets it: the routed path and forwarded query, and only the headers the policy
    /// decided on (a credential it did not verify goes; forwarding fields, the request id and identity come).
    fn prepare_upstream<'r>(
        &'r self,
        req: Request<RequestBody>,
        Routed { route, path, host }: Routed<'r>,
        auth: &Authenticated,
        identity: Option<&[Option<HeaderValue>]>,
        cx: &'r Context<'_>,
    ) -> Outbound<'r> {
        let upgrading = req.version() == Version::HTTP_11 && headers_request::is_upgrade_request(req.headers());
        let (mut parts, body) = req.into_parts();
        // A credential the policy did not decide on never reaches the upstream: `Basic …` or `Token …` on an
        // anonymous request, a field beside a cookie token, and on a public route any `Authorization` (even a bearer
        // the upstream might take as checked) unless the route passes it through.
        let keep_authorization = match route.policy.auth {
            AuthMode::Public => route.pass_authorization,
            _ => auth.authorization_verified,
        };
        if !keep_authorization {
            parts.headers.remove(header::AUTHORIZATION);
        }
        if parts.version == Version::HTTP_2 {
            headers_request::join_cookie_crumbs(&mut parts.headers);
        }
        if let Some(trace) = cx.trace {
            trace.propagate(&mut parts.headers);
        }
        // The certificate rustls verified: the names were stripped from the request with the identity fields.
        if let Some(cert) = cx.client_cert {
            self.config.identity.cert_headers.insert(&mut parts.headers, cert);
        }
        // A scan of the few names, not a hash lookup: most requests carry no cookie.
        if parts.headers.keys().any(|k| k == header::COOKIE) {
            let verified_cookie = route.token_sources.cookie.as_deref().filter(|_| auth.source == Some(TokenSource::Cookie));
            for name in route.token_sources.cookie_names().filter(|n| Some(*n) != verified_cookie) {
                headers_request::remove_cookie(&mut parts.headers, name);
            }
        }
        let additions = headers_request::prepare_upstream(
            &mut parts.headers,
            &cx.fwd,
            host.as_ref(),
            cx.request_id,
            identity,
            &self.config.identity,
            upgrading,
        );
        Outbound {
            parts,
            body,
            path: route.upstream_path(path),
            query: upstream::forwarded_query(cx.uri.query(), &route.token_sources),
            host,
            additions,
            upgrading,
            answer_rules: route.headers.as_ref().unwrap_or(&self.config.headers),
            max_body: self.config.limits.max_body_bytes,
            identity: &self.config.identity,
        }
    }

    /// Forwards to a target of the route's upstream, timing the exchange and counting its failures.
    async fn forward<'a>(
        &'a self,
        route: &'a Route,
        outbound: Outbound<'_>,
        principal: Option<&Principal>,
        client: IpAddr,
        outcome: &mut Outcome<'a>,
    ) -> Result<Response<Body>, GatewayError> {
        let upstream = &self.route_upstreams[route.index];
        outcome.upstream = Some(upstream.settings.name.as_str());
        let route_call = self.config.route_calls.get(route.index);
        let timeout = route_call.and_then(|c| c.timeout).unwrap_or(upstream.settings.timeout);
        // A gRPC client's deadline caps the wait: past it, the client has given up.
        let client_deadline = outcome.grpc.then(|| upstream::grpc_timeout(&outbound.parts.headers)).flatten().filter(|t| *t < timeout);
        let call = Call {
            timeout: client_deadline.unwrap_or(timeout),
            client_deadline: client_deadline.is_some(),
            retries: route_call.and_then(|c| c.retries.as_ref()).zip(self.route_budgets[route.index].as_ref()),
            key: upstream.settings.balance.key(&outbound.parts.headers, principal, client),
        };
        let sent = Instant::now();
        let result = upstream::forward(upstream, outbound, &call, sent, &mut outcome.target).await;
        let took = sent.elapsed();
        outcome.upstream_time = Some(took);
        if outcome.timed {
            outcome.upstream_timing = Some(Timing { start: sent, end: sent + took });
        }
        self.route_upstream_time[route.index].observe(took.as_secs_f64());
        let (rsp, passed) = result.inspect_err(|e| {
            if let Some(kind) = e.kind() {
                self.metrics.upstream_errors.with_label_values(&[&upstream.settings.name, kind]).inc();
            }
        })?;
        outcome.passed = passed;
        outcome.proxied = true;
        outcome.upstream_status = Some(rsp.status().as_u16());
        Ok(rsp)
    }

    /// Answers a CORS preflight for a route with a CORS policy, without a token and without the upstream.
    fn preflight<'a>(&'a self, req: &Request<RequestBody>, path: &str, outcome: &mut Outcome<'a>) -> Option<Response<Body>> {
        if !cors::is_preflight(req.method(), req.headers()) {
            return None;
        }
        let method = cors::requested_method(req.headers())?;
        let matched = self.config.routes.match_route(&method, path).ok()?;
        let policy = matched.route.cors.as_ref().or(self.config.cors.as_ref())?;
        outcome.route = Some(matched.route);
        Some(cors::preflight(policy, req.headers(), &method).map(|()| Body::empty()))
    }

    /// A local limit decides at once; a shared one asks the store (or its fallback, counted).
    async fn check_limit(
        &self,
        l: &Limiter,
        client: IpAddr,
        principal: Option<&Principal>,
        outcome: &mut Outcome<'_>,
    ) -> Result<(), GatewayError> {
        let caller = l.caller(client, principal.map(|p| (p.issuer_id.as_str(), p.subject.as_str())), |claim| {
            // A number or boolean counts by its JSON text (numeric tenant ids are common); a list or object is no
            // one value to count by.
            principal.and_then(|p| crate::auth::lookup_claim(&p.claims, claim)).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(v.to_string()),
                _ => None,
            })
        });
        let result = match l.is_shared() {
            false => l.check(&l.key_of(&caller)),
            true => {
                let (result, fell_back) = l.check_shared(&caller).await;
                if fell_back {
                    self.metrics.rate_limit_fallback.with_label_values(&[self.metrics_of(outcome).route()]).inc();
                }
                result
            }
        };
        result.map_err(|limited| match limited.store_down {
            true => GatewayError::LimitStoreDown,
            false => {
                outcome.rate_limited = true;
                GatewayError::RateLimited { key: l.settings.key.label(), retry_after_secs: limited.retry_after_secs, limit: limited.limit }
            }
        })
    }

    /// The metrics of the route (or the token endpoint's, or the well-known documents') that answered.
    fn metrics_of(&self, outcome: &Outcome<'_>) -> &RouteMetrics {
        match (outcome.route, outcome.label) {
            (Some(r), _) => self.route_metrics.get(r.index).unwrap_or(&self.unrouted_metrics),
            (None, Some(TOKEN_LABEL)) => &self.token_metrics,
            (None, Some(WELL_KNOWN_LABEL)) => &self.well_known_metrics,
            (None, _) => &self.unrouted_metrics,
        }
    }

    /// Counts a refusal in the metric of the stage that refused.
    fn count_refusal(&self, e: &GatewayError, outcome: &Outcome<'_>) {
        let rm = self.metrics_of(outcome);
        match e {
            GatewayError::Auth(a) => rm.auth_failure(&self.metrics, a.reason()),
            GatewayError::Authz(crate::auth::authz::AuthzError::Issuer(_)) => rm.auth_failure(&self.metrics, "issuer"),
            GatewayError::Authz(crate::auth::authz::AuthzError::Anonymous) => rm.auth_failure(&self.metrics, "missing"),
            GatewayError::Authz(a) => rm.authz_denied(&self.metrics, a.rule()),
            GatewayError::RateLimited { key, .. } => rm.rate_limited(&self.metrics, key),
            GatewayError::Route(_)
            | GatewayError::BodyTooLarge(_)
            | GatewayError::Proxy(_)
            | GatewayError::Token(_)
            | GatewayError::Decision(_)
            | GatewayError::LimitStoreDown => {}
            GatewayError::ClientCert(crate::edge::client_cert::CertError::Binding) => rm.auth_failure(&self.metrics, "cert_binding"),
            GatewayError::ClientCert(_) => rm.authz_denied(&self.metrics, "client_cert"),
        }
    }
}

/// What the answer to a request was, for its spans and its log line.
struct Answered<'a> {
    method: &'a http::Method,
    route: &'a str,
    status: u16,
    http_version: &'static str,
    timing: Timing,
}

/// A sampled request's spans, from what its stages recorded.
fn spans_of(ids: TraceIds, done: &Answered<'_>, outcome: &Outcome<'_>) -> RequestSpans {
    RequestSpans {
        ids,
        timing: done.timing,
        method: done.method.clone(),
        route: done.route.to_string(),
        status: done.status,
        http_version: done.http_version,
        reason: outcome.reason,
        auth: outcome.auth_timing,
        limit: outcome.limit_timing,
        upstream: outcome.upstream.zip(outcome.upstream_timing).map(|(name, timing)| UpstreamCall {
            upstream: name.to_string(),
            timing,
            status: outcome.upstream_status,
            error: outcome.upstream_status.is_none().then_some(outcome.reason.unwrap_or("upstream_error")),
        }),
    }
}

fn version_text(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "other",
    }
}

fn has_body(req: &Request<RequestBody>) -> bool {
    !matches!(req.body(), RequestBody::Empty)
        && (declared_length(req).is_some_and(|n| n > 0) || req.headers().contains_key(header::TRANSFER_ENCODING))
}

/// A declared body over the limit is refused before anything else is done with the request.
fn check_declared_length(req: &Request<RequestBody>, max_body: u64) -> Result<(), GatewayError> {
    match declared_length(req) {
        Some(len) if len > max_body => Err(GatewayError::BodyTooLarge(len)),
        _ => Ok(()),
    }
}

fn declared_length(req: &Request<RequestBody>) -> Option<u64> {
    // Our own HTTP/1 codec passes on only requests framed without a body.
    if matches!(req.body(), RequestBody::Empty) {
        return None;
    }
    req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// The route's rules on the connection's client certificate (mTLS), before any token is looked at.
fn check_client_cert(route: &Route, cert: Option<&ClientCert>) -> Result<(), GatewayError> {
    match &route.client_cert {
        Some(policy) => policy.check(cert).map_err(GatewayError::ClientCert),
        None => Ok(()),
    }
}

/// A certificate-bound token (RFC 8705 §3) over a connection with another certificate, or none, is refused.
fn check_binding(principal: Option<&Principal>, cert: Option<&ClientCert>) -> Result<(), GatewayError> {
    match principal {
        Some(p) => client_cert::check_binding(&p.claims, cert).map_err(GatewayError::ClientCert),
        None => Ok(()),
    }
}
