//! Forwarding one request to a target of its upstream: the own HTTP/1.1 client (`h1::client`) for bodiless
//! requests to plain-http HTTP/1.1 targets, hyper's pooled client for the rest (bodies, upgrades, HTTP/2, https),
//! the route's retries on other targets, timeouts, and the byte pipe after a successful upgrade (WebSocket).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::auth::extract::{has_param, strip_query_token};
use crate::auth::TokenSources;
use crate::body::{Body, Place, Progress, RequestBody};
use crate::edge::headers_request::IdentitySettings;
use crate::edge::headers_request::UpstreamFields;
use crate::edge::headers_response::{finish_response, AnswerFields, SecureHeaders};
use crate::h1::answer::ResponseBody;
use crate::h1::client::{self, H1Error};

use super::retry::{Budget, Failure, RetryPolicy};
use super::{Balance, Protocol, Target, Upstream};

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream {upstream}: connect failed: {source}")]
    Connect {
        upstream: String,
        #[source]
        source: Source,
    },
    #[error("upstream {upstream}: no response within {timeout:?}")]
    Timeout { upstream: String, timeout: std::time::Duration },
    #[error("upstream {upstream}: request failed: {source}")]
    Reset {
        upstream: String,
        #[source]
        source: Source,
    },
    #[error("request body exceeded the limit while streaming")]
    BodyTooLarge,
    /// The client's own body broke off or was malformed (a bad chunk, a close before its end): not the upstream's
    /// doing, so not a 502 nor an upstream error in the metrics.
    #[error("the client's request body failed: {0}")]
    ClientBody(String),
    /// The client sent nothing more of its body for this long: its doing, not the upstream's.
    #[error("the client's request body stalled: nothing for {0:?}")]
    ClientTimeout(std::time::Duration),
    #[error("upstream switched protocols without being asked to")]
    UnexpectedUpgrade,
    #[error("upstream {upstream}: status {status} is outside 100-599")]
    BadStatus { upstream: String, status: u16 },
    #[error("cannot build the upstream URI: {0}")]
    Uri(#[from] http::Error),
    /// Every place in the upstream's `max_connections` stayed taken for `queue_timeout`.
    #[error("upstream {upstream}: all max_connections in use for {waited:?}")]
    Saturated { upstream: String, waited: Duration },
}

impl ProxyError {
    /// Names the upstream failure kind for metrics (`connect`, `timeout`, `reset`); None when the upstream is
    /// not at fault (the client's body was too large, or its URI could not be forwarded).
    pub fn kind(&self) -> Option<&'static str> {
        match self {
            ProxyError::Connect { .. } => Some("connect"),
            ProxyError::Timeout { .. } => Some("timeout"),
            ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade | ProxyError::BadStatus { .. } => Some("reset"),
            ProxyError::Saturated { .. } => Some("saturated"),
            ProxyError::BodyTooLarge | ProxyError::ClientBody(_) | ProxyError::ClientTimeout(_) | ProxyError::Uri(_) => None,
        }
    }
}

/// The query forwarded upstream: as sent, less every token parameter (the route's, and `access_token`): a token in
/// the URL is never forwarded, verified or not.
pub fn forwarded_query<'a>(query: Option<&'a str>, sources: &TokenSources) -> Option<Cow<'a, str>> {
    let mut out = Cow::Borrowed(query?);
    for name in sources.query_names() {
        if has_param(&out, name) {
            out = Cow::Owned(strip_query_token(&out, name)?);
        }
    }
    Some(out)
}

