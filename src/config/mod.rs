//! gateway.toml: the file structs (deny_unknown_fields), their validation, and the checked runtime `Config`.
//!
//! Everything that can be wrong with a config is found here, once, with a `file:line:column`; the request path
//! only ever sees the checked types.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::{self, IssuerSettings};
use crate::auth::authz::{ClaimRule, Policy};
use std::sync::Arc;

use crate::edge::cors::CorsPolicy;
use crate::edge::headers::{IdentitySettings, SecureHeaders};
use crate::token_endpoint::TokenEndpointSettings;
use crate::edge::ratelimit::Cidr;
use crate::edge::ratelimit::{LimitKey, LimitSettings};
use crate::router::{PathPattern, Route, RouteTable};

/// One problem in a config file, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

impl ConfigError {
    /// Returns the located problems (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!("{}:{}:{}: {}", path.display(), p.line, p.column, p.message));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Value types with their own syntax: durations ("250ms", "30s", "5m") and sizes ("64KiB", "10MiB").

/// A duration written as a string with a unit: `ms`, `s`, `m`, `h`, `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(DurationValue).map_err(serde::de::Error::custom)
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"1d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid duration {s:?}: expected a whole number and a unit, like \"250ms\", \"30s\", \"5m\", \"1h\"");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(bad);
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" | "min" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(bad()),
    }
}

/// A byte size: a whole number of bytes, or a string like `"64KiB"`, `"10MiB"`, `"1GiB"`, `"512B"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeValue(pub u64);

