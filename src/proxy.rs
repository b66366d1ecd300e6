//! Forwarding to an upstream: the own HTTP/1.1 client (`h1::client`) for bodiless requests to http upstreams,
//! hyper's pooled client for the rest (bodies, upgrades, https), timeouts, and the byte pipe after a successful
//! upgrade (WebSocket).

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::auth::extract::{has_param, strip_query_token};
use crate::auth::TokenSources;
use crate::body::{Body, Place, Places, Progress, RequestBody};
use crate::edge::headers_request::IdentitySettings;
use crate::edge::headers_request::UpstreamFields;
use crate::edge::headers_response::{finish_response, AnswerFields, SecureHeaders};
use crate::h1::client::{self, H1Error};

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

/// A checked upstream: a parsed http(s) origin and its timeouts.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSettings {
    pub name: String,
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub preserve_host: bool,
    /// PEM CA certificates trusted for this https upstream, beside the system roots.
    pub ca: Option<CaFile>,
    /// Requests in flight to this upstream (each holds one connection until its answer's body ends).
    pub max_connections: usize,
    /// How long a request waits for one of those places before it is answered 503.
    pub queue_timeout: Duration,
}

/// A CA file as read at load: its contents are part of the settings, so a reload after the file changed in place
/// builds the upstream anew (an unchanged upstream keeps its pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

/// An upstream and its connection pools.
pub struct Upstream {
    pub settings: UpstreamSettings,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// The lean client, for plain-http upstreams.
    pub lean: Option<client::Client>,
    /// Places for requests in flight (`max_connections`): an exchange holds one until its answer's body ends, so
    /// no client (an HTTP/2 connection's streams included) can make the gateway open connections without bound.
    places: Arc<Places>,
}

impl Upstream {
    /// Builds the pooled client for an upstream (TLS to https upstreams verifies against `tls`'s roots).
    pub fn new(settings: UpstreamSettings, tls: &Arc<rustls::ClientConfig>) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_keepalive(Some(std::time::Duration::from_secs(60)));
        let connector =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config((**tls).clone()).https_or_http().enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .pool_max_idle_per_host(settings.max_connections.min(1024))
            .set_host(true)
            .build(connector);
        let lean = (settings.scheme == http::uri::Scheme::HTTP)
            .then(|| client::Client::new(&settings.authority, settings.connect_timeout))
            .flatten();
        let places = Arc::new(Places::new(settings.max_connections));
        Upstream { settings, client, lean, places }
    }
}

