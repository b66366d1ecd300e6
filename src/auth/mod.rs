//! Bearer-token authentication: extracting the token, choosing the issuer and key, verifying the signature and
//! claims, and caching verified tokens until they expire.
//!
//! Threat model: the token is attacker-controlled bytes. Before any key is used we parse the JOSE header ourselves
//! and refuse everything we do not implement: `alg` outside the issuer's allow-list or unfit for the key it selects
//! (algorithm confusion, `none`), `crit`, `b64`, nested JWTs and JWEs, unexpected `typ`. `jku`/`x5u`/`jwk`/`x5c`
//! are never read, so a header can never make us fetch or trust a key. `kid` is only a map lookup. The payload is
//! parsed once, strictly (a repeated claim name is refused, not last-one-wins), and the same parse feeds the claim
//! checks, the policy and the identity headers. Claims of the wrong JSON type are refused, never coerced.
//! Token size is capped before decoding. Unknown `kid`s trigger at most one JWKS refetch per cool-down window.

pub mod authz;
pub mod jwks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{AuthMode, DurationValue, Validator};
use crate::auth::jwks::{JwkKey, KeySet};

/// Tokens larger than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. The label set is fixed (it is a metric label); the client never sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailReason {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    Issuer,
    Audience,
    UnknownKid,
    Algorithm,
    TooLarge,
}

impl FailReason {
    /// Returns the metric label.
    pub fn label(self) -> &'static str {
        match self {
            FailReason::Missing => "missing",
            FailReason::Malformed => "malformed",
            FailReason::BadSignature => "bad_signature",
            FailReason::Expired => "expired",
            FailReason::NotYetValid => "not_yet_valid",
            FailReason::Issuer => "issuer",
            FailReason::Audience => "audience",
            FailReason::UnknownKid => "unknown_kid",
            FailReason::Algorithm => "algorithm",
            FailReason::TooLarge => "too_large",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential at all: 401 without an `error` attribute (RFC 6750 §3.1).
    #[error("no bearer token")]
    Missing,
    /// More than one credential, or a credential in an unusable shape: 400 `invalid_request`.
    #[error("invalid request: {0}")]
    InvalidRequest(&'static str),
    /// A token that did not verify: 401 `invalid_token`. `detail` is for the log only.
    #[error("invalid token ({}): {detail}", reason.label())]
    InvalidToken { reason: FailReason, detail: String },
}

fn invalid(reason: FailReason, detail: impl Into<String>) -> AuthError {
    AuthError::InvalidToken { reason, detail: detail.into() }
}

impl AuthError {
    /// Returns the metric label for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => FailReason::Missing.label(),
            AuthError::InvalidRequest(_) => FailReason::Malformed.label(),
            AuthError::InvalidToken { reason, .. } => reason.label(),
        }
    }
}

/// The verified identity behind a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub issuer_id: String,
    pub subject: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    /// Every claim, from the one strict parse that was verified.
    pub claims: Arc<Map<String, Value>>,
    /// `exp`, in seconds since the epoch.
    pub expires_at: u64,
    /// The identity header values, rendered on first use and reused while the token is cached (the cache lives
    /// as long as the config, and with it the `[identity]` settings).
    pub identity_values: std::sync::OnceLock<Vec<Option<http::HeaderValue>>>,
    /// For a token of a JWKS issuer: the issuer's index and its key generation when the token was verified. A
    /// cached token is only reused while that generation is current.
    pub key_generation: Option<(usize, u64)>,
}

/// Finds a claim: a top-level name spelled exactly so wins (`https://example.com/roles`), else a dotted path
/// (`realm_access.roles`).
pub fn lookup_claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut cur = claims.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_object()?.get(p)?;
    }
    Some(cur)
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration.

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PublicKeyFile {
    Path(PathBuf),
    WithKid { path: PathBuf, kid: String },
}

/// `[[issuers]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerFile {
    id: String,
    issuer: String,
    audiences: Option<Vec<String>>,
    algorithms: Vec<String>,
    secret_env: Option<String>,
    secret_file: Option<PathBuf>,
    public_keys: Option<Vec<PublicKeyFile>>,
    #[serde(default)]
    discovery: bool,
    jwks_url: Option<String>,
    jwks_refresh: Option<DurationValue>,
    jwks_refetch_cooldown: Option<DurationValue>,
    jwks_timeout: Option<DurationValue>,
    ca_file: Option<PathBuf>,
    leeway: Option<DurationValue>,
    max_lifetime: Option<DurationValue>,
    roles_claim: Option<String>,
    scopes_claim: Option<String>,
    typ: Option<Vec<String>>,
    /// The signing key of the built-in token endpoint (asymmetric algorithms); its public half verifies.
    private_key: Option<PathBuf>,
    /// Only for local use: generate an Ed25519 `private_key` if the file is missing.
    #[serde(default)]
    generate_key: bool,
}

/// Where an issuer's JWKS comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    Url(http::Uri),
    Discovery(http::Uri),
}

/// How an issuer's JWKS is fetched and refreshed.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub source: JwksSource,
    pub refresh: Duration,
    pub refetch_cooldown: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

