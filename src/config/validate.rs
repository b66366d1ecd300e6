//! The top of validation: listeners, TLS, limits, upstreams, issuers, the token endpoint, limits, secure headers,
//! CORS and identity, each turned into its stage's settings type with every problem located.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use crate::edge::client_addr::Cidr;
use crate::edge::cors::CorsPolicy;
use crate::edge::headers_request::IdentitySettings;
use crate::edge::headers_response::SecureHeaders;
use crate::edge::ratelimit::{LimitKey, LimitSettings};
use crate::telemetry::{TracingSettings, TrustIncoming};
use crate::upstream::health::ActiveCheck;
use crate::upstream::{Balance, CaFile, HealthSettings, Protocol, TargetSpec, UpstreamSettings};

use super::file::*;
use super::units::DurationValue;
use super::*;

/// The upstream and issuer names the file declares, valid or not. A table that failed, to deserialize or to
/// validate, has its problem reported where it is written; what names it is not told again that it does not exist.
pub(super) struct Declared {
    upstreams: HashSet<String>,
    /// `upstreams` could not be read as a table: any name may have been declared.
    any_upstream: bool,
    issuers: HashSet<String>,
    /// An `[[issuers]]` entry failed before its id could be read: any id may have been declared.
    any_issuer: bool,
}

impl Declared {
    pub(super) fn upstream(&self, name: &str) -> bool {
        self.any_upstream || self.upstreams.contains(name)
    }

    pub(super) fn issuer(&self, id: &str) -> bool {
        self.any_issuer || self.issuers.contains(id)
    }

    /// Whether the file declares no issuer at all.
    pub(super) fn no_issuers(&self) -> bool {
        !self.any_issuer && self.issuers.is_empty()
    }
}