/// Points a request at a target: scheme and authority of the target, the routed path, the query as forwarded.
/// With `preserve_host` the client's `Host` is sent; otherwise the target's configured host (its name, when the
/// connection goes to one of its addresses).
pub fn rewrite_uri(
    req: &mut Request<Body>,
    scheme: &http::uri::Scheme,
    target: &Target,
    preserve_host: bool,
    path: &str,
    query: Option<&str>,
    client_host: Option<HeaderValue>,
) -> Result<(), ProxyError> {
    let pq = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .map_err(http::Error::from)?;
    let uri = Uri::builder().scheme(scheme.clone()).authority(target.connect.clone()).path_and_query(pq).build()?;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    let host = match (preserve_host, client_host) {
        (true, Some(h)) => Some(h),
        // hyper sets Host from the URI's authority when the header is absent.
        _ if target.host == target.connect => None,
        _ => HeaderValue::from_str(target.host.as_str()).ok(),
    };
    match host {
        Some(h) => {
            req.headers_mut().insert(http::header::HOST, h);
        }
        None => {
            req.headers_mut().remove(http::header::HOST);
        }
    }
    Ok(())
}

/// The error of a failed exchange of the own HTTP/1 client.
fn lean_error(up: &Upstream, timeout: Duration, e: H1Error) -> ProxyError {
    let name = &up.settings.name;
    match e {
        H1Error::Timeout => ProxyError::Timeout { upstream: name.clone(), timeout },
        H1Error::UnexpectedUpgrade => ProxyError::UnexpectedUpgrade,
        e @ (H1Error::Connect(_) | H1Error::ConnectTimeout(_)) => ProxyError::Connect { upstream: name.clone(), source: e.into() },
        e => ProxyError::Reset { upstream: name.clone(), source: e.into() },
    }
}

/// A request readied for its upstream by the policy stages.
pub struct Outbound<'a> {
    pub parts: http::request::Parts,
    pub body: RequestBody,
    /// The routed path, and the query as forwarded.
    pub path: &'a str,
    pub query: Option<Cow<'a, str>>,
    /// The authority the client addressed (the `Host` sent with `preserve_host`).
    pub host: Option<HeaderValue>,
    /// Fields to add after the map's (none of their names is in it).
    pub additions: UpstreamFields<'a>,
    /// An HTTP/1.1 upgrade (WebSocket): on a 101 the two connections are joined.
    pub upgrading: bool,
    /// The route's answer rules: the own client leaves out the fields they remove as it parses.
    pub answer_rules: &'a SecureHeaders,
    pub max_body: u64,
    /// Request trailers are checked against it: a client cannot forge its identity there either.
    pub identity: &'a Arc<IdentitySettings>,
}

/// How one request is sent: the time its answer's head may take (retries included), its retries with the route's
/// budget, and its balancing key.
pub struct Call<'a> {
    pub timeout: Duration,
    /// `timeout` is the client's own deadline (`grpc-timeout`), shorter than the route's.
    pub client_deadline: bool,
    pub retries: Option<(&'a RetryPolicy, &'a Budget)>,
    pub key: Option<u64>,
}

/// An answer as it came from a target, before it is given the exchange's place.
enum Raw {
    Lean(Response<ResponseBody>, AnswerFields),
    Hyper(Response<Incoming>),
}

impl Raw {
    fn status(&self) -> StatusCode {
        match self {
            Raw::Lean(r, _) => r.status(),
            Raw::Hyper(r) => r.status(),
        }
    }

    /// The answer for the client: its body holds the place (and stalls after `stall` without bytes).
    fn into_answer(self, place: Place, stall: Duration) -> (Response<Body>, AnswerFields) {
        match self {
            Raw::Lean(rsp, fields) => (rsp.map(|b| Body::Upstream(b, place)), fields),
            Raw::Hyper(rsp) => (rsp.map(|b| Body::Stream(b, crate::h1::deadline::Stall::new(stall), place)), AnswerFields::default()),
        }
    }
}

/// The failure an error is, for retries and passive health; None when the target is not at fault (the client's
/// body failed or was too large).
fn failure_of(e: &ProxyError) -> Option<Failure> {
    match e {
        ProxyError::Connect { .. } => Some(Failure::Connect),
        ProxyError::Timeout { .. } => Some(Failure::Timeout),
        ProxyError::Reset { .. } | ProxyError::UnexpectedUpgrade | ProxyError::BadStatus { .. } => Some(Failure::Reset),
        _ => None,
    }
}