/// A key the issuer may sign with, and the algorithms it may be used with.
#[derive(Clone)]
pub struct VerifyKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    pub algorithms: Vec<Algorithm>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
    }
}

impl IssuerFile {
    /// Returns the issuer's id as written.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// A checked issuer.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub id: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub static_keys: Vec<VerifyKey>,
    pub jwks: Option<JwksSettings>,
    pub leeway: u64,
    pub max_lifetime: u64,
    pub roles_claim: String,
    pub scopes_claim: String,
    /// Accepted `typ` values, lower-case, without `application/`; `None` in the list means "absent is fine".
    pub typ: Vec<Option<String>>,
    pub private_key: Option<PathBuf>,
    /// The HMAC secret, when the issuer uses one (also signs tokens issued by the token endpoint).
    pub hmac_secret: Option<Arc<Vec<u8>>>,
}

fn parse_alg(s: &str) -> Option<Algorithm> {
    // Case-sensitive on purpose (RFC 7518 names); "none" never parses.
    s.parse().ok()
}

/// Returns the length in bits of the modulus of a PKCS#1 RSAPublicKey DER, as jsonwebtoken stores it.
fn rsa_modulus_bits(key: &DecodingKey) -> Option<usize> {
    use jsonwebtoken::DecodingKeyKind;
    let n: &[u8] = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, .. } => n,
        DecodingKeyKind::SecretOrDer(der) => {
            // SEQUENCE { INTEGER n, INTEGER e }
            let read_len = |d: &[u8], at: usize| -> Option<(usize, usize)> {
                let first = *d.get(at)?;
                if first < 0x80 {
                    return Some((usize::from(first), at + 1));
                }
                let k = usize::from(first & 0x7f);
                let mut len = 0usize;
                for i in 0..k {
                    len = len.checked_mul(256)? + usize::from(*d.get(at + 1 + i)?);
                }
                Some((len, at + 1 + k))
            };
            if der.first() != Some(&0x30) {
                return None;
            }
            let (_, at) = read_len(der, 1)?;
            if der.get(at) != Some(&0x02) {
                return None;
            }
            let (len, at) = read_len(der, at + 1)?;
            der.get(at..at + len)?
        }
    };
    let n = match n.iter().position(|&b| b != 0) {
        Some(i) => &n[i..],
        None => return Some(0),
    };
    Some(n.len() * 8 - n[0].leading_zeros() as usize)
}

/// Binds a key to the issuer's allowed algorithms of its family, refusing weak keys.
pub fn bind_key(kid: Option<String>, key: DecodingKey, allowed: &[Algorithm], jwk_alg: Option<Algorithm>) -> Result<VerifyKey, String> {
    let family = key.family();
    if family == AlgorithmFamily::Rsa {
        match rsa_modulus_bits(&key) {
            Some(bits) if bits >= 2048 => {}
            Some(bits) => return Err(format!("RSA key of {bits} bits is too small (at least 2048)")),
            None => return Err("RSA key could not be read".into()),
        }
    }
    let algorithms: Vec<Algorithm> = allowed.iter().copied().filter(|a| a.family() == family && jwk_alg.is_none_or(|j| j == *a)).collect();
    if algorithms.is_empty() {
        return Err(format!("key type {family:?} fits none of the issuer's algorithms {allowed:?}"));
    }
    Ok(VerifyKey { kid, key, algorithms })
}

/// Reads a PEM public key (or certificate) of any supported type.
pub fn read_public_pem(pem: &[u8]) -> Option<DecodingKey> {
    DecodingKey::from_rsa_pem(pem).ok().or_else(|| DecodingKey::from_ec_pem(pem).ok()).or_else(|| DecodingKey::from_ed_pem(pem).ok())
}

/// Reads the public half of a PEM private key (PKCS#8: Ed25519, EC P-256/P-384, RSA).
pub fn public_from_private_pem(pem: &[u8]) -> Result<DecodingKey, String> {
    crate::token_endpoint::public_key_of(pem).map(|(key, _)| key)
}

