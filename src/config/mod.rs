//! gateway.toml: the file structs (deny_unknown_fields), their validation, and the checked runtime `Config`.
//!
//! Everything that can be wrong with a config is found here, once, with a `file:line:column`; the request path
//! only ever sees the checked types.

mod env;
mod file;
mod issuers;
mod routes;
mod store;
#[cfg(test)]
mod tests;
mod token_endpoint;
mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::IssuerSettings;
use crate::edge::client_addr::Cidr;
use crate::edge::cors::CorsPolicy;
use crate::edge::headers_request::IdentitySettings;
use crate::edge::headers_response::SecureHeaders;
use crate::edge::ratelimit::LimitSettings;
use crate::router::RouteTable;
use crate::token_endpoint::TokenEndpointSettings;
use crate::upstream::{RouteCall, UpstreamSettings};

use file::HeadersFile;
pub use units::{format_duration, parse_duration, parse_size, DurationValue, SizeValue};

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

// ---------------------------------------------------------------------------------------------------------------
// The file as written.

// ---------------------------------------------------------------------------------------------------------------
// The checked runtime config.

/// The listeners to bind. Port 0 asks the OS for a free port.
#[derive(Debug, Clone)]
pub struct Listen {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// Forward-auth decisions only (`[forward_auth]`): every request there is a decision.
    pub decisions: Option<SocketAddr>,
}

/// Where the TLS certificate and key live, and how the handshake is bounded.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub self_signed: bool,
    pub min_version: TlsVersion,
    pub handshake_timeout: Duration,
    /// Resumption by stateless session tickets (TLS 1.3 and 1.2); off: only TLS 1.2 session IDs resume.
    pub session_tickets: bool,
    /// Client certificates (mTLS): the CAs that sign them, whether every connection must present one, the CRL.
    pub client_ca: Option<PathBuf>,
    pub client_auth_required: bool,
    pub client_crl: Option<PathBuf>,
}

/// Connection and request limits (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_header_bytes: usize,
    pub max_body_bytes: u64,
    pub header_read_timeout: Duration,
    /// What `idle_timeout` bounds.
    pub idle: IdleBounds,
    pub max_connections: usize,
    /// Connections one client address (IPv6: its `ipv6_prefix`) may hold; trusted proxies are not counted.
    pub max_connections_per_client: usize,
    /// Requests one client address may have in flight across all its connections and HTTP/2 streams (trusted
    /// proxies are not counted); more are 429.
    pub max_requests_per_client: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    pub drain_timeout: Duration,
}

/// The three waits on a client that does nothing, all set by `[limits] idle_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleBounds {
    /// An HTTP/1 connection waiting for its next request is closed after this.
    pub keep_alive: Duration,
    /// A connection served by hyper that has served nothing for this long is closed gracefully (GOAWAY on
    /// HTTP/2), checked once per this long, so within twice it; HTTP/2 pings go out at this interval too.
    pub connection: Duration,
    /// A write the client takes none of for this long closes the connection (nginx's `send_timeout`); an HTTP/2
    /// stream whose answer it stops taking for this long has the answer dropped.
    pub send_stall: Duration,
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

/// The whole checked configuration. Built only by [`Config::load`] / [`Config::from_toml`].
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: Listen,
    pub tls: Option<TlsSettings>,
    pub limits: ConnectionLimits,
    pub worker_threads: Option<usize>,
    /// One log line per request (target `portcullis::access`).
    pub access_log: bool,
    pub upstreams: BTreeMap<String, UpstreamSettings>,
    pub routes: RouteTable,
    /// Each route's timeout and retries, by route index.
    pub route_calls: Vec<RouteCall>,
    /// The forward-auth decision endpoint.
    pub forward_auth: Option<crate::edge::forward_auth::ForwardAuthSettings>,
    pub trusted_proxies: Vec<Cidr>,
    /// The field trusted proxies name the client in.
    pub forwarded_from: crate::edge::client_addr::ForwardedFrom,
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
    /// The shared store (`[store]`): shared limits, failed logins and revocations across replicas.
    pub store: Option<crate::store::StoreSettings>,
    /// OpenTelemetry spans, when `[tracing]` is set.
    pub tracing: Option<Arc<crate::telemetry::TracingSettings>>,
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

    pub(crate) fn parse(path: &Path, text: &str, generate: bool) -> Result<Config, ConfigError> {
        let invalid = |problems| ConfigError::Invalid { path: path.to_path_buf(), problems };
        // A file that does not parse has no tables to read: its syntax error is its one problem.
        let mut doc = toml::de::DeTable::parse(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            invalid(vec![Problem { line, column, message: e.message().trim().to_string() }])
        })?;
        let mut found = Vec::new();
        env::expand(doc.get_mut(), &|name| std::env::var(name).ok(), &mut found);
        let file = file::read(doc, &mut found);
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut v = Validator {
            text,
            default_cookie: None,
            client_certs: false,
            store_replicas: None,
            store_failed: false,
            route_headers_base: None,
            generate,
            notes: Vec::new(),
            resolved: Default::default(),
            base,
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        for (span, message) in found {
            v.error(span, message);
        }
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
    /// `[tls] client_ca` is set: routes may have client certificate rules.
    client_certs: bool,
    /// `[store] expected_replicas` when `[store]` is valid: limits may be shared.
    store_replicas: Option<u32>,
    /// `[store]` was written but is invalid (a shared limit is not told it is missing).
    store_failed: bool,
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
}