/// Sends the request to a target of `up` and returns the answer once its head has arrived (within `call.timeout`
/// of `sent`), with the upstream's own fields still in the lines of its head where the own HTTP/1 client read it.
/// A failure the route retries goes to another target while the budget allows. The target of the last attempt
/// goes into `sent_to` (an out-parameter: the answer is large, and is moved once less).
pub async fn forward(
    up: &Upstream,
    out: Outbound<'_>,
    call: &Call<'_>,
    sent: Instant,
    sent_to: &mut Option<Arc<Target>>,
) -> Result<(Response<Body>, AnswerFields), ProxyError> {
    let Some(mut place) = up.places.take(up.settings.queue_timeout).await else {
        return Err(ProxyError::Saturated { upstream: up.settings.name.clone(), waited: up.settings.queue_timeout });
    };
    // None: a timeout beyond any clock, which only a retry would ever look at.
    let deadline = sent.checked_add(call.timeout);
    // CONNECT: a 2xx answer turns the upstream connection into a tunnel, never back into HTTP.
    let bodiless = !out.upgrading && out.parts.method != Method::CONNECT && http_body::Body::is_end_stream(&out.body);
    let retries = call.retries.filter(|_| bodiless);
    if let Some((_, budget)) = call.retries {
        budget.deposit();
    }
    let counted = up.settings.balance == Balance::LeastRequest;
    let no_target = || {
        let source = std::io::Error::other("the upstream has no target");
        Err(ProxyError::Connect { upstream: up.settings.name.clone(), source: source.into() })
    };
    let mut tried: Vec<Arc<Target>> = Vec::new();
    loop {
        let Some(target) = up.pick(call.key, &tried) else { return no_target() };
        if counted {
            place.count_in(&target.in_flight);
        }
        // The first attempt counts from `sent`; a retry has what is left of the route's timeout.
        let (timeout, now) = match tried.is_empty() {
            true => (call.timeout, sent),
            false => (deadline.map_or(call.timeout, |d| d.saturating_duration_since(Instant::now())), Instant::now()),
        };
        // One call site of the own client's exchange, inlined here. hyper's exchanges are large futures and boxed,
        // so the common case does not carry their size; `out` stays where it is (a second slot for it would make
        // this future, moved on every request, half a kilobyte larger).
        let result = match lean_for(&target, &out) {
            Some(lean) => match lean.send(&lean_head(up, &out), timeout, now).await {
                Ok((rsp, fields)) => Ok(Raw::Lean(rsp, fields)),
                Err(e) => Err(lean_error(up, timeout, e)),
            },
            None if retries.is_some() => Box::pin(send_bodiless(up, &target, &out, timeout)).await,
            None => {
                // Sent once, body and all: never retried.
                let result = Box::pin(send(up, &target, out, timeout)).await;
                account(up, &target, &result.as_ref().map(Raw::status), call.client_deadline);
                *sent_to = Some(target);
                return result.map(|raw| raw.into_answer(place, call.timeout));
            }
        };
        let failure = account(up, &target, &result.as_ref().map(Raw::status), call.client_deadline);
        // No time left: a retry would only time out, and count against a target that did nothing wrong.
        let time_left = deadline.is_none_or(|d| Instant::now() < d);
        if let (Some((policy, budget)), Some(f), true) = (retries, failure, time_left) {
            // A failure the route does not name, or a 5xx it does not list, is the answer.
            if (tried.len() as u32) < policy.attempts && policy.allows(f, &out.parts.method) && budget.withdraw() {
                up.metrics.upstream_retries.with_label_values(&[&up.settings.name, f.label()]).inc();
                tracing::debug!(upstream = %up.settings.name, target = %target.label, reason = f.label(), "retrying on another target");
                tried.push(target);
                continue;
            }
        }
        *sent_to = Some(target);
        return result.map(|raw| raw.into_answer(place, call.timeout));
    }
}