pub(crate) fn validate_issuer(v: &mut Validator<'_>, span: std::ops::Range<usize>, f: IssuerFile) -> Option<IssuerSettings> {
    let id = f.id.clone();
    let before = v.problem_count();
    let err = |v: &mut Validator<'_>, msg: String| v.error(span.clone(), format!("issuer {id:?}: {msg}"));
    let mut algorithms = Vec::new();
    for a in &f.algorithms {
        match parse_alg(a) {
            Some(alg) => algorithms.push(alg),
            None => err(v, format!("unknown algorithm {a:?} (HS256/384/512, RS256/384/512, PS256/384/512, ES256/384, EdDSA)")),
        }
    }
    if f.algorithms.is_empty() {
        err(v, "`algorithms` must list at least one algorithm".into());
    }
    let mut hmac_secret = None;
    let secret = match (&f.secret_env, &f.secret_file) {
        (Some(_), Some(_)) => {
            err(v, "set `secret_env` or `secret_file`, not both".into());
            None
        }
        (Some(var), None) => match std::env::var_os(var) {
            Some(s) => Some(s.into_encoded_bytes()),
            None => {
                err(v, format!("environment variable {var} (secret_env) is not set"));
                None
            }
        },
        (None, Some(path)) => {
            let p = v.resolve(path);
            match std::fs::read(&p) {
                Ok(mut s) => {
                    // A trailing newline from an editor or `echo` is not part of the secret.
                    while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        s.pop();
                    }
                    Some(s)
                }
                Err(e) => {
                    err(v, format!("cannot read secret_file {}: {e}", p.display()));
                    None
                }
            }
        }
        (None, None) => None,
    };
    let mut static_keys = Vec::new();
    if let Some(s) = secret {
        if s.len() < 32 {
            err(v, format!("HMAC secret is {} bytes; at least 32 are required", s.len()));
        } else {
            match bind_key(None, DecodingKey::from_secret(&s), &algorithms, None) {
                Ok(k) => static_keys.push(k),
                Err(e) => err(v, e),
            }
            hmac_secret = Some(Arc::new(s));
        }
    }
    if algorithms.iter().any(|a| a.family() == AlgorithmFamily::Hmac) && hmac_secret.is_none() && v.problem_count() == before {
        err(v, "an HMAC algorithm needs `secret_env` or `secret_file`".into());
    }
    for pk in f.public_keys.iter().flatten() {
        let (path, kid) = match pk {
            PublicKeyFile::Path(p) => (p, None),
            PublicKeyFile::WithKid { path, kid } => (path, Some(kid.clone())),
        };
        let p = v.resolve(path);
        match std::fs::read(&p) {
            Ok(pem) => match read_public_pem(&pem) {
                Some(key) => match bind_key(kid, key, &algorithms, None) {
                    Ok(k) => static_keys.push(k),
                    Err(e) => err(v, format!("{}: {e}", p.display())),
                },
                None => err(v, format!("{}: not a PEM public key or certificate (RSA, EC or Ed25519)", p.display())),
            },
            Err(e) => err(v, format!("cannot read public key {}: {e}", p.display())),
        }
    }
    let private_key = f.private_key.as_ref().map(|p| v.resolve(p));
    if f.generate_key && private_key.is_none() {
        err(v, "`generate_key = true` needs `private_key` (where to write it)".into());
    }
    let pending = match &private_key {
        Some(p) if f.generate_key && !p.exists() => match v.generating() {
            false => {
                v.note(format!("issuer {id:?}: signing key {} will be generated at start (local use only)", p.display()));
                true
            }
            true => {
                if let Err(e) = crate::token_endpoint::generate_ed25519(p) {
                    err(v, format!("cannot generate private_key {}: {e}", p.display()));
                }
                false
            }
        },
        _ => false,
    };
    if let Some(p) = private_key.as_ref().filter(|_| !pending) {
        match std::fs::read(p) {
            Ok(pem) => match public_from_private_pem(&pem).and_then(|key| bind_key(None, key, &algorithms, None)) {
                Ok(k) => static_keys.push(k),
                Err(e) => err(v, format!("private_key {}: {e}", p.display())),
            },
            Err(e) => err(v, format!("cannot read private_key {}: {e}", p.display())),
        }
    }
    let issuer_uri = |v: &mut Validator<'_>, s: &str, what: &str| -> Option<http::Uri> {
        match s.parse::<http::Uri>() {
            Ok(u) if crate::auth::jwks::allowed_fetch_uri(&u) => Some(u),
            _ => {
                v.error(span.clone(), format!("issuer {id:?}: {what} {s:?} must be an https:// URL (http:// only to loopback)"));
                None
            }
        }
    };
    let source = match (&f.jwks_url, f.discovery) {
        (Some(_), true) => {
            err(v, "set `jwks_url` or `discovery = true`, not both".into());
            None
        }
        (Some(u), false) => issuer_uri(v, u, "jwks_url").map(JwksSource::Url),
        (None, true) => {
            let url = format!("{}/.well-known/openid-configuration", f.issuer.trim_end_matches('/'));
            issuer_uri(v, &url, "discovery URL").map(JwksSource::Discovery)
        }
        (None, false) => None,
    };
    let jwks = source.map(|source| JwksSettings {
        source,
        refresh: f.jwks_refresh.map_or(Duration::from_secs(600), |d| d.0),
        refetch_cooldown: f.jwks_refetch_cooldown.map_or(Duration::from_secs(30), |d| d.0),
        timeout: f.jwks_timeout.map_or(Duration::from_secs(5), |d| d.0),
        ca_file: f.ca_file.as_ref().map(|p| v.resolve(p)),
    });
    if let Some(j) = &jwks {
        // Floors: under them a key-id flood or a refresh loop would hammer the IdP, or no fetch could finish.
        for (name, value, floor) in [
            ("jwks_refresh", j.refresh, Duration::from_secs(1)),
            ("jwks_refetch_cooldown", j.refetch_cooldown, Duration::from_secs(1)),
            ("jwks_timeout", j.timeout, Duration::from_millis(100)),
        ] {
            if value < floor {
                err(v, format!("{name} must be at least {floor:?}"));
            }
        }
        // Parsed, not just opened: a CA file without a certificate would leave the issuer without keys for good.
        if let Some(ca) = &j.ca_file {
            match std::fs::read(ca) {
                Ok(pem) => {
                    if let Err(e) = crate::server::tls::client_config(Some((ca.as_path(), pem.as_slice()))) {
                        err(v, format!("ca_file {}: {e}", ca.display()));
                    }
                }
                Err(e) => err(v, format!("cannot read ca_file {}: {e}", ca.display())),
            }
        }
    }
    if static_keys.is_empty() && jwks.is_none() && !pending && v.problem_count() == before {
        err(v, "no keys: set secret_env/secret_file, public_keys, private_key, jwks_url or discovery = true".into());
    }
    if jwks.is_some() && f.audiences.as_ref().is_none_or(Vec::is_empty) {
        let msg = format!(
            "issuer {id:?} has no `audiences`: a token it signs for any of its clients, ID tokens included, is accepted; \
             set the audience it issues for this API"
        );
        v.warn(span.clone(), msg);
    }
    let typ = match &f.typ {
        None => vec![None, Some("jwt".to_string()), Some("at+jwt".to_string())],
        Some(list) => list.iter().map(|t| if t.is_empty() { None } else { Some(normalize_typ(t)) }).collect(),
    };
    if v.problem_count() != before {
        return None;
    }
    Some(IssuerSettings {
        id: f.id,
        issuer: f.issuer,
        audiences: f.audiences.unwrap_or_default(),
        algorithms,
        static_keys,
        jwks,
        leeway: f.leeway.map_or(30, |d| d.0.as_secs()),
        max_lifetime: f.max_lifetime.map_or(30 * 86_400, |d| d.0.as_secs()),
        roles_claim: f.roles_claim.unwrap_or_else(|| "roles".into()),
        scopes_claim: f.scopes_claim.unwrap_or_else(|| "scope".into()),
        typ,
        private_key,
        hmac_secret,
    })
}

