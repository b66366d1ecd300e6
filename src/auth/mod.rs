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
pub mod cache;
pub mod extract;
pub mod introspect;
pub mod issuer;
pub mod jwks;
pub mod keys;
pub mod revocation;
pub mod verify;

pub use extract::{extract_bearer, extract_token, strip_query_token, TokenSource, TokenSources};
pub use issuer::{IssuerSettings, JwksSettings, JwksSource, VerifyKey};
pub use verify::{principal_from, Authenticated, Authenticator, Issuer};

use std::sync::Arc;

use serde_json::{Map, Value};

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
    /// A verified claim the upstream is to receive cannot be put in a header as it is (control characters, outer
    /// spaces, an ambiguous list, an object): refused, not dropped, so the upstream never sees less than policy did.
    ClaimUnforwardable,
    /// An opaque token its introspection endpoint says is not active.
    Inactive,
    /// A token revoked by its `jti`, or issued before its subject's cut-off.
    Revoked,
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
            FailReason::ClaimUnforwardable => "claim_unforwardable",
            FailReason::Inactive => "inactive",
            FailReason::Revoked => "revoked",
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
    /// The token's issuer has had no keys yet (its JWKS never fetched): 503 with `Retry-After`, as the client did
    /// nothing wrong and the same token may pass in a moment.
    #[error("issuer {0:?} has no keys yet")]
    KeysUnavailable(String),
    /// The introspection endpoint could not be asked, or gave no usable answer: 503, never an allow.
    #[error("introspection failed: {0}")]
    IntrospectionUnavailable(String),
}

/// A refusal of a token: 401 `invalid_token`, `reason` labelling it in metrics and the log.
pub fn invalid(reason: FailReason, detail: impl Into<String>) -> AuthError {
    AuthError::InvalidToken { reason, detail: detail.into() }
}

impl AuthError {
    /// Returns the metric label for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => FailReason::Missing.label(),
            AuthError::InvalidRequest(_) => FailReason::Malformed.label(),
            AuthError::InvalidToken { reason, .. } => reason.label(),
            AuthError::KeysUnavailable(_) => "keys_unavailable",
            AuthError::IntrospectionUnavailable(_) => "introspection_unavailable",
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
    /// Err: the claim that cannot be forwarded faithfully, and why.
    pub identity_values: std::sync::OnceLock<Result<Vec<Option<http::HeaderValue>>, String>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_lookup_prefers_exact_names() {
        let m = serde_json::json!({"realm_access": {"roles": ["a"]}, "https://x.com/roles": ["b"]});
        let m = m.as_object().unwrap();
        assert_eq!(lookup_claim(m, "realm_access.roles"), Some(&serde_json::json!(["a"])));
        assert_eq!(lookup_claim(m, "https://x.com/roles"), Some(&serde_json::json!(["b"])));
        assert_eq!(lookup_claim(m, "nope.x"), None);
    }
}