/// Counts one attempt with `t` and feeds its passive health; returns its failure (a gateway failure, or an
/// answer of 502, 503 or 504), None when the target answered otherwise or is not at fault. A timeout under a
/// deadline the client chose (`grpc-timeout`) says nothing of the target: a client could eject targets with
/// `grpc-timeout: 1n`.
fn account(up: &Upstream, t: &Target, result: &Result<StatusCode, &ProxyError>, client_deadline: bool) -> Option<Failure> {
    let failure = match result {
        Ok(status) => {
            let status = status.as_u16();
            t.count(Some(status));
            matches!(status, 502..=504).then_some(Failure::Status(status))
        }
        Err(e) => {
            let f = failure_of(e);
            if f.is_some() {
                t.count(None);
            }
            f
        }
    };
    if !(client_deadline && failure == Some(Failure::Timeout)) {
        up.observe(t, failure.is_some());
    }
    failure
}

/// The own client of `t`, when it can carry this request: bodiless, no upgrade, a target it can write.
fn lean_for<'t>(t: &'t Target, out: &Outbound<'_>) -> Option<&'t client::Client> {
    t.lean.as_ref().filter(|_| {
        // CONNECT: a 2xx answer turns the upstream connection into a tunnel, never back into HTTP.
        !out.upgrading
            && out.parts.method != Method::CONNECT
            && http_body::Body::is_end_stream(&out.body)
            && client::is_safe_target(out.path, out.query.as_deref())
    })
}

/// The own client's head of a bodiless request.
fn lean_head<'o>(up: &Upstream, out: &'o Outbound<'_>) -> client::Head<'o> {
    client::Head {
        method: &out.parts.method,
        path: out.path,
        query: out.query.as_deref(),
        headers: &out.parts.headers,
        additions: &out.additions,
        host: out.host.as_ref().filter(|_| up.settings.preserve_host),
        answer_rules: out.answer_rules,
    }
}

/// Sends a bodiless request that may be sent again (a retried one) over hyper's client: nothing of `out` is used
/// up.
async fn send_bodiless(up: &Upstream, t: &Target, out: &Outbound<'_>, timeout: Duration) -> Result<Raw, ProxyError> {
    let mut req = Request::new(Body::empty());
    *req.method_mut() = out.parts.method.clone();
    *req.headers_mut() = out.parts.headers.clone();
    out.additions.insert_into(req.headers_mut());
    rewrite_uri(&mut req, &up.settings.scheme, t, up.settings.preserve_host, out.path, out.query.as_deref(), out.host.clone())?;
    let mut rsp = forward_hyper(up, t, req, None, timeout).await?;
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return Err(ProxyError::UnexpectedUpgrade);
    }
    finish_response(rsp.headers_mut(), false);
    Ok(Raw::Hyper(rsp))
}