fn normalize_typ(t: &str) -> String {
    let t = t.to_ascii_lowercase();
    t.strip_prefix("application/").map(str::to_string).unwrap_or(t)
}

// ---------------------------------------------------------------------------------------------------------------
// Runtime: issuers with their keys, and the verified-token cache.

/// A runtime issuer: its settings and its live JWKS key set, if any.
pub struct Issuer {
    pub settings: IssuerSettings,
    pub jwks: Option<Arc<KeySet>>,
}

/// Verifies tokens against the configured issuers, with a cache of verified tokens.
pub struct Authenticator {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    cache: TokenCache,
}

/// The outcome of authentication for one request.
pub struct Authenticated {
    pub principal: Option<Arc<Principal>>,
    pub cache_hit: bool,
    /// The `Authorization` field held the verified token: only then does it go upstream on a route that
    /// authenticates (anything else there is a credential the policy did not see).
    pub authorization_verified: bool,
}

impl Authenticated {
    fn anonymous() -> Authenticated {
        Authenticated { principal: None, cache_hit: false, authorization_verified: false }
    }
}

impl Authenticator {
    /// Builds the runtime issuers. JWKS key sets are filled by their refresh tasks; on a reload (`previous`) an
    /// issuer whose key source did not change starts with the keys it had, so its tokens verify meanwhile.
    pub fn new(settings: &[IssuerSettings], client: &crate::auth::jwks::FetchClient, previous: Option<&Authenticator>) -> Authenticator {
        let mut issuers = Vec::new();
        let mut by_iss = HashMap::new();
        for s in settings {
            by_iss.insert(s.issuer.clone(), issuers.len());
            let jwks = s.jwks.as_ref().map(|j| {
                let ks = KeySet::new(s.id.clone(), s.issuer.clone(), j.clone(), s.algorithms.clone(), client);
                let old = previous.and_then(|p| p.issuers.iter().find(|i| i.settings.id == s.id)).and_then(|i| i.jwks.as_deref());
                if let Some(old) = old {
                    ks.seed_from(old);
                }
                Arc::new(ks)
            });
            issuers.push(Issuer { settings: s.clone(), jwks });
        }
        Authenticator { issuers, by_iss, cache: TokenCache::new(16, 4096) }
    }

    /// On a reload: fetches the keys of every JWKS issuer that had keys under `previous` but has none yet here
    /// (its key source changed), so that swapping this config in does not refuse every token of that issuer
    /// until a fetch succeeds. The first failure is returned with the issuer's id.
    pub async fn fetch_keys_lost_since(&self, previous: &Authenticator) -> Result<(), (String, crate::auth::jwks::JwksError)> {
        for issuer in &self.issuers {
            let Some(ks) = issuer.jwks.as_ref().filter(|k| !k.has_keys()) else { continue };
            let had_keys = previous
                .issuers
                .iter()
                .find(|p| p.settings.id == issuer.settings.id)
                .and_then(|p| p.jwks.as_ref())
                .is_some_and(|k| k.has_keys());
            if had_keys {
                ks.refresh().await.map_err(|e| (issuer.settings.id.clone(), e))?;
            }
        }
        Ok(())
    }