impl Validator<'_> {
    pub(super) fn addr(&mut self, s: &Option<Spanned<String>>) -> Option<SocketAddr> {
        let s = s.as_ref()?;
        match s.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(s.span(), format!("invalid listen address {:?}: expected IP:PORT", s.get_ref()));
                None
            }
        }
    }

    pub(super) fn config(&mut self, path: &Path, f: FileConfig) -> Config {
        // A [listen] that failed to deserialize has its problem reported already (missing, or what is wrong in it).
        let mut listen = Listen { https: None, http: None, admin: None, decisions: None };
        let mut decisions_span = None;
        let mut https_span = None;
        if let Some(l) = f.listen {
            let listen_span = l.span();
            let l = l.into_inner();
            listen = Listen {
                https: self.addr(&l.https),
                http: self.addr(&l.http),
                admin: self.addr(&l.admin),
                decisions: self.addr(&l.decisions),
            };
            decisions_span = l.decisions.as_ref().map(Spanned::span);
            if l.https.is_none() && l.http.is_none() {
                self.error(listen_span, "[listen] needs `https` or `http`");
            }
            https_span = l.https.as_ref().map(Spanned::span);
        }
        let tls = f.tls.map(|t| self.tls(t));
        // A [tls] that failed to deserialize is reported already.
        if let (Some(span), None, false) = (https_span, &tls, f.failed.tls) {
            self.error(span, "`listen.https` needs a [tls] section");
        }
        let d = |v: Option<DurationValue>, default: u64| v.map_or(Duration::from_secs(default), |d| d.0);
        let max_header_bytes = f.limits.max_header_bytes.map_or(32 * 1024, |s| s.0);
        let lf = &f.limits;
        let idle = lf.idle_timeout.as_ref().map_or(Duration::from_secs(60), |d| d.get_ref().0);
        let limits = ConnectionLimits {
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            max_body_bytes: lf.max_body_bytes.map_or(10 * 1024 * 1024, |s| s.0),
            header_read_timeout: lf.header_read_timeout.as_ref().map_or(Duration::from_secs(10), |d| d.get_ref().0),
            idle: IdleBounds { keep_alive: idle, connection: idle, send_stall: idle },
            max_connections: lf.max_connections.as_ref().map_or(10_000, |n| *n.get_ref()),
            max_connections_per_client: lf.max_connections_per_client.as_ref().map_or(1_000, |n| *n.get_ref()),
            max_requests_per_client: lf.max_requests_per_client.as_ref().map_or(256, |n| *n.get_ref()),
            max_concurrent_streams: lf.max_concurrent_streams.as_ref().map_or(128, |n| *n.get_ref()),
            drain_timeout: d(lf.drain_timeout, 30),
        };
        for (name, d) in [("idle_timeout", &lf.idle_timeout), ("header_read_timeout", &lf.header_read_timeout)] {
            if let Some(d) = d.as_ref().filter(|d| d.get_ref().0.is_zero()) {
                self.error(d.span(), format!("`limits.{name}` must be more than 0"));
            }
        }
        let streams = lf.max_concurrent_streams.as_ref().map(|s| Spanned::new(s.span(), usize::try_from(*s.get_ref()).unwrap_or(1)));
        for (name, n) in [
            ("max_connections_per_client", &lf.max_connections_per_client),
            ("max_connections", &lf.max_connections),
            ("max_requests_per_client", &lf.max_requests_per_client),
            ("max_concurrent_streams", &streams),
        ] {
            if let Some(n) = n.as_ref().filter(|n| *n.get_ref() == 0) {
                self.error(n.span(), format!("`limits.{name}` must be at least 1"));
            }
        }
        let mut upstreams = BTreeMap::new();
        let upstream_names: HashSet<String> = f.upstreams.keys().cloned().chain(f.failed.upstreams).collect();
        for (name, u) in f.upstreams {
            if let Some(u) = self.upstream(&name, u) {
                upstreams.insert(name, u);
            }
        }
        let mut trusted_proxies = Vec::new();
        for t in &f.rate_limit.trusted_proxies {
            match t.get_ref().parse::<Cidr>() {
                Ok(c) => trusted_proxies.push(c),
                Err(e) => self.error(t.span(), e),
            }
        }
        let forwarded_from = match f.rate_limit.forwarded_header.as_ref().map(|h| (h.span(), h.get_ref().to_ascii_lowercase())) {
            None => crate::edge::client_addr::ForwardedFrom::XForwardedFor,
            Some((_, h)) if h == "x-forwarded-for" => crate::edge::client_addr::ForwardedFrom::XForwardedFor,
            Some((_, h)) if h == "forwarded" => crate::edge::client_addr::ForwardedFrom::Forwarded,
            Some((span, h)) => {
                self.error(span, format!("[rate_limit] forwarded_header {h:?} must be \"x-forwarded-for\" or \"forwarded\""));
                crate::edge::client_addr::ForwardedFrom::XForwardedFor
            }
        };
        let mut issuers = Vec::new();
        let mut issuer_ids = HashSet::new();
        let mut issuer_urls = HashSet::new();
        for i in f.issuers {
            let span = i.span();
            // Counted even when invalid, so one bad issuer does not make every route that names it an error too.
            if !issuer_ids.insert(i.get_ref().id().to_string()) {
                self.error(span.clone(), format!("issuer id {:?} is used twice", i.get_ref().id()));
            }
            if let Some(settings) = super::issuers::validate_issuer(self, span.clone(), i.into_inner()) {
                // Tokens pick their issuer by `iss`: two entries for one `iss` would silently shadow each other.
                if !issuer_urls.insert(settings.issuer.clone()) {
                    self.error(span.clone(), format!("issuer {:?} is configured twice", settings.issuer));
                }
                // An opaque token says nothing of its issuer: with two endpoints, which one to ask would be a guess.
                if settings.introspection.is_some() && issuers.iter().any(|i: &IssuerSettings| i.introspection.is_some()) {
                    self.error(span, "only one issuer may be kind = \"introspection\"");
                }
                issuers.push(settings);
            }
        }
        let identity = match f.identity {
            Some(i) => Arc::new(self.identity(i)),
            None => Arc::default(),
        };
        let declared = Declared {
            upstreams: upstream_names,
            any_upstream: f.failed.all_upstreams,
            issuers: issuer_ids.into_iter().chain(f.failed.issuers).collect(),
            any_issuer: f.failed.unnamed_issuer,
        };
        let store_written = f.store.is_some();
        let store = f.store.and_then(|s| self.store(s));
        self.store_failed = f.failed.store || (store_written && store.is_none());
        self.store_replicas = store.as_ref().map(|s| s.expected_replicas);
        let token_endpoint_span = f.token_endpoint.as_ref().map(Spanned::span);
        let token_endpoint = f.token_endpoint.and_then(|t| self.token_endpoint(t, &mut issuers, &declared, limits.header_read_timeout));
        let global_limit = f.rate_limit.global.as_ref().and_then(|l| self.limit(l, true));
        let ipv6_prefix = f.rate_limit.ipv6_prefix.as_ref().map_or(64, |p| *p.get_ref());
        if let Some(p) = f.rate_limit.ipv6_prefix.as_ref().filter(|p| *p.get_ref() > 128) {
            self.error(p.span(), format!("[rate_limit] ipv6_prefix {ipv6_prefix} is longer than an IPv6 address (128 bits)"));
        }
        let ipv6_prefix = ipv6_prefix.min(128);
        let global_headers_file = f.headers.map(|h| (h.span(), h.into_inner()));
        let global_headers = Arc::new(self.secure_headers(global_headers_file.as_ref(), None));
        let global_cors_file = f.cors.map(|c| (c.span(), c.into_inner()));
        let global_cors = global_cors_file.as_ref().and_then(|(span, c)| self.cors(span.clone(), c)).map(Arc::new);
        self.route_headers_base = global_headers_file;
        let admin_token = match f.admin.as_ref().and_then(|a| a.get_ref().token_env.as_ref().map(|v| (a.span(), v))) {
            None => None,
            Some((span, var)) => match std::env::var(var) {
                Ok(t) if t.len() >= 16 => Some(Arc::new(t)),
                Ok(_) => {
                    self.error(span, format!("[admin] token_env {var}: the token must be at least 16 characters"));
                    None
                }
                Err(_) => {
                    self.error(span, format!("[admin] token_env: environment variable {var} is not set"));
                    None
                }
            },
        };
        let tracing = f.tracing.and_then(|t| self.tracing(t)).map(Arc::new);
        let forward_auth = f.forward_auth.and_then(|fa| self.forward_auth(fa.get_ref()));
        if let (Some(span), None) = (decisions_span, &forward_auth) {
            self.error(span, "`listen.decisions` needs a [forward_auth] section");
        }
        self.default_cookie = f.auth.token_cookie.clone();
        self.client_certs = tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        let (routes, route_calls) = self.routes(f.routes, &upstreams, &declared, f.routing.case_insensitive);
        // The token endpoint's paths are answered before any route: a route there would never be reached.
        if let (Some(te), Some(span)) = (&token_endpoint, token_endpoint_span.clone()) {
            for (what, p) in [("path", &te.path), ("revocation_path", &te.revocation_path)] {
                if let Ok(m) = routes.match_route(&http::Method::POST, p) {
                    self.warn(
                        span.clone(),
                        format!("[token_endpoint] {what} {p:?} is also matched by route {:?}, which never gets it", m.route.name),
                    );
                }
            }
        }
        if let Some(w) = f.server.worker_threads.as_ref().filter(|w| *w.get_ref() == 0) {
            self.error(w.span(), "`server.worker_threads` must be at least 1");
        }
        Config {
            path: path.to_path_buf(),
            listen,
            tls,
            limits,
            worker_threads: f.server.worker_threads.map(Spanned::into_inner),
            access_log: f.server.access_log.unwrap_or(true),
            upstreams,
            routes,
            route_calls,
            forward_auth,
            trusted_proxies,
            forwarded_from,
            issuers,
            identity,
            token_endpoint,
            global_limit,
            ipv6_prefix,
            headers: global_headers,
            cors: global_cors,
            admin_token,
            store,
            tracing,
            warnings: Vec::new(),
            notes: Vec::new(),
            watch_files: Vec::new(),
        }
    }

    pub(super) fn tracing(&mut self, t: Spanned<TracingFile>) -> Option<TracingSettings> {
        let span = t.span();
        let t = t.into_inner();
        let endpoint = self.tracing_endpoint(&t.otlp_endpoint);
        let sample_ratio = t.sample_ratio.as_ref().map_or(1.0, |r| *r.get_ref());
        if let Some(r) = t.sample_ratio.as_ref().filter(|r| !(0.0..=1.0).contains(r.get_ref())) {
            self.error(r.span(), "`tracing.sample_ratio` must be between 0.0 and 1.0");
        }
        let service_name = t.service_name.as_ref().map_or_else(|| "portcullis".to_string(), |n| n.get_ref().clone());
        if let Some(n) = t.service_name.as_ref().filter(|n| n.get_ref().trim().is_empty()) {
            self.error(n.span(), "`tracing.service_name` must not be empty");
        }
        let max_queue = t.max_queue_spans.as_ref().map_or(8192, |n| *n.get_ref());
        if let Some(n) = t.max_queue_spans.as_ref().filter(|n| *n.get_ref() == 0) {
            self.error(n.span(), "`tracing.max_queue_spans` must be at least 1");
        }
        let ca = t.ca_file.as_ref().map(|p| self.resolve(p)).and_then(|path| {
            let pem = std::fs::read(&path).map_err(|e| format!("cannot read ca_file {}: {e}", path.display()));
            match pem.and_then(|pem| crate::tls_client::client_config(Some((&path, &pem))).map(|_| pem).map_err(|e| format!("ca_file {e}")))
            {
                Ok(pem) => Some(CaFile { path, pem: pem.into() }),
                Err(e) => {
                    self.error(span.clone(), format!("[tracing] {e}"));
                    None
                }
            }
        });
        let trust_incoming = match t.trust_incoming.unwrap_or(TrustIncomingFile::TrustedProxies) {
            TrustIncomingFile::All => TrustIncoming::All,
            TrustIncomingFile::TrustedProxies => TrustIncoming::TrustedProxies,
            TrustIncomingFile::None => TrustIncoming::None,
        };
        Some(TracingSettings { endpoint: endpoint?, sample_ratio, service_name, trust_incoming, ca, max_queue })
    }

    /// The collector's traces URL: `http(s)://host[:port]` gets OTLP's `/v1/traces`; a URL with a path is used as is.
    fn tracing_endpoint(&mut self, url: &Spanned<String>) -> Option<http::Uri> {
        let bad = |v: &mut Self, why: &str| v.error(url.span(), format!("`tracing.otlp_endpoint` {:?}: {why}", url.get_ref()));
        let uri: http::Uri = match url.get_ref().parse() {
            Ok(u) => u,
            Err(e) => {
                bad(self, &e.to_string());
                return None;
            }
        };
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            bad(self, "must be an http:// or https:// URL with a host");
            return None;
        }
        if !matches!(uri.path(), "" | "/") {
            return Some(uri);
        }
        let full = format!("{}://{}/v1/traces", uri.scheme_str().unwrap_or("http"), uri.authority().map_or("", |a| a.as_str()));
        match full.parse() {
            Ok(u) => Some(u),
            Err(e) => {
                bad(self, &format!("{e}"));
                None
            }
        }
    }

    pub(super) fn tls(&mut self, t: TlsFile) -> TlsSettings {
        let cert = self.resolve(t.cert.get_ref());
        let key = self.resolve(t.key.get_ref());
        // A missing pair is fine when it will be generated; anything else must be readable now.
        for (what, p, span) in [("certificate", &cert, t.cert.span()), ("key", &key, t.key.span())] {
            if t.self_signed && !p.exists() {
                continue;
            }
            if let Err(e) = std::fs::File::open(p) {
                self.error(span, format!("cannot read TLS {what} {}: {e}", p.display()));
            }
        }
        let read_pem = |v: &mut Self, p: &Option<Spanned<PathBuf>>, what: &str| {
            let p = p.as_ref()?;
            let path = v.resolve(p.get_ref());
            if let Err(e) = std::fs::read(&path).map_err(|e| e.to_string()).and_then(|pem| check(what, &pem)) {
                v.error(p.span(), format!("tls.{what} {}: {e}", path.display()));
            }
            Some(path)
        };
        let client_ca = read_pem(self, &t.client_ca, "client_ca");
        let client_crl = read_pem(self, &t.client_crl, "client_crl");
        if client_ca.is_none() && (t.client_auth.is_some() || t.client_crl.is_some()) {
            self.error(t.cert.span(), "tls.client_auth and tls.client_crl need tls.client_ca (the CAs that sign client certificates)");
        }
        TlsSettings {
            cert,
            key,
            self_signed: t.self_signed,
            min_version: t.min_version,
            handshake_timeout: t.handshake_timeout.map_or(Duration::from_secs(10), |d| d.0),
            session_tickets: t.session_tickets.unwrap_or(true),
            client_ca,
            client_auth_required: t.client_auth == Some(ClientAuthFile::Required),
            client_crl,
        }
    }

    pub(super) fn upstream(&mut self, name: &str, u: UpstreamFile) -> Option<UpstreamSettings> {
        // Where the upstream's errors about its targets point.
        let span = match (&u.url, &u.targets) {
            (Some(url), None) => url.span(),
            (None, Some(t)) => t.span(),
            (Some(url), Some(t)) => {
                self.error(t.span(), format!("upstream {name:?}: give either url or targets, not both"));
                url.span()
            }
            (None, None) => {
                self.error(u.span.clone(), format!("upstream {name:?}: needs a url or targets"));
                return None;
            }
        };
        // Each target with where it is written, so that its error points at it.
        let listed: Vec<(String, i64, std::ops::Range<usize>)> = match (&u.url, &u.targets) {
            (Some(url), None) => vec![(url.get_ref().clone(), 1, url.span())],
            (_, Some(t)) => t
                .get_ref()
                .iter()
                .map(|t| match t.get_ref() {
                    TargetFile::Url(url) => (url.clone(), 1, t.span()),
                    TargetFile::Weighted(w) => (w.url.clone(), w.weight.unwrap_or(1), t.span()),
                })
                .collect(),
            (None, None) => Vec::new(),
        };
        if listed.is_empty() {
            self.error(span.clone(), format!("upstream {name:?}: targets is empty"));
            return None;
        }
        let mut scheme: Option<http::uri::Scheme> = None;
        let mut targets = Vec::new();
        for (url, weight, span) in listed {
            let uri: http::Uri = match url.parse() {
                Ok(uri) => uri,
                Err(e) => {
                    self.error(span.clone(), format!("upstream {name:?}: invalid url {url:?}: {e}"));
                    continue;
                }
            };
            let s = uri.scheme().cloned();
            let ok_scheme = s.as_ref().is_some_and(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS);
            let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
            let (Some(s), Some(authority)) = (s.filter(|_| ok_scheme), uri.authority().cloned()) else {
                self.error(span.clone(), format!("upstream {name:?}: url must be http:// or https:// with a host, got {url:?}"));
                continue;
            };
            if !path_ok {
                self.error(
                    span.clone(),
                    format!("upstream {name:?}: target {url:?} has a path; a target is an origin (the route decides the path)"),
                );
                continue;
            }
            match &scheme {
                Some(first) if *first != s => {
                    self.error(span.clone(), format!("upstream {name:?}: every target must use the same scheme ({first} and {s})"))
                }
                _ => scheme = Some(s),
            }
            let weight = match u32::try_from(weight) {
                Ok(w @ 1..=1000) => w,
                _ => {
                    self.error(span.clone(), format!("upstream {name:?}: target {url:?} has weight {weight}; weights are 1 to 1000"));
                    1
                }
            };
            if targets.iter().any(|t: &TargetSpec| t.authority == authority) {
                self.error(span.clone(), format!("upstream {name:?}: target {url:?} is listed twice"));
            }
            targets.push(TargetSpec { authority, weight });
        }
        let scheme = scheme?;
        let balance = match &u.balance {
            Some(b) => match Balance::parse(b.get_ref()) {
                Ok(b) => b,
                Err(e) => {
                    self.error(b.span(), format!("upstream {name:?}: {e}"));
                    Balance::RoundRobin
                }
            },
            None => Balance::RoundRobin,
        };
        let protocol = match u.protocol {
            None | Some(ProtocolFile::Http1) => Protocol::Http1,
            Some(ProtocolFile::H2) => Protocol::H2,
            Some(ProtocolFile::Auto) => Protocol::Auto,
        };
        let resolve_every = u.resolve_every.as_ref().and_then(|d| self.positive(d, &format!("upstream {name:?}: resolve_every")));
        let health = u.health.as_ref().map_or_else(Default::default, |h| self.health(name, h));
        let ca = u.ca_file.as_ref().map(|p| self.resolve(p)).and_then(|path| {
            if scheme != http::uri::Scheme::HTTPS {
                self.error(span.clone(), format!("upstream {name:?}: ca_file applies to https:// upstreams only"));
                return None;
            }
            let pem = match std::fs::read(&path) {
                Ok(pem) => pem,
                Err(e) => {
                    self.error(span.clone(), format!("upstream {name:?}: cannot read ca_file {}: {e}", path.display()));
                    return None;
                }
            };
            if let Err(e) = crate::tls_client::client_config(Some((&path, &pem))) {
                self.error(span.clone(), format!("upstream {name:?}: ca_file {e}"));
                return None;
            }
            Some(CaFile { path, pem: pem.into() })
        });
        Some(UpstreamSettings {
            name: name.to_string(),
            scheme,
            targets,
            balance,
            protocol,
            resolve_every,
            health,
            connect_timeout: u.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
            timeout: u.timeout.map_or(Duration::from_secs(30), |d| d.0),
            preserve_host: u.preserve_host,
            ca,
            max_connections: match u.max_connections.as_ref() {
                Some(n) if *n.get_ref() == 0 => {
                    self.error(n.span(), format!("upstream {name:?}: max_connections must be at least 1"));
                    1
                }
                Some(n) => *n.get_ref(),
                None => 1024,
            },
            queue_timeout: u.queue_timeout.map_or(Duration::from_secs(2), |d| d.0),
        })
    }

    /// `[forward_auth]`: a path of its own, which no request is proxied on.
    fn forward_auth(&mut self, f: &ForwardAuthFile) -> Option<crate::edge::forward_auth::ForwardAuthSettings> {
        let path = f.path.get_ref();
        let ok = path.starts_with('/')
            && path.len() > 1
            && !path.ends_with('/')
            && crate::router::normalize_path(path).is_ok_and(|n| n == *path);
        if !ok {
            self.error(
                f.path.span(),
                format!("forward_auth.path must be a normalised path other than \"/\" without a trailing slash, got {path:?}"),
            );
            return None;
        }
        Some(crate::edge::forward_auth::ForwardAuthSettings { path: path.clone() })
    }

    /// A duration that must not be zero (a zero interval would spin).
    pub(super) fn positive(&mut self, d: &Spanned<DurationValue>, what: &str) -> Option<Duration> {
        if d.get_ref().0.is_zero() {
            self.error(d.span(), format!("{what} must be more than 0"));
            return None;
        }
        Some(d.get_ref().0)
    }

    /// `[upstreams.NAME.health]`.
    fn health(&mut self, name: &str, h: &Spanned<HealthFile>) -> HealthSettings {
        let f = h.get_ref();
        let d = HealthSettings::default();
        let at_least_one = |v: &mut Self, n: &Option<Spanned<u32>>, key: &str, default: u32| match n {
            Some(n) if *n.get_ref() == 0 => {
                v.error(n.span(), format!("upstream {name:?}: health.{key} must be at least 1"));
                default
            }
            Some(n) => *n.get_ref(),
            None => default,
        };
        let healthy_after = at_least_one(self, &f.healthy_after, "healthy_after", 2);
        let unhealthy_after = at_least_one(self, &f.unhealthy_after, "unhealthy_after", 3);
        let interval = f.interval.as_ref().and_then(|i| self.positive(i, &format!("upstream {name:?}: health.interval")));
        let timeout = f.timeout.as_ref().and_then(|i| self.positive(i, &format!("upstream {name:?}: health.timeout")));
        let check = match &f.path {
            Some(p) => match http::uri::PathAndQuery::try_from(p.get_ref().as_str()) {
                Ok(path) if p.get_ref().starts_with('/') => Some(ActiveCheck {
                    path,
                    interval: interval.unwrap_or(Duration::from_secs(5)),
                    timeout: timeout.unwrap_or(Duration::from_secs(1)),
                    healthy_after,
                    unhealthy_after,
                }),
                _ => {
                    self.error(p.span(), format!("upstream {name:?}: health.path must be a path starting with '/'"));
                    None
                }
            },
            None => {
                if f.interval.is_some() || f.timeout.is_some() || f.healthy_after.is_some() || f.unhealthy_after.is_some() {
                    self.error(h.span(), format!("upstream {name:?}: health checks need a path (health.path)"));
                }
                None
            }
        };
        let max_ejected_percent = match &f.max_ejected_percent {
            Some(p) if *p.get_ref() > 100 => {
                self.error(p.span(), format!("upstream {name:?}: health.max_ejected_percent is a percentage (0 to 100)"));
                d.max_ejected_percent
            }
            Some(p) => *p.get_ref(),
            None => d.max_ejected_percent,
        };
        HealthSettings {
            check,
            eject_after_errors: f.eject_after_errors.unwrap_or(d.eject_after_errors),
            eject_for: f.eject_for.as_ref().map_or(d.eject_for, |e| e.0),
            max_ejected_percent,
        }
    }

    pub(super) fn limit(&mut self, l: &Spanned<LimitFile>, global: bool) -> Option<LimitSettings> {
        let span = l.span();
        let l = l.get_ref();
        let key = match LimitKey::parse(&l.key) {
            Ok(k) => k,
            Err(e) => {
                self.error(span, e);
                return None;
            }
        };
        if global && key != LimitKey::Ip && key != LimitKey::Route {
            self.error(span.clone(), "the global limit runs before authentication: its key must be \"ip\" or \"route\"");
            return None;
        }
        match crate::edge::ratelimit::parse_rate(&l.rate) {
            Ok((n, per)) => {
                let burst = std::num::NonZeroU32::new(l.burst.unwrap_or(n));
                match burst {
                    Some(burst) => {
                        Some(LimitSettings { key, per, burst, store: self.limit_store(l.store.as_ref(), l.on_store_error.as_ref()) })
                    }
                    None => {
                        self.error(span, "burst must be at least 1");
                        None
                    }
                }
            }
            Err(e) => {
                self.error(span, e);
                None
            }
        }
    }

    pub(super) fn secure_headers(
        &mut self,
        global: Option<&(std::ops::Range<usize>, HeadersFile)>,
        route: Option<&(std::ops::Range<usize>, HeadersFile)>,
    ) -> SecureHeaders {
        let d = SecureHeaders::defaults();
        let (mut set, mut hsts, mut remove, mut override_upstream) =
            (d.set().to_vec(), d.hsts().cloned(), d.remove().to_vec(), d.override_upstream());
        for (span, f) in [global, route].into_iter().flatten() {
            let mut put = |v: &mut Self, name: http::HeaderName, value: &Option<String>| {
                let Some(value) = value else { return };
                set.retain(|(n, _)| *n != name);
                if value.is_empty() {
                    return;
                }
                match http::HeaderValue::from_str(value) {
                    Ok(hv) => set.push((name, hv)),
                    Err(_) => v.error(span.clone(), format!("[headers] {name}: {value:?} is not a valid header value")),
                }
            };
            put(self, http::header::X_CONTENT_TYPE_OPTIONS, &f.content_type_options);
            put(self, http::header::X_FRAME_OPTIONS, &f.frame_options);
            put(self, http::header::REFERRER_POLICY, &f.referrer_policy);
            put(self, http::header::CONTENT_SECURITY_POLICY, &f.content_security_policy);
            put(self, http::HeaderName::from_static("permissions-policy"), &f.permissions_policy);
            put(self, http::HeaderName::from_static("cross-origin-opener-policy"), &f.cross_origin_opener_policy);
            if let Some(h) = &f.hsts {
                hsts = if h.is_empty() { None } else { http::HeaderValue::from_str(h).ok() };
            }
            if let Some(names) = &f.remove {
                remove.clear();
                for r in names {
                    match http::HeaderName::from_bytes(r.as_bytes()) {
                        Ok(n) => remove.push(n),
                        Err(_) => self.error(span.clone(), format!("[headers] remove: {r:?} is not a header name")),
                    }
                }
            }
            if let Some(o) = f.override_upstream {
                override_upstream = o;
            }
        }
        SecureHeaders::new(set, hsts, remove, override_upstream)
    }

    pub(super) fn cors(&mut self, span: std::ops::Range<usize>, c: &CorsFile) -> Option<CorsPolicy> {
        let any = c.allow_origins.iter().any(|o| o == "*");
        if any && c.allow_credentials {
            self.error(span, "[cors] allow_origins = [\"*\"] cannot be combined with allow_credentials = true");
            return None;
        }
        let mut origins = Vec::new();
        for o in c.allow_origins.iter().filter(|o| *o != "*") {
            match http::HeaderValue::from_str(o) {
                Ok(v) if is_serialized_origin(o) => origins.push(v),
                _ => self.error(
                    span.clone(),
                    format!(
                        "[cors] origin {o:?} must be written as browsers send it: scheme://host[:port], lowercase, no path \
                         or trailing slash, no default port, one origin per string, no wildcards"
                    ),
                ),
            }
        }
        let names = c.allow_methods.clone().unwrap_or_else(|| vec!["GET".into(), "POST".into(), "PUT".into(), "DELETE".into()]);
        let mut methods = Vec::new();
        for m in &names {
            match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(m) => methods.push(m),
                Err(_) => self.error(span.clone(), format!("[cors] invalid method {m:?}")),
            }
        }
        let join =
            |v: &Option<Vec<String>>| v.as_ref().filter(|v| !v.is_empty()).and_then(|v| http::HeaderValue::from_str(&v.join(", ")).ok());
        let methods_value = http::HeaderValue::from_str(&methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")).ok()?;
        Some(CorsPolicy {
            origins: if any { None } else { Some(origins) },
            methods,
            methods_value,
            headers_value: join(&c.allow_headers),
            expose_value: join(&c.expose_headers),
            credentials: c.allow_credentials,
            max_age: http::HeaderValue::from(c.max_age.map_or(600, |d| d.0.as_secs())),
        })
    }

    pub(super) fn identity(&mut self, i: IdentityFile) -> IdentitySettings {
        let mut headers = Vec::new();
        for (name, claim) in i.headers {
            match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
                Ok(h) => headers.push((h, claim)),
                Err(_) => self.error(name.span(), format!("[identity] header name {:?} is not a valid HTTP header name", name.get_ref())),
            }
        }
        let mut strip = if i.strip_well_known { IdentitySettings::well_known() } else { Vec::new() };
        for name in &i.strip_also {
            match http::HeaderName::from_bytes(name.get_ref().as_bytes()) {
                Ok(h) => strip.push(h),
                Err(_) => self.error(name.span(), format!("[identity] strip_also {:?} is not a valid HTTP header name", name.get_ref())),
            }
        }
        let mut cert_headers = crate::edge::client_cert::CertHeaders::default();
        for (slot, name) in [
            (&mut cert_headers.subject, &i.cert_subject_header),
            (&mut cert_headers.sans, &i.cert_sans_header),
            (&mut cert_headers.thumbprint, &i.cert_thumbprint_header),
        ] {
            if let Some(n) = name {
                match http::HeaderName::from_bytes(n.get_ref().as_bytes()) {
                    Ok(h) => *slot = h,
                    Err(_) => self.error(n.span(), format!("[identity] {:?} is not a valid HTTP header name", n.get_ref())),
                }
            }
        }
        IdentitySettings::new(headers, i.forward_authorization, strip, cert_headers)
    }
}