/// Sends the request once over hyper's client, its body streamed as it comes (bodies, upgrades, HTTP/2, https).
async fn send(up: &Upstream, t: &Target, mut out: Outbound<'_>, timeout: Duration) -> Result<Raw, ProxyError> {
    let client_upgrade = out.upgrading.then(|| out.parts.extensions.remove::<hyper::upgrade::OnUpgrade>()).flatten();
    let Outbound { mut parts, body, path, query, host, additions, max_body, identity, .. } = out;
    additions.insert_into(&mut parts.headers);
    // The client's framing went with the hop-by-hop fields. hyper's client frames a body of unknown length as
    // chunked, except on GET, HEAD and CONNECT, where it sends none at all: said outright, the body the client
    // sent reaches the upstream whatever the method. (HTTP/2 has no chunking; hyper leaves the field out there.)
    let has_body = !http_body::Body::is_end_stream(&body);
    if has_body && !parts.headers.contains_key(header::CONTENT_LENGTH) && up.settings.protocol == Protocol::Http1 {
        parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    // gRPC servers check for `te: trailers` (the client's went with the hop-by-hop fields): it says this hop passes
    // trailers, which HTTP/2 to the target does.
    if up.settings.protocol != Protocol::Http1 && super::grpc::is_grpc(&parts.headers) {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // A body's progress moves the exchange's deadline (see `forward_hyper`).
    let progress = has_body.then(|| Arc::new(Progress::new()));
    let body = match &progress {
        Some(p) => Body::limited_with_progress(body, max_body, identity.clone(), p.clone()),
        None => Body::limited(body, max_body, identity.clone()),
    };
    let mut up_req = Request::from_parts(parts, body);
    rewrite_uri(&mut up_req, &up.settings.scheme, t, up.settings.preserve_host, path, query.as_deref(), host)?;
    let mut rsp = forward_hyper(up, t, up_req, progress.as_deref(), timeout).await?;
    let upgraded = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        match client_upgrade {
            Some(client) => splice_upgrade(client, hyper::upgrade::on(&mut rsp)),
            None => return Err(ProxyError::UnexpectedUpgrade),
        }
    }
    // The own client's answers come without hop-by-hop fields; hyper's keep them.
    finish_response(rsp.headers_mut(), upgraded);
    Ok(Raw::Hyper(rsp))
}

/// Sends the request over the target's pooled hyper client and waits for the response head, bounded by
/// `timeout`: counted from the start for a bodiless request, and for one with a body (`progress`) from when the
/// body last moved, so an upload slower than `timeout` is not cut while it keeps coming.
async fn forward_hyper(
    up: &Upstream,
    t: &Target,
    mut req: Request<Body>,
    progress: Option<&Progress>,
    timeout: Duration,
) -> Result<Response<Incoming>, ProxyError> {
    let name = &up.settings.name;
    if up.settings.protocol == Protocol::H2 {
        *req.version_mut() = Version::HTTP_2;
    }
    let answered = match progress {
        None => tokio::time::timeout(timeout, t.client.request(req)).await.ok(),
        Some(p) => {
            let request = t.client.request(req);
            tokio::pin!(request);
            loop {
                // A new timer only when one fires while the body is still moving (once per `timeout` at most).
                match tokio::time::timeout_at(p.deadline(timeout), &mut request).await {
                    Ok(answer) => break Some(answer),
                    Err(_) if tokio::time::Instant::now() < p.deadline(timeout) => continue,
                    Err(_) if p.waiting_on_client() => return Err(ProxyError::ClientTimeout(timeout)),
                    Err(_) => break None,
                }
            }
        }
    };
    match answered {
        None => Err(ProxyError::Timeout { upstream: name.clone(), timeout }),
        // RFC 9110 §15 defines the classes 1xx-5xx; a client has no way to read "799", and each such status
        // would be a metrics series of its own.
        Some(Ok(rsp)) if rsp.status().as_u16() >= 600 => {
            Err(ProxyError::BadStatus { upstream: name.clone(), status: rsp.status().as_u16() })
        }
        Some(Ok(rsp)) => Ok(rsp),
        Some(Err(e)) if e.is_connect() => Err(ProxyError::Connect { upstream: name.clone(), source: e.into() }),
        Some(Err(e)) => {
            // A failure of the request body hyper was sending is the gateway's own body type, under hyper's error.
            let body_error = std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<hyper::Error>())
                .and_then(std::error::Error::source)
                .and_then(|s| s.downcast_ref::<crate::body::BodyError>());
            match body_error {
                Some(crate::body::BodyError::TooLarge) => Err(ProxyError::BodyTooLarge),
                // The request body is only ever the client's: its stream's failure is the client's doing.
                Some(crate::body::BodyError::Hyper(client)) => Err(ProxyError::ClientBody(client.to_string())),
                _ => Err(ProxyError::Reset { upstream: name.clone(), source: e.into() }),
            }
        }
    }
}

/// Joins the client's and the upstream's upgraded connections and copies bytes both ways until either closes.
/// The client's connection keeps its places in the connection limits until the pipe ends: they live with it.
fn splice_upgrade(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(error = %e, "upgraded connection ended with an error");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
}