    /// Lists the issuers.
    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers
    }

    /// Returns true once every JWKS issuer has keys.
    pub fn ready(&self) -> bool {
        self.issuers.iter().all(|i| i.jwks.as_ref().is_none_or(|k| k.has_keys()))
    }

    /// Authenticates a request for a route with the given auth mode.
    pub async fn authenticate(&self, headers: &HeaderMap, mode: AuthMode) -> Result<Authenticated, AuthError> {
        self.authenticate_from(headers, None, &TokenSources::default(), mode).await
    }

    /// Authenticates from the route's token sources: the Authorization header, and where configured a cookie or
    /// a query parameter. More than one credential is a 400.
    pub async fn authenticate_from(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        sources: &TokenSources,
        mode: AuthMode,
    ) -> Result<Authenticated, AuthError> {
        if mode == AuthMode::Public {
            return Ok(Authenticated::anonymous());
        }
        let (token, from_header) = match extract_token(headers, query, sources)? {
            Some(found) => found,
            None if mode == AuthMode::Optional => return Ok(Authenticated::anonymous()),
            None => return Err(AuthError::Missing),
        };
        let now = unix_now();
        let key = TokenCache::key(&token);
        if let Some(p) = self.cache.get(&key, now).filter(|p| self.keys_unchanged(p)) {
            return Ok(Authenticated { principal: Some(p), cache_hit: true, authorization_verified: from_header });
        }
        let principal = Arc::new(self.verify(&token, now).await?);
        self.cache.insert(key, principal.clone());
        Ok(Authenticated { principal: Some(principal), cache_hit: false, authorization_verified: from_header })
    }

    /// Whether the JWKS a cached token was verified against is still the issuer's (a withdrawn key must stop
    /// working for tokens verified before it went).
    fn keys_unchanged(&self, p: &Principal) -> bool {
        p.key_generation
            .is_none_or(|(i, generation)| self.issuers.get(i).and_then(|x| x.jwks.as_ref()).is_some_and(|k| k.generation() == generation))
    }

    /// Fully verifies one token: header, issuer, key, signature, claims.
    pub async fn verify(&self, token: &str, now: u64) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(FailReason::TooLarge, format!("token of {} bytes", token.len())));
        }
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(invalid(FailReason::Malformed, "not three dot-separated segments (JWE and nested tokens are refused)"));
        };
        let header = decode_json(h64).map_err(|e| invalid(FailReason::Malformed, format!("header: {e}")))?;
        let alg_name =
            header.get("alg").and_then(Value::as_str).ok_or_else(|| invalid(FailReason::Malformed, "header has no string alg"))?;
        let alg = parse_alg(alg_name).ok_or_else(|| invalid(FailReason::Algorithm, format!("algorithm {alg_name:?} is not supported")))?;
        if header.contains_key("crit") {
            return Err(invalid(FailReason::Malformed, "crit header present (no extensions are implemented)"));
        }
        if header.contains_key("b64") {
            return Err(invalid(FailReason::Malformed, "b64 header present"));
        }
        if let Some(cty) = header.get("cty") {
            let cty = cty.as_str().map(normalize_typ);
            if cty.as_deref() != Some("json") {
                return Err(invalid(FailReason::Malformed, "cty header present (nested tokens are refused)"));
            }
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(invalid(FailReason::Malformed, "kid is not a string")),
        };
        let claims = decode_json(p64).map_err(|e| invalid(FailReason::Malformed, format!("payload: {e}")))?;
        let iss = claims.get("iss").and_then(Value::as_str).ok_or_else(|| invalid(FailReason::Issuer, "no string iss claim"))?;
        let index = *self.by_iss.get(iss).ok_or_else(|| invalid(FailReason::Issuer, format!("unknown issuer {iss:?}")))?;
        let issuer = &self.issuers[index];
        // Read before the key is looked up: a refresh in between leaves the token with the older generation.
        let key_generation = issuer.jwks.as_ref().map(|k| (index, k.generation()));
        let s = &issuer.settings;
        let typ = match header.get("typ") {
            None => None,
            Some(Value::String(t)) => Some(normalize_typ(t)),
            Some(_) => return Err(invalid(FailReason::Malformed, "typ is not a string")),
        };
        if !s.typ.contains(&typ) {
            return Err(invalid(FailReason::Malformed, format!("typ {typ:?} is not accepted for issuer {:?}", s.id)));
        }
        if !s.algorithms.contains(&alg) {
            return Err(invalid(FailReason::Algorithm, format!("algorithm {alg:?} is not allowed for issuer {:?}", s.id)));
        }
        let message_len = h64.len() + 1 + p64.len();
        let message = &token.as_bytes()[..message_len];
        self.check_signature(issuer, kid, alg, message, s64).await?;
        check_claims(s, &claims, now)?;
        Ok(Principal { key_generation, ..principal_from(s, claims) })
    }

    async fn check_signature(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
        message: &[u8],
        sig: &str,
    ) -> Result<(), AuthError> {
        let s = &issuer.settings;
        let verify_with = |k: &VerifyKey| -> bool {
            k.algorithms.contains(&alg) && jsonwebtoken::crypto::verify(sig, message, &k.key, alg).unwrap_or(false)
        };
        // A kid that names a static key selects that key only.
        if let Some(k) = kid.and_then(|kid| s.static_keys.iter().find(|k| k.kid.as_deref() == Some(kid))) {
            return if verify_with(k) { Ok(()) } else { Err(bad_signature(k.algorithms.contains(&alg))) };
        }
        let candidates: Vec<&VerifyKey> = s.static_keys.iter().filter(|k| k.algorithms.contains(&alg)).collect();
        if issuer.jwks.is_none() || (kid.is_none() && !candidates.is_empty()) {
            if candidates.is_empty() {
                return Err(invalid(FailReason::Algorithm, format!("no key of issuer {:?} fits {alg:?}", s.id)));
            }
            return if candidates.into_iter().any(verify_with) { Ok(()) } else { Err(bad_signature(true)) };
        }
        let Some(jwks) = &issuer.jwks else {
            return Err(bad_signature(true));
        };
        let found: Option<Arc<JwkKey>> = match kid {
            Some(kid) => match jwks.get(kid) {
                Some(k) => Some(k),
                None => {
                    // A kid that names no key: the issuer's static keys of a fitting type first (local and
                    // cheap), then one throttled refetch.
                    if candidates.iter().any(|k| verify_with(k)) {
                        return Ok(());
                    }
                    jwks.refetch_for_unknown_kid(kid).await
                }
            },
            None => jwks.single_key_for(alg),
        };
        match found {
            Some(k) if verify_with(&k.key) => Ok(()),
            Some(k) => Err(bad_signature(k.key.algorithms.contains(&alg))),
            // Looks identical to a bad signature from outside; the label tells the operator.
            None => Err(invalid(FailReason::UnknownKid, format!("kid {kid:?} not in the JWKS of issuer {:?}", s.id))),
        }
    }
}

