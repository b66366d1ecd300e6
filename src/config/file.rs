//! gateway.toml as written: plain serde structs, every one `deny_unknown_fields`. Validation turns them into the
//! stages' own settings types; nothing outside `config` sees these.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use crate::auth::authz::AuthMode;

use super::units::{DurationValue, SizeValue};
use super::TlsVersion;

/// The file as written. Each top-level table, each `[upstreams.NAME]` and each `[[routes]]`/`[[issuers]]` entry is
/// deserialized on its own by [`read`], so one mistake does not hide the others; what failed is left out here (its
/// problem is already reported) and named in `failed`.
#[derive(Debug, Default)]
pub(super) struct FileConfig {
    pub(super) listen: Option<Spanned<ListenFile>>,
    pub(super) tls: Option<TlsFile>,
    pub(super) limits: LimitsFile,
    pub(super) server: ServerFile,
    pub(super) upstreams: BTreeMap<String, UpstreamFile>,
    pub(super) routes: Vec<RouteFile>,
    pub(super) routing: RoutingFile,
    pub(super) rate_limit: RateLimitFile,
    pub(super) issuers: Vec<Spanned<IssuerFile>>,
    pub(super) identity: Option<IdentityFile>,
    pub(super) token_endpoint: Option<Spanned<TokenEndpointFile>>,
    pub(super) headers: Option<Spanned<HeadersFile>>,
    pub(super) cors: Option<Spanned<CorsFile>>,
    pub(super) admin: Option<Spanned<AdminFile>>,
    pub(super) auth: AuthFile,
    pub(super) tracing: Option<Spanned<TracingFile>>,
    pub(super) forward_auth: Option<Spanned<ForwardAuthFile>>,
    pub(super) store: Option<Spanned<StoreFile>>,
    pub(super) failed: Failed,
}

/// What failed to deserialize, so that validation does not report it a second time through what depends on it
/// (a route naming a rejected upstream is not told the upstream is missing).
#[derive(Debug, Default)]
pub(super) struct Failed {
    pub(super) listen: bool,
    pub(super) tls: bool,
    /// Names of `[upstreams.NAME]` tables that failed.
    pub(super) upstreams: HashSet<String>,
    /// `upstreams` itself is not a table: any name may have been meant.
    pub(super) all_upstreams: bool,
    /// Ids of `[[issuers]]` entries that failed.
    pub(super) issuers: HashSet<String>,
    /// An entry failed before its id could be read, or `issuers` is not an array of tables: any id may have been meant.
    pub(super) unnamed_issuer: bool,
    /// `[store]` failed: a limit asking for it is not told it is missing.
    pub(super) store: bool,
}

/// The top-level tables, in the order unknown-key messages list them (tests/docs.rs reads that list).
pub(super) const TABLES: &[&str] = &[
    "listen",
    "tls",
    "limits",
    "server",
    "upstreams",
    "routes",
    "routing",
    "rate_limit",
    "issuers",
    "identity",
    "token_endpoint",
    "headers",
    "cors",
    "admin",
    "auth",
    "tracing",
    "forward_auth",
    "store",
];

/// A problem found while deserializing: where, and serde's or toml's words for it.
pub(super) type Found = (Range<usize>, String);

/// Deserializes one table or value on its own; its problem, if any, goes to `found`.
fn take<T: DeserializeOwned>(value: Spanned<DeValue<'_>>, found: &mut Vec<Found>) -> Option<T> {
    let span = value.span();
    match T::deserialize(ValueDeserializer::from(value)) {
        Ok(t) => Some(t),
        Err(e) => {
            found.push((e.span().unwrap_or(span), e.message().trim().to_string()));
            None
        }
    }
}