/// Whether `o` is an origin as a browser serializes it in `Origin` (RFC 6454 §6.2): the exact comparison with
/// what browsers send can only ever match such a string.
pub(super) fn is_serialized_origin(o: &str) -> bool {
    let Some((scheme, rest)) = o.split_once("://") else { return false };
    let scheme_ok = scheme.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
        && scheme.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b));
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !rest.ends_with(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.[]:".contains(&b));
    let default_port = match scheme {
        "https" | "wss" => Some("443"),
        "http" | "ws" => Some("80"),
        _ => None,
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && Some(p) != default_port);
    scheme_ok && host_ok && port_ok
}

/// An upstream host as one origin is named: IP addresses in one spelling, and every loopback or unspecified
/// address (which reach this machine) as `loopback`.
pub(super) fn origin_host(host: &str) -> String {
    let host = host.trim_matches(['[', ']']).trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return "loopback".into();
    }
    let ip = match host.parse::<std::net::Ipv6Addr>() {
        Ok(v6) => Some(v6.to_ipv4_mapped().map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)),
        Err(_) => lenient_ipv4(&host).map(std::net::IpAddr::V4),
    };
    match ip {
        Some(ip) if ip.is_loopback() || ip.is_unspecified() => "loopback".into(),
        Some(ip) => ip.to_string(),
        None => host,
    }
}