fn bad_signature(alg_fits: bool) -> AuthError {
    if alg_fits {
        invalid(FailReason::BadSignature, "signature does not verify")
    } else {
        invalid(FailReason::Algorithm, "the token's algorithm does not fit the selected key")
    }
}

/// Where a route accepts tokens besides `Authorization: Bearer`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenSources {
    /// A cookie holding the token.
    pub cookie: Option<String>,
    /// A query parameter holding the token (opt-in per route; removed before forwarding).
    pub query: Option<String>,
}

/// Finds the one credential across the configured sources, and whether it came from `Authorization`. Each
/// source is read as leniently as the most lenient upstream would read it (a cookie name with spaces around it,
/// a query name in another case or after a `;`), so nothing an upstream could take for a token goes unverified.
pub fn extract_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    sources: &TokenSources,
) -> Result<Option<(std::borrow::Cow<'a, str>, bool)>, AuthError> {
    let mut found: Option<(std::borrow::Cow<'a, str>, bool)> = extract_bearer(headers)?.map(|t| (std::borrow::Cow::Borrowed(t), true));
    let mut add = |t: std::borrow::Cow<'a, str>| {
        if found.is_some() {
            return Err(AuthError::InvalidRequest("more than one credential (header, cookie or query)"));
        }
        found = Some((t, false));
        Ok(())
    };
    if let Some(name) = &sources.cookie {
        let mut values = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.split_once('='))
            .filter(|(k, _)| k.trim_matches(is_space).eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim_matches(is_space));
        if let Some(v) = values.next() {
            if values.next().is_some() {
                return Err(AuthError::InvalidRequest("the token cookie appears more than once"));
            }
            add(std::borrow::Cow::Borrowed(v))?;
        }
    }
    if let (Some(name), Some(q)) = (&sources.query, query) {
        let mut values = query_params(q).filter(|(k, _)| names_token(k, name)).map(|(_, v)| v.into_owned());
        if let Some(v) = values.next() {
            if values.next().is_some() {
                return Err(AuthError::InvalidRequest("the token parameter appears more than once"));
            }
            add(std::borrow::Cow::Owned(v))?;
        }
    }
    match found {
        Some((t, _)) if t.is_empty() => Err(invalid(FailReason::Malformed, "empty token")),
        other => Ok(other),
    }
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A query's parameters, split at `&` and at `;` (which older servers and frameworks also take as a separator).
fn query_params(q: &str) -> impl Iterator<Item = (std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>)> {
    q.split(['&', ';']).filter_map(|kv| form_urlencoded::parse(kv.as_bytes()).next())
}