/// Splits a parsed document into its tables and deserializes each on its own, collecting every problem.
pub(super) fn read(doc: Spanned<DeTable<'_>>, found: &mut Vec<Found>) -> FileConfig {
    let doc_span = doc.span();
    let mut f = FileConfig::default();
    for (key, value) in doc.into_inner() {
        let key_span = key.span();
        match key.get_ref().as_ref() {
            "listen" => {
                f.listen = take(value, found);
                f.failed.listen = f.listen.is_none();
            }
            "tls" => {
                f.tls = take(value, found);
                f.failed.tls = f.tls.is_none();
            }
            "limits" => f.limits = take(value, found).unwrap_or_default(),
            "server" => f.server = take(value, found).unwrap_or_default(),
            "upstreams" => read_upstreams(value, &mut f, found),
            "routes" => {
                for entry in entries::<RouteFile>(value, found) {
                    f.routes.extend(take(entry, found));
                }
            }
            "routing" => f.routing = take(value, found).unwrap_or_default(),
            "rate_limit" => f.rate_limit = take(value, found).unwrap_or_default(),
            "issuers" => read_issuers(value, &mut f, found),
            "identity" => f.identity = take(value, found),
            "token_endpoint" => f.token_endpoint = take(value, found),
            "headers" => f.headers = take(value, found),
            "cors" => f.cors = take(value, found),
            "admin" => f.admin = take(value, found),
            "auth" => f.auth = take(value, found).unwrap_or_default(),
            "tracing" => f.tracing = take(value, found),
            "forward_auth" => f.forward_auth = take(value, found),
            "store" => {
                f.store = take(value, found);
                f.failed.store = f.store.is_none();
            }
            other => found.push((key_span, <toml::de::Error as serde::de::Error>::unknown_field(other, TABLES).message().to_string())),
        }
    }
    if f.listen.is_none() && !f.failed.listen {
        f.failed.listen = true;
        found.push((doc_span, <toml::de::Error as serde::de::Error>::missing_field("listen").message().to_string()));
    }
    // Reported in the order they are written, whatever order the tables were read in.
    found.sort_by_key(|(span, _)| (span.start, span.end));
    f
}

/// The entries of an array of tables. Anything else is deserialized as the whole array, for serde's own words on
/// what is wrong with it, and gives no entries.
fn entries<'i, T: DeserializeOwned>(value: Spanned<DeValue<'i>>, found: &mut Vec<Found>) -> Vec<Spanned<DeValue<'i>>> {
    let span = value.span();
    match value.into_inner() {
        DeValue::Array(items) => items.into_iter().collect(),
        other => {
            let _ = take::<Vec<T>>(Spanned::new(span, other), found);
            Vec::new()
        }
    }
}

fn read_upstreams(value: Spanned<DeValue<'_>>, f: &mut FileConfig, found: &mut Vec<Found>) {
    let span = value.span();
    match value.into_inner() {
        DeValue::Table(table) => {
            for (name, u) in table {
                let name = name.into_inner().into_owned();
                let at = u.span();
                match take::<UpstreamFile>(u, found) {
                    Some(mut u) => {
                        u.span = at;
                        f.upstreams.insert(name, u);
                    }
                    None => {
                        f.failed.upstreams.insert(name);
                    }
                }
            }
        }
        other => {
            let _ = take::<BTreeMap<String, UpstreamFile>>(Spanned::new(span, other), found);
            f.failed.all_upstreams = true;
        }
    }
}

