//! A checked issuer: who may sign tokens, with which keys and algorithms, and where its JWKS comes from.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};

/// Where an issuer's JWKS comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    Url(http::Uri),
    Discovery(http::Uri),
}

/// How an issuer's JWKS is fetched and refreshed.
#[derive(Debug, Clone, PartialEq)]
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
    /// The key parsed once for each of `algorithms` (built by `keys::bind_key`).
    pub(crate) checks: Vec<(Algorithm, SignatureCheck)>,
}

/// A key ready to check signatures of one algorithm: parsed when it is loaded, so that a token the cache has not
/// seen costs the signature check alone (no key parsing, no allocation).
#[derive(Clone)]
pub(crate) enum SignatureCheck {
    Public(aws_lc_rs::signature::ParsedPublicKey),
    Hmac(Box<aws_lc_rs::hmac::Key>),
}

impl VerifyKey {
    /// Whether `signature` (decoded) signs `message` under `alg` with this key; false for an algorithm the key
    /// is not bound to.
    pub fn verifies(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        match self.checks.iter().find(|(a, _)| *a == alg) {
            Some((_, SignatureCheck::Public(key))) => key.verify_sig(message, signature).is_ok(),
            Some((_, SignatureCheck::Hmac(key))) => aws_lc_rs::hmac::verify(key, message, signature).is_ok(),
            None => false,
        }
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).field("algorithms", &self.algorithms).finish()
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
    /// An issuer of opaque tokens, checked by RFC 7662 introspection (no keys, no algorithms).
    pub introspection: Option<crate::auth::introspect::IntrospectionSettings>,
}

/// A `typ` as compared: lower-case, without `application/` (RFC 8725 §3.11 allows either spelling).
pub fn normalize_typ(t: &str) -> String {
    let t = t.to_ascii_lowercase();
    t.strip_prefix("application/").map(str::to_string).unwrap_or(t)
}