/// Builds the TLS client config for https upstreams: system roots, plus the upstream's own CA file.
pub fn upstream_tls(ca: Option<&CaFile>) -> Result<Arc<rustls::ClientConfig>, crate::tls_client::ClientTlsError> {
    crate::tls_client::client_config(ca.map(|c| (c.path.as_path(), &c.pem[..]))).map(Arc::new)
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

/// Points a request at the upstream: scheme and authority from the config, the routed path, the query as
/// forwarded. With `preserve_host = false` the upstream's authority becomes the `Host`.
pub fn rewrite_uri(
    req: &mut Request<Body>,
    up: &UpstreamSettings,
    path: &str,
    query: Option<&str>,
    client_host: Option<HeaderValue>,
) -> Result<(), ProxyError> {
    let pq = match query {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .map_err(http::Error::from)?;
    let uri = Uri::builder().scheme(up.scheme.clone()).authority(up.authority.clone()).path_and_query(pq).build()?;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    match (up.preserve_host, client_host) {
        (true, Some(h)) => {
            req.headers_mut().insert(http::header::HOST, h);
        }
        _ => {
            // hyper sets Host from the URI's authority when the header is absent.
            req.headers_mut().remove(http::header::HOST);
        }
    }
    Ok(())
}

/// The error of a failed exchange of the own HTTP/1 client.
fn lean_error(up: &Upstream, e: H1Error) -> ProxyError {
    let name = &up.settings.name;
    match e {
        H1Error::Timeout => ProxyError::Timeout { upstream: name.clone(), timeout: up.settings.timeout },
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

/// Sends the request and returns the answer once its head has arrived (within the upstream's `timeout` of
/// `sent`), with the upstream's own fields still in the lines of its head where the own HTTP/1 client read it.
/// Bodiless requests to http upstreams take that client; bodies, upgrades and https take hyper's pooled one.
pub async fn forward(up: &Upstream, mut out: Outbound<'_>, sent: Instant) -> Result<(Response<Body>, AnswerFields), ProxyError> {
    let Some(place) = up.places.take(up.settings.queue_timeout).await else {
        return Err(ProxyError::Saturated { upstream: up.settings.name.clone(), waited: up.settings.queue_timeout });
    };
    let lean = up.lean.as_ref().filter(|_| {
        // CONNECT: a 2xx answer turns the upstream connection into a tunnel, never back into HTTP.
        !out.upgrading
            && out.parts.method != Method::CONNECT
            && http_body::Body::is_end_stream(&out.body)
            && client::is_safe_target(out.path, out.query.as_deref())
    });
    if let Some(lean) = lean {
        let head = client::Head {
            method: &out.parts.method,
            path: out.path,
            query: out.query.as_deref(),
            headers: &out.parts.headers,
            additions: &out.additions,
            host: out.host.as_ref().filter(|_| up.settings.preserve_host),
            answer_rules: out.answer_rules,
        };
        return match lean.send(&head, up.settings.timeout, sent).await {
            Ok((rsp, fields)) => Ok((rsp.map(|b| Body::Upstream(b, place)), fields)),
            Err(e) => Err(lean_error(up, e)),
        };
    }
    let client_upgrade = out.upgrading.then(|| out.parts.extensions.remove::<hyper::upgrade::OnUpgrade>()).flatten();
    let Outbound { mut parts, body, path, query, host, additions, max_body, identity, .. } = out;
    additions.insert_into(&mut parts.headers);
    // The client's framing went with the hop-by-hop fields. hyper's client frames a body of unknown length as
    // chunked, except on GET, HEAD and CONNECT, where it sends none at all: said outright, the body the client
    // sent reaches the upstream whatever the method.
    let has_body = !http_body::Body::is_end_stream(&body);
    if has_body && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        parts.headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    // A body's progress moves the exchange's deadline (see `forward_hyper`).
    let progress = has_body.then(|| Arc::new(Progress::new()));
    let body = match &progress {
        Some(p) => Body::limited_with_progress(body, max_body, identity.clone(), p.clone()),
        None => Body::limited(body, max_body, identity.clone()),
    };
    let mut up_req = Request::from_parts(parts, body);
    rewrite_uri(&mut up_req, &up.settings, path, query.as_deref(), host)?;
    let mut rsp = forward_hyper(up, up_req, progress.as_deref(), place).await?;
    let upgraded = rsp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if upgraded {
        match client_upgrade {
            Some(client) => splice_upgrade(client, hyper::upgrade::on(&mut rsp)),
            None => return Err(ProxyError::UnexpectedUpgrade),
        }
    }
    // The own client's answers come without hop-by-hop fields; hyper's keep them.
    finish_response(rsp.headers_mut(), upgraded);
    Ok((rsp, AnswerFields::default()))
}

/// Sends the request over hyper's pooled client and waits for the response head, bounded by the upstream's
/// `timeout`: counted from the start for a bodiless request, and for one with a body (`progress`) from when the
/// body last moved, so an upload slower than `timeout` is not cut while it keeps coming.
async fn forward_hyper(up: &Upstream, req: Request<Body>, progress: Option<&Progress>, place: Place) -> Result<Response<Body>, ProxyError> {
    let name = &up.settings.name;
    let timeout = up.settings.timeout;
    let answered = match progress {
        None => tokio::time::timeout(timeout, up.client.request(req)).await.ok(),
        Some(p) => {
            let request = up.client.request(req);
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
        Some(Ok(rsp)) => Ok(rsp.map(|b| Body::Stream(b, crate::h1::deadline::Stall::new(up.settings.timeout), place))),
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