fn read_issuers(value: Spanned<DeValue<'_>>, f: &mut FileConfig, found: &mut Vec<Found>) {
    if !value.get_ref().is_array() {
        f.failed.unnamed_issuer = true;
    }
    for entry in entries::<IssuerFile>(value, found) {
        // Read before the entry is consumed: routes and the token endpoint name issuers by this id.
        let id = entry.get_ref().as_table().and_then(|t| t.get("id")).and_then(|id| id.get_ref().as_str()).map(str::to_string);
        match (take::<Spanned<IssuerFile>>(entry, found), id) {
            (Some(i), _) => f.issuers.push(i),
            (None, Some(id)) => {
                f.failed.issuers.insert(id);
            }
            (None, None) => f.failed.unnamed_issuer = true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    /// An environment variable holding a bearer token the admin listener requires.
    pub(super) token_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenEndpointFile {
    pub(super) path: Option<String>,
    pub(super) issuer: String,
    pub(super) private_key: Option<PathBuf>,
    pub(super) users_file: Option<PathBuf>,
    pub(super) clients_file: Option<PathBuf>,
    pub(super) access_token_ttl: Option<DurationValue>,
    pub(super) rate_limit: Option<LoginLimitFile>,
    #[serde(default)]
    pub(super) allow_plaintext: bool,
    /// The RFC 7009 revocation endpoint for the tokens this endpoint issued.
    pub(super) revocation_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginLimitFile {
    pub(super) rate: String,
    pub(super) burst: Option<u32>,
    /// Where failed attempts are counted (default: `shared` with a `[store]`, else `local`).
    pub(super) store: Option<Spanned<LimitStoreFile>>,
}

/// `[store]`: the Redis that replicas share state in.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreFile {
    pub(super) url: Option<Spanned<String>>,
    pub(super) sentinels: Option<Spanned<Vec<String>>>,
    pub(super) master_name: Option<Spanned<String>>,
    /// The database of a Sentinel-managed primary (a URL names its own).
    pub(super) database: Option<i64>,
    /// TLS to a Sentinel-managed primary (a URL says so by `rediss://`).
    #[serde(default)]
    pub(super) tls: bool,
    pub(super) username: Option<String>,
    pub(super) password_env: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<PathBuf>>,
    pub(super) timeout: Option<Spanned<DurationValue>>,
    pub(super) pool_size: Option<Spanned<usize>>,
    pub(super) expected_replicas: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum LimitStoreFile {
    Local,
    Shared,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum OnStoreErrorFile {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenFile {
    pub(super) https: Option<Spanned<String>>,
    pub(super) http: Option<Spanned<String>>,
    pub(super) admin: Option<Spanned<String>>,
    /// A plain-http listener for forward-auth decisions only.
    pub(super) decisions: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TlsFile {
    pub(super) cert: Spanned<PathBuf>,
    pub(super) key: Spanned<PathBuf>,
    #[serde(default)]
    pub(super) self_signed: bool,
    #[serde(default)]
    pub(super) min_version: TlsVersion,
    pub(super) handshake_timeout: Option<DurationValue>,
    /// Stateless session tickets for resumption (default true).
    pub(super) session_tickets: Option<bool>,
    /// PEM CA certificates that sign client certificates (mTLS).
    pub(super) client_ca: Option<Spanned<PathBuf>>,
    /// `optional` (default with `client_ca`) or `required`.
    pub(super) client_auth: Option<ClientAuthFile>,
    /// A PEM CRL of revoked client certificates, read again on every reload.
    pub(super) client_crl: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsFile {
    pub(super) max_header_bytes: Option<SizeValue>,
    pub(super) max_body_bytes: Option<SizeValue>,
    pub(super) header_read_timeout: Option<Spanned<DurationValue>>,
    pub(super) idle_timeout: Option<Spanned<DurationValue>>,
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) max_connections_per_client: Option<Spanned<usize>>,
    pub(super) max_requests_per_client: Option<Spanned<usize>>,
    pub(super) max_concurrent_streams: Option<Spanned<u32>>,
    pub(super) drain_timeout: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServerFile {
    pub(super) worker_threads: Option<Spanned<usize>>,
    pub(super) access_log: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpstreamFile {
    /// One target (the form before pools); `targets` names several.
    pub(super) url: Option<Spanned<String>>,
    pub(super) targets: Option<Spanned<Vec<Spanned<TargetFile>>>>,
    pub(super) balance: Option<Spanned<String>>,
    pub(super) protocol: Option<ProtocolFile>,
    pub(super) resolve_every: Option<Spanned<DurationValue>>,
    pub(super) health: Option<Spanned<HealthFile>>,
    pub(super) connect_timeout: Option<DurationValue>,
    pub(super) timeout: Option<DurationValue>,
    #[serde(default = "yes")]
    pub(super) preserve_host: bool,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) max_connections: Option<Spanned<usize>>,
    pub(super) queue_timeout: Option<DurationValue>,
    /// Where the table is in the file (set after reading).
    #[serde(skip)]
    pub(super) span: std::ops::Range<usize>,
}

/// A target: its URL, or `{ url, weight }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum TargetFile {
    Url(String),
    Weighted(WeightedTargetFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WeightedTargetFile {
    pub(super) url: String,
    pub(super) weight: Option<i64>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum ProtocolFile {
    Http1,
    H2,
    Auto,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HealthFile {
    pub(super) path: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<DurationValue>>,
    pub(super) timeout: Option<Spanned<DurationValue>>,
    pub(super) healthy_after: Option<Spanned<u32>>,
    pub(super) unhealthy_after: Option<Spanned<u32>>,
    pub(super) eject_after_errors: Option<u32>,
    pub(super) eject_for: Option<DurationValue>,
    pub(super) max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForwardAuthFile {
    pub(super) path: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RetriesFile {
    pub(super) attempts: Option<Spanned<u32>>,
    pub(super) on: Option<Spanned<Vec<String>>>,
    pub(super) budget_percent: Option<Spanned<u32>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RouteFile {
    pub(super) name: Spanned<String>,
    pub(super) path: Spanned<String>,
    pub(super) methods: Option<Spanned<Vec<String>>>,
    pub(super) upstream: Spanned<String>,
    /// Overrides the upstream's `timeout`.
    pub(super) timeout: Option<Spanned<DurationValue>>,
    /// `"required"`: the connection must have presented a verified client certificate.
    pub(super) client_cert: Option<Spanned<String>>,
    pub(super) cert_subject: Option<String>,
    pub(super) cert_san_any: Option<Vec<String>>,
    pub(super) retries: Option<Spanned<RetriesFile>>,
    pub(super) strip_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) auth: AuthMode,
    pub(super) issuers: Option<Spanned<Vec<String>>>,
    pub(super) roles_any: Option<Vec<String>>,
    pub(super) roles_all: Option<Vec<String>>,
    pub(super) scopes_any: Option<Vec<String>>,
    pub(super) scopes_all: Option<Vec<String>>,
    pub(super) claims: Option<Spanned<BTreeMap<String, String>>>,
    pub(super) bypass_roles: Option<Vec<String>>,
    pub(super) rate_limit: Option<Spanned<LimitFile>>,
    pub(super) headers: Option<Spanned<HeadersFile>>,
    pub(super) cors: Option<Spanned<CorsFile>>,
    /// A cookie that may carry the token on this route (overrides `[auth] token_cookie`).
    pub(super) token_cookie: Option<String>,
    /// Opt in to a token in this query parameter; it is removed before forwarding.
    pub(super) token_query: Option<String>,
    /// Serve paths a second decoding would resolve (`%252e`, `..%3B`): only for an upstream that decodes once.
    #[serde(default)]
    pub(super) allow_double_encoding: bool,
    /// A public route forwards the client's `Authorization` unverified (else it is removed).
    pub(super) pass_authorization: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AuthFile {
    /// A cookie that may carry the token on every route.
    pub(super) token_cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitFile {
    #[serde(default = "ip_key")]
    pub(super) key: String,
    pub(super) rate: String,
    pub(super) burst: Option<u32>,
    /// `local` (this replica's counters, the default) or `shared` (in `[store]`, across replicas).
    pub(super) store: Option<Spanned<LimitStoreFile>>,
    /// A shared limit whose store is down: `local` (default), `allow` or `deny`.
    pub(super) on_store_error: Option<Spanned<OnStoreErrorFile>>,
}

fn ip_key() -> String {
    "ip".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TracingFile {
    pub(super) otlp_endpoint: Spanned<String>,
    pub(super) sample_ratio: Option<Spanned<f64>>,
    pub(super) service_name: Option<Spanned<String>>,
    pub(super) trust_incoming: Option<TrustIncomingFile>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) max_queue_spans: Option<Spanned<usize>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum TrustIncomingFile {
    All,
    TrustedProxies,
    None,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HeadersFile {
    pub(super) hsts: Option<String>,
    pub(super) content_type_options: Option<String>,
    pub(super) frame_options: Option<String>,
    pub(super) referrer_policy: Option<String>,
    pub(super) content_security_policy: Option<String>,
    pub(super) permissions_policy: Option<String>,
    pub(super) cross_origin_opener_policy: Option<String>,
    pub(super) remove: Option<Vec<String>>,
    #[serde(rename = "override")]
    pub(super) override_upstream: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CorsFile {
    pub(super) allow_origins: Vec<String>,
    pub(super) allow_methods: Option<Vec<String>>,
    pub(super) allow_headers: Option<Vec<String>>,
    pub(super) expose_headers: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allow_credentials: bool,
    pub(super) max_age: Option<DurationValue>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RoutingFile {
    #[serde(default)]
    pub(super) case_insensitive: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitFile {
    #[serde(default)]
    pub(super) trusted_proxies: Vec<Spanned<String>>,
    pub(super) global: Option<Spanned<LimitFile>>,
    pub(super) ipv6_prefix: Option<Spanned<u8>>,
    pub(super) forwarded_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IdentityFile {
    #[serde(default)]
    pub(super) headers: BTreeMap<Spanned<String>, String>,
    #[serde(default = "yes")]
    pub(super) forward_authorization: bool,
    /// Remove the well-known identity headers of other gateways from every request.
    #[serde(default = "yes")]
    pub(super) strip_well_known: bool,
    /// More header names no client may send.
    #[serde(default)]
    pub(super) strip_also: Vec<Spanned<String>>,
    /// Where the upstream gets a verified client certificate's subject, SANs and thumbprint.
    pub(super) cert_subject_header: Option<Spanned<String>>,
    pub(super) cert_sans_header: Option<Spanned<String>>,
    pub(super) cert_thumbprint_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum PublicKeyFile {
    Path(PathBuf),
    WithKid(PublicKeyWithKid),
}

/// A table entry of `public_keys`: its own struct, so an unknown key in it is an error (an untagged enum's inline
/// variant would ignore it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PublicKeyWithKid {
    pub(super) path: PathBuf,
    pub(super) kid: String,
}

/// `[[issuers]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IssuerFile {
    pub(super) id: String,
    pub(super) issuer: String,
    /// `jwt` (the default) or `introspection` (opaque tokens, RFC 7662).
    pub(super) kind: Option<IssuerKind>,
    pub(super) audiences: Option<Vec<String>>,
    #[serde(default)]
    pub(super) algorithms: Vec<String>,
    pub(super) introspection_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret_env: Option<String>,
    pub(super) cache_for: Option<DurationValue>,
    pub(super) negative_cache_for: Option<DurationValue>,
    pub(super) introspect: Option<IntrospectWhich>,
    pub(super) introspection_timeout: Option<DurationValue>,
    pub(super) secret_env: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) public_keys: Option<Vec<PublicKeyFile>>,
    #[serde(default)]
    pub(super) discovery: bool,
    pub(super) jwks_url: Option<String>,
    pub(super) jwks_refresh: Option<DurationValue>,
    pub(super) jwks_refetch_cooldown: Option<DurationValue>,
    pub(super) jwks_timeout: Option<DurationValue>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) leeway: Option<DurationValue>,
    pub(super) max_lifetime: Option<DurationValue>,
    pub(super) roles_claim: Option<String>,
    pub(super) scopes_claim: Option<String>,
    pub(super) typ: Option<Vec<String>>,
    /// The signing key of the built-in token endpoint (asymmetric algorithms); its public half verifies.
    pub(super) private_key: Option<PathBuf>,
    /// Only for local use: generate an Ed25519 `private_key` if the file is missing.
    #[serde(default)]
    pub(super) generate_key: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum ClientAuthFile {
    Optional,
    Required,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum IssuerKind {
    Jwt,
    Introspection,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum IntrospectWhich {
    Opaque,
    All,
}

impl IssuerFile {
    /// Returns the issuer's id as written.
    pub fn id(&self) -> &str {
        &self.id
    }
}