/// Removes the token parameter from a query string (before forwarding and logging): every `&`-separated part
/// that names it in any spelling [`names_token`] accepts, also after a `;`.
pub fn strip_query_token(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query.split('&').filter(|part| !query_params(part).any(|(k, _)| names_token(&k, name))).collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// Whether a decoded query parameter name is the token parameter `name` as some framework reads it: case aside,
/// PHP reads `.`, a space and an unclosed `[` as `_`, drops leading spaces and ends a name at NUL; PHP, Rack and
/// qs read `name[]` and `name[x]` as `name`. Every such spelling is the token: verified (a second one is a 400)
/// and removed before forwarding. Either reading of a `[` counts (stricter, never looser).
fn names_token(key: &str, name: &str) -> bool {
    let key = key.split('\0').next().unwrap_or_default().trim_start_matches(' ');
    let fold = |b: u8| if matches!(b, b'.' | b' ' | b'[') { b'_' } else { b.to_ascii_lowercase() };
    let same = |k: &str| {
        let k = k.trim_end_matches(']');
        k.len() == name.len() && k.bytes().zip(name.bytes()).all(|(a, b)| fold(a) == fold(b))
    };
    same(key) || key.split_once('[').is_some_and(|(k, _)| same(k))
}

/// Finds the one bearer credential of a request. Two `Authorization` headers are a 400; a scheme other than
/// Bearer counts as no token. A tab after the scheme is taken as a space (lenient servers do), so
/// `Bearer<TAB>token` is verified, not ignored.
pub fn extract_bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::InvalidRequest("more than one Authorization header"));
    }
    let value = value.to_str().map_err(|_| invalid(FailReason::Malformed, "Authorization header is not visible ASCII"))?;
    let (scheme, rest) = value.split_once(is_space).unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = rest.trim_matches(is_space);
    if token.is_empty() {
        return Err(invalid(FailReason::Malformed, "Bearer with no token"));
    }
    if token.contains(is_space) {
        return Err(AuthError::InvalidRequest("more than one credential in Authorization"));
    }
    Ok(Some(token))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn decode_json(seg: &str) -> Result<Map<String, Value>, String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(seg).map_err(|e| format!("base64url: {e}"))?;
    match serde_json::from_slice::<StrictValue>(&bytes).map_err(|e| format!("json: {e}"))?.0 {
        Value::Object(m) => Ok(m),
        _ => Err("not a JSON object".into()),
    }
}