/// IPv4 as resolvers read it (inet_aton): one to four parts, each decimal, octal (`0` prefix) or hex (`0x`), the
/// last filling the remaining bytes: `127.1` is 127.0.0.1.
pub(super) fn lenient_ipv4(s: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<u64> = s
        .split('.')
        .map(|p| {
            let (digits, radix) = match p.strip_prefix("0x") {
                Some(h) => (h, 16),
                None if p.len() > 1 && p.starts_with('0') => (&p[1..], 8),
                None => (p, 10),
            };
            // from_str_radix takes a sign, inet_aton does not.
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u64::from_str_radix(digits, radix).ok()
        })
        .collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|&p| p > 255) || *last >= 1u64 << (8 * (4 - head.len())) {
        return None;
    }
    let value = head.iter().enumerate().fold(*last, |acc, (i, &p)| acc | p << (8 * (3 - i)));
    u32::try_from(value).ok().map(std::net::Ipv4Addr::from)
}

/// A PEM file of certificates (`client_ca`) or of CRLs (`client_crl`) that holds at least one.
fn check(what: &str, pem: &[u8]) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    let found = match what {
        "client_crl" => rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(pem).filter(Result::is_ok).count(),
        _ => rustls_pki_types::CertificateDer::pem_slice_iter(pem).filter(Result::is_ok).count(),
    };
    if found == 0 {
        return Err(format!("no PEM {} found", if what == "client_crl" { "CRL" } else { "certificate" }));
    }
    Ok(())
}