impl<'de> Deserialize<'de> for SizeValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(SizeValue(n)),
            Raw::S(s) => parse_size(&s).map(SizeValue).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"512B"`, `"64KiB"`, `"10MiB"`, `"1GiB"` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("invalid size {s:?}: expected a number and a unit, like \"64KiB\" or \"10MiB\"");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let k: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(k).ok_or_else(bad)
}

// ---------------------------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: ListenFile,
    tls: Option<TlsFile>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    upstreams: BTreeMap<String, UpstreamFile>,
    #[serde(default)]
    routes: Vec<RouteFile>,
    #[serde(default)]
    routing: RoutingFile,
    #[serde(default)]
    rate_limit: RateLimitFile,
    #[serde(default)]
    issuers: Vec<Spanned<auth::IssuerFile>>,
    #[serde(default)]
    identity: Option<IdentityFile>,
    token_endpoint: Option<Spanned<TokenEndpointFile>>,
    headers: Option<Spanned<HeadersFile>>,
    cors: Option<Spanned<CorsFile>>,
    admin: Option<Spanned<AdminFile>>,
    #[serde(default)]
    auth: AuthFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    /// An environment variable holding a bearer token the admin listener requires.
    token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEndpointFile {
    path: Option<String>,
    issuer: String,
    private_key: Option<PathBuf>,
    users_file: Option<PathBuf>,
    clients_file: Option<PathBuf>,
    access_token_ttl: Option<DurationValue>,
    rate_limit: Option<LoginLimitFile>,
    #[serde(default)]
    allow_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginLimitFile {
    rate: String,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    https: Option<Spanned<String>>,
    http: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    #[serde(default)]
    self_signed: bool,
    #[serde(default)]
    min_version: TlsVersion,
    handshake_timeout: Option<DurationValue>,
}

/// The lowest TLS version the public listener accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_header_bytes: Option<SizeValue>,
    max_body_bytes: Option<SizeValue>,
    header_read_timeout: Option<DurationValue>,
    idle_timeout: Option<DurationValue>,
    max_connections: Option<usize>,
    max_connections_per_client: Option<usize>,
    drain_timeout: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    worker_threads: Option<usize>,
    access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpstreamFile {
    url: Spanned<String>,
    connect_timeout: Option<DurationValue>,
    timeout: Option<DurationValue>,
    #[serde(default = "yes")]
    preserve_host: bool,
    ca_file: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteFile {
    name: Spanned<String>,
    path: Spanned<String>,
    methods: Option<Spanned<Vec<String>>>,
    upstream: Spanned<String>,
    strip_prefix: Option<Spanned<String>>,
    #[serde(default)]
    auth: AuthMode,
    issuers: Option<Spanned<Vec<String>>>,
    roles_any: Option<Vec<String>>,
    roles_all: Option<Vec<String>>,
    scopes_any: Option<Vec<String>>,
    scopes_all: Option<Vec<String>>,
    claims: Option<Spanned<BTreeMap<String, String>>>,
    bypass_roles: Option<Vec<String>>,
    rate_limit: Option<Spanned<LimitFile>>,
    headers: Option<Spanned<HeadersFile>>,
    cors: Option<Spanned<CorsFile>>,
    /// A cookie that may carry the token on this route (overrides `[auth] token_cookie`).
    token_cookie: Option<String>,
    /// Opt in to a token in this query parameter; it is removed before forwarding.
    token_query: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    /// A cookie that may carry the token on every route.
    token_cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitFile {
    #[serde(default = "ip_key")]
    key: String,
    rate: String,
    burst: Option<u32>,
}

fn ip_key() -> String {
    "ip".into()
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadersFile {
    hsts: Option<String>,
    content_type_options: Option<String>,
    frame_options: Option<String>,
    referrer_policy: Option<String>,
    content_security_policy: Option<String>,
    permissions_policy: Option<String>,
    cross_origin_opener_policy: Option<String>,
    remove: Option<Vec<String>>,
    #[serde(rename = "override")]
    override_upstream: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorsFile {
    allow_origins: Vec<String>,
    allow_methods: Option<Vec<String>>,
    allow_headers: Option<Vec<String>>,
    expose_headers: Option<Vec<String>>,
    #[serde(default)]
    allow_credentials: bool,
    max_age: Option<DurationValue>,
}

/// Whether a route needs a token. `required` is the default, so a forgotten line fails closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Public,
    Optional,
    #[default]
    Required,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoutingFile {
    #[serde(default)]
    case_insensitive: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    #[serde(default)]
    trusted_proxies: Vec<Spanned<String>>,
    global: Option<Spanned<LimitFile>>,
    ipv6_prefix: Option<u8>,
    forwarded_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default = "yes")]
    forward_authorization: bool,
}

// ---------------------------------------------------------------------------------------------------------------
// The checked runtime config.

/// The listeners to bind. Port 0 asks the OS for a free port.
#[derive(Debug, Clone)]
pub struct Listen {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Where the TLS certificate and key live, and how the handshake is bounded.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
    pub min_version: TlsVersion,
    pub handshake_timeout: Duration,
}

/// Connection and request limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Connections one client address (IPv6: its `ipv6_prefix`) may hold; trusted proxies are not counted.
    pub max_connections_per_client: usize,
    pub drain_timeout: Duration,
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
}

/// A CA file as read at load: its contents are part of the settings, so a reload after the file changed in place
/// builds the upstream anew (an unchanged upstream keeps its pool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Arc<[u8]>,
}

/// The whole checked configuration. Built only by [`Config::load`] / [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: Listen,
    pub tls: Option<TlsSettings>,
    pub limits: Limits,
    pub worker_threads: Option<usize>,
    /// One log line per request (target `portcullis::access`).
    pub access_log: bool,
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    pub routes: RouteTable,
    pub trusted_proxies: Vec<Cidr>,
    /// The field trusted proxies name the client in.
    pub forwarded_from: crate::edge::ratelimit::ForwardedFrom,
    pub issuers: Vec<IssuerSettings>,
    /// Shared with request bodies in flight (their trailers are checked against it).
    pub identity: Arc<IdentitySettings>,
    pub token_endpoint: Option<TokenEndpointSettings>,
    /// The global limit, checked before authentication.
    pub global_limit: Option<LimitSettings>,
    /// IPv6 clients are keyed by this many leading bits.
    pub ipv6_prefix: u8,
    pub headers: Arc<SecureHeaders>,
    pub cors: Option<Arc<CorsPolicy>>,
    /// A bearer token the admin listener requires, when set.
    pub admin_token: Option<Arc<String>>,
    /// Non-fatal findings, such as a route that an earlier one shadows.
    pub warnings: Vec<Problem>,
    /// What start will do that `check` did not (generate local-use keys).
    pub notes: Vec<String>,
    /// Every file the config names, watched for reload.
    pub watch_files: Vec<PathBuf>,
}

impl Config {
    /// Reads and validates a config file, generating local-use keys it asks for. Relative paths inside it are
    /// resolved against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(path, &text, true)
    }

    /// Validates a config file without writing anything (for `portcullis check`).
    pub fn check(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::parse(path, &text, false)
    }

    /// Validates config text as if it were read from `path`.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Config::parse(path, text, true)
    }

    fn parse(path: &Path, text: &str, generate: bool) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            invalid(vec![Problem { line, column, message: e.message().trim().to_string() }])
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut v = Validator {
            text,
            default_cookie: None,
            route_headers_base: None,
            generate,
            notes: Vec::new(),
            resolved: Default::default(),
            base,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let config = v.config(path, file);
        if v.problems.is_empty() {
            let mut config = config;
            config.warnings = v.warnings;
            config.notes = v.notes;
            config.watch_files = v.resolved.into_inner();
            Ok(config)
        } else {
            Err(invalid(v.problems))
        }
    }
}

/// Converts a byte offset into a 1-based line and column.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.chars().count(), |nl| before[nl + 1..].chars().count()) + 1;
    (line, column)
}

/// Collects every problem rather than stopping at the first, so `check` can show them all.
pub(crate) struct Validator<'a> {
    text: &'a str,
    /// The global `[headers]`, which route `headers` tables override key by key.
    route_headers_base: Option<(std::ops::Range<usize>, HeadersFile)>,
    /// `[auth] token_cookie`, which routes inherit.
    default_cookie: Option<String>,
    /// False for `check`: report what start would generate instead of writing it.
    generate: bool,
    notes: Vec<String>,
    resolved: std::cell::RefCell<Vec<PathBuf>>,
    base: PathBuf,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Validator<'_> {
    pub(crate) fn problem_count(&self) -> usize {
        self.problems.len()
    }

    pub(crate) fn generating(&self) -> bool {
        self.generate
    }

    pub(crate) fn note(&mut self, message: String) {
        self.notes.push(message);
    }

    pub(crate) fn error(&mut self, span: std::ops::Range<usize>, message: impl fmt::Display) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem { line, column, message: message.to_string() });
    }

    pub(crate) fn warn(&mut self, span: std::ops::Range<usize>, message: impl fmt::Display) {
        let (line, column) = line_col(self.text, span.start);
        self.warnings.push(Problem { line, column, message: message.to_string() });
    }

    /// Resolves a path from the file against the config's folder.
    pub(crate) fn resolve(&self, p: &Path) -> PathBuf {
        let full = if p.is_absolute() { p.to_path_buf() } else { self.base.join(p) };
        self.resolved.borrow_mut().push(full.clone());
        full
    }

    fn addr(&mut self, s: &Option<Spanned<String>>) -> Option<SocketAddr> {
        let s = s.as_ref()?;
        match s.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(s.span(), format!("invalid listen address {:?}: expected IP:PORT", s.get_ref()));
                None
            }
        }
    }

    fn config(&mut self, path: &Path, f: FileConfig) -> Config {
        let listen = Listen { https: self.addr(&f.listen.https), http: self.addr(&f.listen.http), admin: self.addr(&f.listen.admin) };
        if f.listen.https.is_none() && f.listen.http.is_none() {
            self.error(0..0, "[listen] needs `https` or `http`");
        }
        let tls = f.tls.map(|t| self.tls(t));
        if let (Some(https), None) = (&f.listen.https, &tls) {
            self.error(https.span(), "`listen.https` needs a [tls] section");
        }
        let d = |v: Option<DurationValue>, default: u64| v.map_or(Duration::from_secs(default), |d| d.0);
        let max_header_bytes = f.limits.max_header_bytes.map_or(32 * 1024, |s| s.0);
        let limits = Limits {
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            max_body_bytes: f.limits.max_body_bytes.map_or(10 * 1024 * 1024, |s| s.0),
            header_read_timeout: d(f.limits.header_read_timeout, 10),
            idle_timeout: d(f.limits.idle_timeout, 60),
            max_connections: f.limits.max_connections.unwrap_or(10_000),
            max_connections_per_client: f.limits.max_connections_per_client.unwrap_or(1_000),
            drain_timeout: d(f.limits.drain_timeout, 30),
        };
        for (name, d) in [("idle_timeout", limits.idle_timeout), ("header_read_timeout", limits.header_read_timeout)] {
            if d.is_zero() {
                self.error(0..0, format!("`limits.{name}` must be more than 0"));
            }
        }
        if limits.max_connections_per_client == 0 {
            self.error(0..0, "`limits.max_connections_per_client` must be at least 1");
        }
        if limits.max_connections == 0 {
            self.error(0..0, "`limits.max_connections` must be at least 1");
        }
        let mut upstreams = BTreeMap::new();
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
            None => crate::edge::ratelimit::ForwardedFrom::XForwardedFor,
            Some((_, h)) if h == "x-forwarded-for" => crate::edge::ratelimit::ForwardedFrom::XForwardedFor,
            Some((_, h)) if h == "forwarded" => crate::edge::ratelimit::ForwardedFrom::Forwarded,
            Some((span, h)) => {
                self.error(span, format!("[rate_limit] forwarded_header {h:?} must be \"x-forwarded-for\" or \"forwarded\""));
                crate::edge::ratelimit::ForwardedFrom::XForwardedFor
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
            if let Some(settings) = auth::validate_issuer(self, span.clone(), i.into_inner()) {
                // Tokens pick their issuer by `iss`: two entries for one `iss` would silently shadow each other.
                if !issuer_urls.insert(settings.issuer.clone()) {
                    self.error(span, format!("issuer {:?} is configured twice", settings.issuer));
                }
                issuers.push(settings);
            }
        }
        let identity = match f.identity {
            Some(i) => Arc::new(self.identity(i)),
            None => Arc::default(),
        };
        let token_endpoint = f.token_endpoint.and_then(|t| self.token_endpoint(t, &mut issuers, limits.header_read_timeout));
        let global_limit = f.rate_limit.global.as_ref().and_then(|l| self.limit(l, true));
        let ipv6_prefix = f.rate_limit.ipv6_prefix.unwrap_or(64);
        if ipv6_prefix > 128 {
            self.error(0..0, format!("[rate_limit] ipv6_prefix {ipv6_prefix} is longer than an IPv6 address (128 bits)"));
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
        self.default_cookie = f.auth.token_cookie.clone();
        let routes = self.routes(f.routes, &upstreams, &issuer_ids, f.routing.case_insensitive);
        if f.server.worker_threads == Some(0) {
            self.error(0..0, "`server.worker_threads` must be at least 1");
        }
        Config {
            path: path.to_path_buf(),
            listen,
            tls,
            limits,
            worker_threads: f.server.worker_threads,
            access_log: f.server.access_log.unwrap_or(true),
            upstreams,
            routes,
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
            warnings: Vec::new(),
            notes: Vec::new(),
            watch_files: Vec::new(),
        }
    }

    fn tls(&mut self, t: TlsFile) -> TlsSettings {
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
        TlsSettings {
            cert,
            key,
            self_signed: t.self_signed,
            min_version: t.min_version,
            handshake_timeout: t.handshake_timeout.map_or(Duration::from_secs(10), |d| d.0),
        }
    }

    fn upstream(&mut self, name: &str, u: UpstreamFile) -> Option<UpstreamSettings> {
        let uri: http::Uri = match u.url.get_ref().parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.error(u.url.span(), format!("upstream {name:?}: invalid url {:?}: {e}", u.url.get_ref()));
                return None;
            }
        };
        let scheme = uri.scheme().cloned();
        let ok_scheme = scheme.as_ref().is_some_and(|s| *s == http::uri::Scheme::HTTP || *s == http::uri::Scheme::HTTPS);
        let path_ok = matches!(uri.path(), "" | "/") && uri.query().is_none();
        match (scheme, uri.authority().cloned()) {
            (Some(scheme), Some(authority)) if ok_scheme && path_ok => {
                let ca = u.ca_file.as_ref().map(|p| self.resolve(p)).and_then(|path| {
                    if scheme != http::uri::Scheme::HTTPS {
                        self.error(u.url.span(), format!("upstream {name:?}: ca_file applies to https:// upstreams only"));
                        return None;
                    }
                    let pem = match std::fs::read(&path) {
                        Ok(pem) => pem,
                        Err(e) => {
                            self.error(u.url.span(), format!("upstream {name:?}: cannot read ca_file {}: {e}", path.display()));
                            return None;
                        }
                    };
                    if let Err(e) = crate::server::tls::client_config(Some((&path, &pem))) {
                        self.error(u.url.span(), format!("upstream {name:?}: ca_file {e}"));
                        return None;
                    }
                    Some(CaFile { path, pem: pem.into() })
                });
                Some(UpstreamSettings {
                    name: name.to_string(),
                    scheme,
                    authority,
                    connect_timeout: u.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
                    timeout: u.timeout.map_or(Duration::from_secs(30), |d| d.0),
                    preserve_host: u.preserve_host,
                    ca,
                })
            }
            _ => {
                self.error(
                    u.url.span(),
                    format!("upstream {name:?}: url must be http:// or https:// with a host and no path, got {:?}", u.url.get_ref()),
                );
                None
            }
        }
    }

    fn token_endpoint(
        &mut self,
        t: Spanned<TokenEndpointFile>,
        issuers: &mut [IssuerSettings],
        form_timeout: Duration,
    ) -> Option<TokenEndpointSettings> {
        let span = t.span();
        let t = t.into_inner();
        let before = self.problems.len();
        let path = t.path.unwrap_or_else(|| "/token".into());
        if !path.starts_with('/') || crate::router::normalize_path(&path).ok().as_deref() != Some(path.as_str()) {
            self.error(span.clone(), format!("[token_endpoint] path {path:?} must be a normalised absolute path"));
        }
        let Some(issuer) = issuers.iter_mut().find(|i| i.id == t.issuer) else {
            self.error(span, format!("[token_endpoint] issuer {:?} is not defined in [[issuers]]", t.issuer));
            return None;
        };
        if let Some(pk) = &t.private_key {
            let p = self.resolve(pk);
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|pem| auth::public_from_private_pem(&pem))
                .and_then(|k| auth::bind_key(None, k, &issuer.algorithms, None))
            {
                Ok(k) => {
                    issuer.static_keys.push(k);
                    issuer.private_key = Some(p);
                }
                Err(e) => self.error(span.clone(), format!("[token_endpoint] private_key {}: {e}", p.display())),
            }
        }
        if issuer.private_key.is_none() && issuer.hmac_secret.is_none() && self.generate {
            self.error(span.clone(), format!("[token_endpoint] issuer {:?} has no signing key (an HMAC secret or private_key)", issuer.id));
        }
        let load = |file: &Option<PathBuf>, clients: bool, v: &mut Self| match file {
            None => Some(std::collections::BTreeMap::new()),
            Some(f) => match crate::token_endpoint::load_accounts(&v.resolve(f), clients) {
                Ok(a) => Some(a),
                Err(e) => {
                    v.error(span.clone(), format!("[token_endpoint] {e}"));
                    None
                }
            },
        };
        let ttl = t.access_token_ttl.map_or(Duration::from_secs(1800), |d| d.0);
        // The gateway refuses tokens living longer than their issuer's max_lifetime: it must not issue them.
        if ttl.as_secs() > issuer.max_lifetime {
            self.error(
                span.clone(),
                format!(
                    "[token_endpoint] access_token_ttl ({}s) is longer than issuer {:?}'s max_lifetime ({}s): its tokens would be refused",
                    ttl.as_secs(),
                    issuer.id,
                    issuer.max_lifetime
                ),
            );
        }
        let users = load(&t.users_file, false, self);
        let clients = load(&t.clients_file, true, self);
        // Both grants put the account's name in `sub`: a client named like a user would pass that user's
        // `claims = { sub = "{id}" }` rules.
        if let (Some(u), Some(c)) = (&users, &clients) {
            for name in u.keys().filter(|n| c.contains_key(*n)) {
                self.error(
                    span.clone(),
                    format!("[token_endpoint] {name:?} is both a user and a client: their tokens would carry the same sub"),
                );
            }
        }
        let (burst, rate) = match &t.rate_limit {
            None => (5, Duration::from_secs(12)),
            Some(r) => match crate::edge::ratelimit::parse_rate(&r.rate) {
                Ok((n, per)) => (r.burst.unwrap_or(n), per),
                Err(e) => {
                    self.error(span.clone(), format!("[token_endpoint] rate_limit: {e}"));
                    (1, Duration::from_secs(1))
                }
            },
        };
        if self.problems.len() != before {
            return None;
        }
        Some(TokenEndpointSettings {
            path,
            issuer: t.issuer,
            users_file: t.users_file.as_ref().map(|f| self.resolve(f)),
            clients_file: t.clients_file.as_ref().map(|f| self.resolve(f)),
            users: std::sync::Arc::new(users.unwrap_or_default()),
            clients: std::sync::Arc::new(clients.unwrap_or_default()),
            ttl,
            rate,
            burst: std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN),
            allow_plaintext: t.allow_plaintext,
            form_timeout,
        })
    }

    fn limit(&mut self, l: &Spanned<LimitFile>, global: bool) -> Option<LimitSettings> {
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
                    Some(burst) => Some(LimitSettings { key, per, burst }),
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

    fn secure_headers(
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

    fn cors(&mut self, span: std::ops::Range<usize>, c: &CorsFile) -> Option<CorsPolicy> {
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

    fn identity(&mut self, i: IdentityFile) -> IdentitySettings {
        let mut headers = Vec::new();
        for (name, claim) in i.headers {
            match http::HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => headers.push((h, claim)),
                Err(_) => self.error(0..0, format!("[identity] header name {name:?} is not a valid HTTP header name")),
            }
        }
        IdentitySettings { headers, forward_authorization: i.forward_authorization }
    }

    fn routes(
        &mut self,
        routes: Vec<RouteFile>,
        upstreams: &BTreeMap<String, UpstreamSettings>,
        issuer_ids: &HashSet<String>,
        case_insensitive: bool,
    ) -> RouteTable {
        let mut out: Vec<Route> = Vec::new();
        let mut strip_spans = Vec::new();
        let mut names = HashSet::new();
        for r in routes {
            let name = r.name.get_ref().clone();
            if !names.insert(name.clone()) {
                self.error(r.name.span(), format!("route name {name:?} is used twice (names label metrics)"));
            }
            let pattern = match PathPattern::parse(r.path.get_ref()) {
                Ok(p) => p,
                Err(e) => {
                    self.error(r.path.span(), format!("route {name:?}: {e}"));
                    continue;
                }
            };
            // Case-insensitive matching folds ASCII only: `/CAFÉ` would miss `/café/*`'s rules at an upstream that
            // folds it (IIS, ASP.NET).
            if case_insensitive && !r.path.get_ref().is_ascii() {
                self.error(r.path.span(), format!("route {name:?}: with [routing] case_insensitive, paths must be ASCII (only ASCII letters are matched without regard to case)"));
            }
            let methods = match &r.methods {
                None => None,
                Some(m) => {
                    let mut out = Vec::new();
                    for s in m.get_ref() {
                        match http::Method::from_bytes(s.to_ascii_uppercase().as_bytes()) {
                            Ok(http::Method::CONNECT) => {
                                self.error(m.span(), format!("route {name:?}: CONNECT opens a tunnel and cannot be routed to an upstream"))
                            }
                            Ok(method) => out.push(method),
                            Err(_) => self.error(m.span(), format!("route {name:?}: invalid method {s:?}")),
                        }
                    }
                    if out.is_empty() {
                        self.error(m.span(), format!("route {name:?}: `methods` is empty; omit it to allow any method"));
                    }
                    Some(out)
                }
            };
            let upstream = match upstreams.get(r.upstream.get_ref()) {
                Some(_) => r.upstream.get_ref().clone(),
                None => {
                    self.error(
                        r.upstream.span(),
                        format!("route {name:?}: upstream {:?} is not defined in [upstreams]", r.upstream.get_ref()),
                    );
                    continue;
                }
            };
            let strip_prefix = match &r.strip_prefix {
                Some(p) if !p.get_ref().starts_with('/') || p.get_ref().len() < 2 => {
                    self.error(p.span(), format!("route {name:?}: strip_prefix must start with '/' and not be \"/\""));
                    None
                }
                Some(p) if case_insensitive && !p.get_ref().is_ascii() => {
                    self.error(p.span(), format!("route {name:?}: with [routing] case_insensitive, strip_prefix must be ASCII"));
                    None
                }
                // In the form the normalised paths it is cut from take (non-ASCII percent-encoded).
                Some(p) => match p.get_ref().trim_end_matches('/').split('/').map(canonical_or_empty).collect::<Result<Vec<_>, _>>() {
                    Ok(segments) => Some(segments.join("/")),
                    Err(e) => {
                        self.error(p.span(), format!("route {name:?}: strip_prefix: {e}"));
                        None
                    }
                },
                None => None,
            };
            if let Some(iss) = &r.issuers {
                for id in iss.get_ref() {
                    if !issuer_ids.contains(id) {
                        self.error(iss.span(), format!("route {name:?}: issuer {id:?} is not defined in [[issuers]]"));
                    }
                }
            }
            let mut claims = Vec::new();
            if let Some(c) = &r.claims {
                for (claim, want) in c.get_ref() {
                    match ClaimRule::parse(claim, want, &pattern) {
                        Ok(rule) => claims.push(rule),
                        Err(e) => self.error(c.span(), format!("route {name:?}: {e}")),
                    }
                }
            }
            let policy = Policy {
                auth: r.auth,
                issuers: r.issuers.map(|i| i.into_inner()),
                roles_any: r.roles_any.unwrap_or_default(),
                roles_all: r.roles_all.unwrap_or_default(),
                scopes_any: r.scopes_any.unwrap_or_default(),
                scopes_all: r.scopes_all.unwrap_or_default(),
                claims,
                bypass_roles: r.bypass_roles.unwrap_or_default(),
            };
            if policy.auth == AuthMode::Public && policy.has_rules() {
                self.error(r.path.span(), format!("route {name:?}: auth = \"public\" cannot carry roles, scopes, claims or issuers rules"));
            }
            if r.auth != AuthMode::Public && issuer_ids.is_empty() {
                self.error(
                    r.path.span(),
                    format!(
                        "route {name:?}: needs a token (auth = {:?}) but no [[issuers]] are configured; add one or set auth = \"public\"",
                        r.auth
                    ),
                );
            }
            let route = Route::new(out.len(), name.clone(), pattern, methods, upstream, strip_prefix, policy, case_insensitive);
            if let Some(earlier) = out.iter().find(|e| e.shadows(&route, case_insensitive)) {
                let msg = format!("route {name:?} can never match: route {:?} before it matches every request it would", earlier.name);
                self.warn(r.path.span(), msg);
            }
            let mut route = route;
            route.rate_limit = r.rate_limit.as_ref().and_then(|l| self.limit(l, false));
            if r.auth == AuthMode::Public
                && route.rate_limit.as_ref().is_some_and(|l| matches!(l.key, LimitKey::Subject | LimitKey::Claim(_)))
            {
                let span = r.rate_limit.as_ref().map_or(r.path.span(), Spanned::span);
                self.warn(
                    span,
                    format!("route {name:?} is public: its subject or claim rate limit counts every request by client address"),
                );
            }
            if let Some(h) = &r.headers {
                let base = self.route_headers_base.clone();
                route.headers = Some(Arc::new(self.secure_headers(base.as_ref(), Some(&(h.span(), h.get_ref().clone())))));
            }
            route.token_sources = crate::auth::TokenSources {
                cookie: r.token_cookie.clone().or_else(|| self.default_cookie.clone()),
                query: r.token_query.clone(),
            };
            route.cors = r.cors.as_ref().and_then(|c| self.cors(c.span(), c.get_ref())).map(Arc::new);
            strip_spans.push(r.strip_prefix.as_ref().map(|p| p.span()));
            out.push(route);
        }
        self.check_rewrites(&out, &strip_spans, upstreams, case_insensitive);
        RouteTable::new(out, case_insensitive)
    }

    /// A route that strips a prefix forwards into the upstream's own path space: if those paths are another
    /// route's on the same upstream origin, under rules this route's requests need not meet, a client allowed
    /// here reaches them without those rules (`/api/*` stripping `/api` would serve `/api/admin/x` as
    /// `/admin/x` to any valid token, past `/admin/*`'s `roles_any`). Refused rather than warned about.
    fn check_rewrites(
        &mut self,
        routes: &[Route],
        strip_spans: &[Option<std::ops::Range<usize>>],
        upstreams: &BTreeMap<String, UpstreamSettings>,
        case_insensitive: bool,
    ) {
        // One server under two spellings is one origin: default ports, `localhost`, the loopback and unspecified
        // addresses however written (`127.1`, `0x7f.0.0.1`, `[::ffff:127.0.0.1]`, `0.0.0.0`). Compared as
        // configured, not through DNS.
        let origin = |r: &Route| {
            upstreams.get(&r.upstream).map(|u| {
                let host = origin_host(u.authority.host());
                let port = u.authority.port_u16().unwrap_or(if u.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 });
                (u.scheme.clone(), host, port)
            })
        };
        for (a, span) in routes.iter().zip(strip_spans) {
            let (Some(prefix), Some(span)) = (&a.strip_prefix, span) else { continue };
            let Some((forwarded, _)) = a.pattern.stripped(prefix, case_insensitive) else { continue };
            let exposed = routes.iter().find(|b| {
                b.index != a.index
                    && origin(b) == origin(a)
                    && b.forwarded_patterns().iter().any(|p| forwarded.overlaps(p, case_insensitive))
                    && !a.policy.admits_no_more_than(&b.policy)
            });
            if let Some(b) = exposed {
                let msg = format!(
                    "route {an:?} strips {prefix:?}, so it forwards \"{forwarded}\" into the paths of route {bn:?} (\"{bp}\") on the same \
                     upstream without {bn:?}'s rules: a request allowed on {an:?} would reach them unchecked; give {an:?} its own \
                     upstream, a narrower path, or rules at least as strict",
                    an = a.name,
                    bn = b.name,
                    bp = b.pattern
                );
                self.error(span.clone(), msg);
            }
        }
    }
}

/// Whether `o` is an origin as a browser serializes it in `Origin` (RFC 6454 §6.2): the exact comparison with
/// what browsers send can only ever match such a string.
fn is_serialized_origin(o: &str) -> bool {
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
fn origin_host(host: &str) -> String {
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
fn lenient_ipv4(s: &str) -> Option<std::net::Ipv4Addr> {
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

fn canonical_or_empty(segment: &str) -> Result<String, String> {
    if segment.is_empty() {
        Ok(String::new())
    } else {
        crate::router::canonical_segment(segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert!(parse_size("10XB").is_err());
    }

    #[test]
    fn one_iss_may_be_configured_only_once() {
        let issuer = |id: &str| {
            format!("[[issuers]]\nid = \"{id}\"\nissuer = \"https://idp.test\"\nalgorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n")
        };
        let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n{}{}", issuer("a"), issuer("b"));
        let err = Config::from_toml(Path::new("dup.toml"), &text).expect_err("duplicate iss must not load").to_string();
        assert!(err.contains("configured twice"), "{err}");
    }

    #[test]
    fn case_insensitive_paths_must_be_ascii() {
        let text = |path: &str, ci: bool| {
            format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\n[routing]\ncase_insensitive = {ci}\n[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n\
                 [[routes]]\nname = \"r\"\npath = \"{path}\"\nupstream = \"a\"\nauth = \"public\"\n"
            )
        };
        let e = Config::from_toml(Path::new("g.toml"), &text("/café/*", true)).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("must be ASCII"), "{e}");
        Config::from_toml(Path::new("g.toml"), &text("/café/*", false)).expect("case-sensitive non-ASCII");
        Config::from_toml(Path::new("g.toml"), &text("/cafe/*", true)).expect("case-insensitive ASCII");
    }

    #[test]
    fn upstream_hosts_are_compared_as_resolvers_read_them() {
        assert_eq!(lenient_ipv4("127.1"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(lenient_ipv4("0x7f.0.0.1"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(lenient_ipv4("017700000001"), Some(std::net::Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(lenient_ipv4("10.1.2"), Some(std::net::Ipv4Addr::new(10, 1, 0, 2)));
        for bad in ["api", "1..2", "256.1.1.1", "1.2.3.4.5", "0x", "+1.2.3.4", "1.2.3.256", ""] {
            assert_eq!(lenient_ipv4(bad), None, "{bad}");
        }
        assert_eq!(origin_host("api.internal."), "api.internal");
        assert_eq!(origin_host("[::1]"), "loopback");
        assert_eq!(origin_host("10.000.0.1"), "10.0.0.1");
    }

    #[test]
    fn a_stripping_route_may_not_forward_into_stricter_routes_of_its_upstream() {
        let load = |routes: &str| {
            let text = format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.a]\nurl = \"http://127.0.0.1:1\"\n[upstreams.b]\nurl = \"http://127.0.0.1:1\"\n\
                 [upstreams.other]\nurl = \"http://127.0.0.1:2\"\n[[issuers]]\nid = \"i\"\nissuer = \"https://idp.test\"\n\
                 algorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n{routes}"
            );
            Config::from_toml(Path::new("g.toml"), &text).map(|_| ()).map_err(|e| e.to_string())
        };
        let route = |name: &str, path: &str, up: &str, rest: &str| {
            format!("[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"{up}\"\n{rest}\n")
        };
        let admin = route("admin", "/admin/*", "a", "roles_any = [\"admin\"]");
        let profile = route("profile", "/users/{id}", "a", "claims = { sub = \"{id}\" }\nbypass_roles = [\"admin\"]");

        // Any token, stripped to "/*", on the same upstream, or on another name for the same origin: refused.
        for up in ["a", "b"] {
            let e = load(&format!("{admin}{}", route("api", "/api/*", up, "strip_prefix = \"/api\""))).expect_err("a bypass must not load");
            assert!(e.contains("route \"api\" strips \"/api\"") && e.contains("route \"admin\" (\"/admin/*\")"), "{e}");
        }
        // Public, stripped to "/users/{id}": refused (the claim rule is skipped); an admin-only route may (admins bypass it).
        let e = load(&format!("{profile}{}", route("v2", "/v2/users/*", "a", "auth = \"public\"\nstrip_prefix = \"/v2\""))).unwrap_err();
        assert!(e.contains("\"profile\""), "{e}");
        load(&format!("{profile}{}", route("v2", "/v2/users/*", "a", "roles_any = [\"admin\"]\nstrip_prefix = \"/v2\"")))
            .expect("admins bypass the claim");

        // Two stripping routes compare what each forwards: public "/up/x" and token-only "/pup/x" both reach "/x".
        let pup = route("pup", "/pup/*", "a", "strip_prefix = \"/pup\"");
        let e = load(&format!("{pup}{}", route("up", "/up/*", "a", "auth = \"public\"\nstrip_prefix = \"/up\""))).unwrap_err();
        assert!(e.contains("route \"up\" strips") && e.contains("\"pup\""), "{e}");

        // The same server under another spelling, and a trailing slash, do not escape the check.
        for host in ["localhost", "127.1", "0x7f.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "0.0.0.0", "127.0.0.1.", "LocalHost"] {
            let spelled = format!("[upstreams.c]\nurl = \"http://{host}:1/\"\n");
            let e = load(&format!("{admin}{}{spelled}", route("api", "/api/*", "c", "strip_prefix = \"/api\""))).expect_err(host);
            assert!(e.contains("\"admin\""), "{host}: {e}");
        }
        let users = route("users", "/users", "a", "roles_any = [\"admin\"]");
        let e = load(&format!("{users}{}", route("v1", "/v1/users/", "a", "strip_prefix = \"/v1\""))).unwrap_err();
        assert!(e.contains("\"users\""), "{e}");
        // A public route may not strip into an optional one: it passes on tokens the optional route would refuse.
        let maybe = route("maybe", "/maybe/*", "a", "auth = \"optional\"");
        assert!(load(&format!("{maybe}{}", route("p", "/p/*", "a", "auth = \"public\"\nstrip_prefix = \"/p\""))).is_err());
        load(&format!("{maybe}{}", route("r", "/r/*", "a", "strip_prefix = \"/r\""))).expect("a token route into an optional one");

        // Allowed: another origin; paths that cannot meet; rules as strict or stricter; a weaker route.
        load(&format!("{admin}{}", route("api", "/api/*", "other", "strip_prefix = \"/api\""))).expect("another origin");
        let elsewhere = "[upstreams.c]\nurl = \"http://10.0.0.1:1/\"\n";
        load(&format!("{admin}{}{elsewhere}", route("api", "/api/*", "c", "strip_prefix = \"/api\""))).expect("another host");
        load(&format!("{admin}{}", route("api", "/api/items/*", "a", "strip_prefix = \"/api\""))).expect("stripped into /items/* only");
        load(&format!("{admin}{}", route("api", "/api/*", "a", "roles_all = [\"admin\", \"ops\"]\nstrip_prefix = \"/api\"")))
            .expect("stricter rules");
        let public = route("public", "/public/*", "a", "auth = \"public\"");
        load(&format!("{public}{}", route("v1", "/v1/*", "a", "strip_prefix = \"/v1\""))).expect("into a public route");
        // A prefix the route's paths never start with strips nothing.
        load(&format!("{admin}{}", route("api", "/api/*", "a", "strip_prefix = \"/apx\""))).expect("nothing stripped");
    }

    #[test]
    fn zero_timeouts_do_not_load() {
        for key in ["idle_timeout", "header_read_timeout"] {
            let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n[limits]\n{key} = \"0s\"\n");
            let e = Config::from_toml(Path::new("g.toml"), &text).map(|_| ()).expect_err("a zero timeout").to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn cors_origins_must_be_written_as_browsers_send_them() {
        for ok in ["https://app.example.com", "http://localhost:3000", "https://[::1]:8443", "http://[::1]", "capacitor://localhost"] {
            assert!(is_serialized_origin(ok), "{ok}");
        }
        for bad in [
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://APP.example.com",
            "HTTPS://app.example.com",
            "https://app.example.com:443",
            "http://app.example.com:80",
            "https://*.example.com",
            "https://a.com, https://b.com",
            "file://",
            "app.example.com",
        ] {
            assert!(!is_serialized_origin(bad), "{bad}");
        }
    }

    #[test]
    fn the_forwarded_header_is_one_of_two_fields() {
        let load = |h: &str| {
            Config::from_toml(Path::new("g.toml"), &format!("[listen]\nhttp = \"127.0.0.1:0\"\n[rate_limit]\nforwarded_header = \"{h}\"\n"))
        };
        assert_eq!(load("Forwarded").map(|c| c.forwarded_from).ok(), Some(crate::edge::ratelimit::ForwardedFrom::Forwarded));
        assert_eq!(load("x-forwarded-for").map(|c| c.forwarded_from).ok(), Some(crate::edge::ratelimit::ForwardedFrom::XForwardedFor));
        let e = load("x-real-ip").map(|_| ()).expect_err("another field").to_string();
        assert!(e.contains("forwarded_header"), "{e}");
    }

    #[test]
    fn an_ipv6_prefix_longer_than_an_address_does_not_load() {
        let load = |n: u32| {
            Config::from_toml(Path::new("g.toml"), &format!("[listen]\nhttp = \"127.0.0.1:0\"\n[rate_limit]\nipv6_prefix = {n}\n"))
        };
        assert!(load(128).is_ok());
        let e = load(129).map(|_| ()).expect_err("129 bits").to_string();
        assert!(e.contains("ipv6_prefix 129"), "{e}");
    }

    #[test]
    fn an_identity_provider_without_audiences_is_warned_about() {
        let load = |audiences: &str| {
            let text = format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\n[[issuers]]\nid = \"idp\"\nissuer = \"https://idp.test\"\n\
                 algorithms = [\"RS256\"]\njwks_url = \"https://idp.test/keys\"\n{audiences}"
            );
            Config::from_toml(Path::new("g.toml"), &text).expect("loads").warnings.iter().map(|w| w.message.clone()).collect::<Vec<_>>()
        };
        let w = load("");
        assert!(w.iter().any(|w| w.contains("issuer \"idp\" has no `audiences`") && w.contains("ID tokens")), "{w:?}");
        assert!(load("audiences = [\"api\"]").is_empty());
    }

    #[test]
    fn a_subject_limit_on_a_public_route_is_warned_about() {
        let load = |auth: &str, key: &str| {
            let text = format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.api]\nurl = \"http://127.0.0.1:9\"\n[[issuers]]\nid = \"i\"\n\
                 issuer = \"https://i.test\"\naudiences = [\"api\"]\nalgorithms = [\"RS256\"]\njwks_url = \"https://i.test/keys\"\n\
                 [[routes]]\nname = \"r\"\npath = \"/*\"\nupstream = \"api\"\nauth = \"{auth}\"\n\
                 rate_limit = {{ key = \"{key}\", rate = \"1/s\" }}\n"
            );
            Config::from_toml(Path::new("g.toml"), &text).expect("loads").warnings.iter().map(|w| w.message.clone()).collect::<Vec<_>>()
        };
        for key in ["subject", "claim:tenant"] {
            let w = load("public", key);
            assert!(w.iter().any(|w| w.contains("is public") && w.contains("client address")), "{key}: {w:?}");
            assert!(load("required", key).is_empty(), "{key}");
        }
        assert!(load("public", "ip").is_empty());
    }

    #[test]
    fn an_upstream_ca_file_must_be_a_readable_pem_ca_and_only_for_https() {
        let dir = std::env::temp_dir().join(format!("portcullis-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("empty.pem"), "not a certificate\n").expect("write");
        let load = |url: &str, ca: &str| {
            let text = format!("[listen]\nhttp = \"127.0.0.1:0\"\n[upstreams.u]\nurl = \"{url}\"\nca_file = \"{ca}\"\n");
            Config::from_toml(&dir.join("gateway.toml"), &text).map(|_| ()).map_err(|e| e.to_string())
        };
        let e = load("http://127.0.0.1:1", "empty.pem").expect_err("ca_file on http");
        assert!(e.contains("https:// upstreams only") && e.contains(":4:7"), "{e}");
        let e = load("https://127.0.0.1:1", "missing.pem").expect_err("unreadable ca_file");
        assert!(e.contains("missing.pem"), "{e}");
        let e = load("https://127.0.0.1:1", "empty.pem").expect_err("a file without certificates");
        assert!(e.contains("no PEM certificate"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn mutated_configs_are_refused_with_locations_never_a_panic() {
        // Seeded edits of the shipped gateway.toml (lines dropped, repeated or swapped; values retyped; stray and
        // non-ASCII characters): `check` either accepts the result or locates every problem in it.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("gateway.toml");
        let shipped = std::fs::read_to_string(&path).unwrap();
        assert!(Config::check(&path).is_ok(), "the shipped config checks");
        const PIECES: [&str; 16] = ["\"", "'", "=", "[", "]", "{", "}", ",", "#", "\n", "é", "0", "-1", "\"\"", "true", "[[routes]]\n"];
        let seed = std::env::var("PORTCULLIS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x2545_F491_4F6C_DD1Du64);
        let mut state = seed | 1;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        };
        let (mut refused, mut accepted) = (0, 0);
        for round in 0..1500 {
            let mut lines: Vec<String> = shipped.lines().map(str::to_string).collect();
            for _ in 0..1 + next(3) {
                let at = next(lines.len());
                match next(6) {
                    0 => drop(lines.remove(at)),
                    1 => lines.insert(at, lines[at].clone()),
                    2 => {
                        let other = next(lines.len());
                        lines.swap(at, other);
                    }
                    3 => {
                        // A value of another type, or none.
                        if let Some((key, _)) = lines[at].split_once(" = ") {
                            lines[at] = format!("{key} = {}", ["1", "\"x\"", "[]", "{}", "true", "\"10x\"", ""][next(7)]);
                        }
                    }
                    _ => {
                        let line = &mut lines[at];
                        let mut cut = next(line.len() + 1);
                        while !line.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        line.insert_str(cut, PIECES[next(PIECES.len())]);
                    }
                }
            }
            let text = lines.join("\n");
            match Config::parse(&path, &text, false) {
                Ok(_) => accepted += 1,
                Err(ConfigError::Invalid { problems, .. }) => {
                    refused += 1;
                    let line_count = text.lines().count().max(1);
                    assert!(!problems.is_empty(), "round {round}: refused without a problem");
                    for p in &problems {
                        assert!(p.line >= 1 && p.line <= line_count + 1 && p.column >= 1, "round {round} (seed {seed}): {p:?} in\n{text}");
                        assert!(!p.message.is_empty(), "round {round}: {p:?}");
                    }
                }
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(refused > 300 && accepted > 100, "refused {refused}, accepted {accepted}: the edits test little");
    }
}
