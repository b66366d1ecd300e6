//! gateway.toml as written: plain serde structs, every one `deny_unknown_fields`. Validation turns them into the
//! stages' own settings types; nothing outside `config` sees these.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::auth::authz::AuthMode;

use super::units::{DurationValue, SizeValue};
use super::TlsVersion;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Spanned<ListenFile>,
    pub(super) tls: Option<TlsFile>,
    #[serde(default)]
    pub(super) limits: LimitsFile,
    #[serde(default)]
    pub(super) server: ServerFile,
    #[serde(default)]
    pub(super) upstreams: BTreeMap<String, UpstreamFile>,
    #[serde(default)]
    pub(super) routes: Vec<RouteFile>,
    #[serde(default)]
    pub(super) routing: RoutingFile,
    #[serde(default)]
    pub(super) rate_limit: RateLimitFile,
    #[serde(default)]
    pub(super) issuers: Vec<Spanned<IssuerFile>>,
    #[serde(default)]
    pub(super) identity: Option<IdentityFile>,
    pub(super) token_endpoint: Option<Spanned<TokenEndpointFile>>,
    pub(super) headers: Option<Spanned<HeadersFile>>,
    pub(super) cors: Option<Spanned<CorsFile>>,
    pub(super) admin: Option<Spanned<AdminFile>>,
    #[serde(default)]
    pub(super) auth: AuthFile,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LoginLimitFile {
    pub(super) rate: String,
    pub(super) burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListenFile {
    pub(super) https: Option<Spanned<String>>,
    pub(super) http: Option<Spanned<String>>,
    pub(super) admin: Option<Spanned<String>>,
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
    pub(super) url: Spanned<String>,
    pub(super) connect_timeout: Option<DurationValue>,
    pub(super) timeout: Option<DurationValue>,
    #[serde(default = "yes")]
    pub(super) preserve_host: bool,
    pub(super) ca_file: Option<PathBuf>,
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
}

fn ip_key() -> String {
    "ip".into()
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
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum PublicKeyFile {
    Path(PathBuf),
    WithKid { path: PathBuf, kid: String },
}

/// `[[issuers]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct IssuerFile {
    pub(super) id: String,
    pub(super) issuer: String,
    pub(super) audiences: Option<Vec<String>>,
    pub(super) algorithms: Vec<String>,
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

impl IssuerFile {
    /// Returns the issuer's id as written.
    pub fn id(&self) -> &str {
        &self.id
    }
}