/// A JSON value whose objects refuse repeated member names at any depth.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StrictValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::Bool(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::String(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::String(v)))
            }
            fn visit_unit<E>(self) -> Result<StrictValue, E> {
                Ok(StrictValue(Value::Null))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StrictValue, A::Error> {
                let mut out = Vec::new();
                while let Some(StrictValue(v)) = seq.next_element()? {
                    out.push(v);
                }
                Ok(StrictValue(Value::Array(out)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StrictValue, A::Error> {
                let mut out = Map::new();
                while let Some(k) = map.next_key::<String>()? {
                    let StrictValue(v) = map.next_value()?;
                    if out.insert(k.clone(), v).is_some() {
                        return Err(serde::de::Error::custom(format!("member {k:?} appears more than once")));
                    }
                }
                Ok(StrictValue(Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A NumericDate: a JSON number (integer or fraction) of seconds. Strings and other types are refused.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, AuthError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if (0.0..1e15).contains(&f) => Ok(Some(f as u64)),
            _ => Err(invalid(FailReason::Malformed, format!("{name} is not a valid NumericDate"))),
        },
        Some(_) => Err(invalid(FailReason::Malformed, format!("{name} is not a number"))),
    }
}

fn check_claims(s: &IssuerSettings, claims: &Map<String, Value>, now: u64) -> Result<(), AuthError> {
    let exp = numeric_date(claims, "exp")?.ok_or_else(|| invalid(FailReason::Malformed, "no exp claim"))?;
    let nbf = numeric_date(claims, "nbf")?;
    let iat = numeric_date(claims, "iat")?;
    if now >= exp.saturating_add(s.leeway) {
        return Err(invalid(FailReason::Expired, "token expired"));
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(s.leeway)) {
        return Err(invalid(FailReason::NotYetValid, "nbf is in the future"));
    }
    if iat.is_some_and(|iat| iat > now.saturating_add(s.leeway)) {
        return Err(invalid(FailReason::NotYetValid, "iat is in the future"));
    }
    // Lifetime is exp - iat, or exp - now without iat; an absurd exp is refused even if the signature is good.
    if exp.saturating_sub(iat.unwrap_or(now)) > s.max_lifetime.saturating_add(s.leeway) {
        return Err(invalid(FailReason::Expired, "lifetime exceeds max_lifetime"));
    }
    match claims.get("sub") {
        Some(Value::String(sub)) if !sub.is_empty() => {}
        _ => return Err(invalid(FailReason::Malformed, "no string sub claim")),
    }
    // Keycloak marks its tokens in the payload: "Bearer" for access tokens, "ID", "Refresh", "Logout"… for the
    // others, which share the header `typ: JWT` and the signing key. Only an access token is a credential here.
    match claims.get("typ") {
        None => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") || normalize_typ(t) == "at+jwt" => {}
        Some(t) => return Err(invalid(FailReason::Malformed, format!("payload typ {t} is not an access token"))),
    }
    if !s.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => s.audiences.iter().any(|x| x == a),
            Some(Value::Array(list)) => {
                list.iter().all(Value::is_string) && list.iter().filter_map(Value::as_str).any(|a| s.audiences.iter().any(|x| x == a))
            }
            _ => false,
        };
        if !ok {
            return Err(invalid(FailReason::Audience, "aud does not name an accepted audience"));
        }
    }
    Ok(())
}

/// Reads a list claim: an array of strings, or a space-separated string.
fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

pub fn principal_from(s: &IssuerSettings, claims: Map<String, Value>) -> Principal {
    let roles = string_list(lookup_claim(&claims, &s.roles_claim));
    let scopes = string_list(lookup_claim(&claims, &s.scopes_claim));
    let subject = claims.get("sub").and_then(Value::as_str).unwrap_or_default().to_string();
    let expires_at = numeric_date(&claims, "exp").ok().flatten().unwrap_or(0);
    Principal {
        issuer_id: s.id.clone(),
        subject,
        roles,
        scopes,
        claims: Arc::new(claims),
        expires_at,
        identity_values: Default::default(),
        key_generation: None,
    }
}

/// One shard: the verified principals by token digest, and the digests in insertion order for eviction.
#[derive(Default)]
struct ShardMap {
    by_key: HashMap<[u8; 32], Arc<Principal>>,
    order: std::collections::VecDeque<[u8; 32]>,
}

type Shard = RwLock<ShardMap>;

/// Verified tokens, keyed by the SHA-256 of the token, kept until their `exp` and never longer. Sharded so no lock
/// is shared by every request; bounded per shard. Only verified tokens are inserted, so invalid tokens cannot
/// evict good entries.
struct TokenCache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl TokenCache {
    fn new(shards: usize, per_shard: usize) -> TokenCache {
        TokenCache { shards: (0..shards).map(|_| RwLock::new(ShardMap::default())).collect(), per_shard }
    }

    fn key(token: &str) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    fn shard(&self, key: &[u8; 32]) -> &Shard {
        &self.shards[usize::from(key[0]) % self.shards.len()]
    }

    fn get(&self, key: &[u8; 32], now: u64) -> Option<Arc<Principal>> {
        let shard = self.shard(key).read().ok()?;
        shard.by_key.get(key).filter(|p| now < p.expires_at).cloned()
    }

    /// Inserts a verified principal. A full shard drops its oldest entry: O(1), so a stream of distinct valid
    /// tokens (every request a cache miss) costs the same per request however full the cache is.
    fn insert(&self, key: [u8; 32], p: Arc<Principal>) {
        let Ok(mut shard) = self.shard(&key).write() else {
            return;
        };
        if shard.by_key.insert(key, p).is_some() {
            return; // a concurrent miss on the same token got here first
        }
        shard.order.push_back(key);
        while shard.by_key.len() > self.per_shard {
            match shard.order.pop_front() {
                Some(old) => {
                    shard.by_key.remove(&old);
                }
                None => break,
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().map_or(0, |m| m.by_key.len())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(sub: &str, expires_at: u64) -> Arc<Principal> {
        Arc::new(Principal {
            issuer_id: "i".into(),
            subject: sub.into(),
            roles: vec![],
            scopes: vec![],
            claims: Arc::new(Map::new()),
            expires_at,
            identity_values: Default::default(),
            key_generation: None,
        })
    }

    #[test]
    fn the_token_cache_is_bounded_drops_its_oldest_and_never_serves_expired() {
        let cache = TokenCache::new(1, 3);
        for i in 0..5 {
            cache.insert(TokenCache::key(&format!("t{i}")), principal(&format!("s{i}"), 100));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&TokenCache::key("t0"), 10).is_none() && cache.get(&TokenCache::key("t1"), 10).is_none());
        assert_eq!(cache.get(&TokenCache::key("t4"), 10).unwrap().subject, "s4");
        assert!(cache.get(&TokenCache::key("t4"), 100).is_none(), "not at or after exp");
        // Inserting a token that is already there does not grow the eviction queue.
        cache.insert(TokenCache::key("t4"), principal("s4", 100));
        assert_eq!(cache.shards[0].read().unwrap().order.len(), 3);
    }

    #[test]
    fn strict_json_refuses_duplicates() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert!(decode_json(&b64(r#"{"sub":"a","sub":"b"}"#)).is_err());
        assert!(decode_json(&b64(r#"{"a":{"r":1,"r":2}}"#)).is_err());
        assert!(decode_json(&b64(r#"{"sub":"a"}"#)).is_ok());
        assert!(decode_json(&b64(r#"[1]"#)).is_err());
    }

    #[test]
    fn claim_lookup_prefers_exact_names() {
        let m = serde_json::json!({"realm_access": {"roles": ["a"]}, "https://x.com/roles": ["b"]});
        let m = m.as_object().unwrap();
        assert_eq!(lookup_claim(m, "realm_access.roles"), Some(&serde_json::json!(["a"])));
        assert_eq!(lookup_claim(m, "https://x.com/roles"), Some(&serde_json::json!(["b"])));
        assert_eq!(lookup_claim(m, "nope.x"), None);
    }

    #[test]
    fn bearer_extraction() {
        let mut h = HeaderMap::new();
        assert!(matches!(extract_bearer(&h), Ok(None)));
        h.insert("authorization", "bEaReR abc".parse().unwrap());
        assert_eq!(extract_bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert!(extract_bearer(&h).is_err());
        h.insert("authorization", "Bearer\tabc\t".parse().unwrap());
        assert_eq!(extract_bearer(&h).unwrap(), Some("abc"));
        h.insert("authorization", "Bearer abc\tdef".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Err(AuthError::InvalidRequest(_))));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Ok(None)));
        h.append("authorization", "Bearer x".parse().unwrap());
        assert!(matches!(extract_bearer(&h), Err(AuthError::InvalidRequest(_))));
    }
}
