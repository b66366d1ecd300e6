//! Verification: the issuer chosen by `iss`, the key by `kid` and `alg`, the signature, then the claims; and
//! the runtime issuers with their live JWKS key sets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::authz::AuthMode;
use super::cache::{Admission, TokenCache};
use super::extract::{extract_token, TokenSource, TokenSources};
use super::issuer::normalize_typ;
use super::jwks::{JwkKey, KeySet};
use super::keys::parse_alg;
use super::revocation::Revocations;
use super::{invalid, lookup_claim, AuthError, FailReason, IssuerSettings, Principal, VerifyKey, MAX_TOKEN_BYTES};

/// A runtime issuer: its settings and its live JWKS key set, if any.
pub struct Issuer {
    pub settings: IssuerSettings,
    pub jwks: Option<Arc<KeySet>>,
    pub introspector: Option<Arc<crate::auth::introspect::Introspector>>,
}

/// Verifies tokens against the configured issuers, with a cache of verified tokens.
pub struct Authenticator {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    cache: TokenCache,
    /// Checked on every request, cached token or not; handed on across reloads.
    revocations: Arc<Revocations>,
}

/// The outcome of authentication for one request.
pub struct Authenticated {
    pub principal: Option<Arc<Principal>>,
    pub cache_hit: bool,
    /// The `Authorization` field held the verified token: only then does it go upstream on a route that
    /// authenticates (anything else there is a credential the policy did not see).
    pub authorization_verified: bool,
    /// Where the verified token came from (None: anonymous).
    pub source: Option<TokenSource>,
}

impl Authenticated {
    fn anonymous() -> Authenticated {
        Authenticated { principal: None, cache_hit: false, authorization_verified: false, source: None }
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
            // An unchanged introspection issuer keeps its negative cache across a reload.
            let introspector = s.introspection.as_ref().map(|settings| {
                let old = previous
                    .and_then(|p| p.issuers.iter().find(|i| i.settings.id == s.id))
                    .and_then(|i| i.introspector.clone())
                    .filter(|i| i.settings() == settings);
                old.unwrap_or_else(|| Arc::new(crate::auth::introspect::Introspector::new(settings.clone())))
            });
            issuers.push(Issuer { settings: s.clone(), jwks, introspector });
        }
        let revocations = previous.map(|p| p.revocations.clone()).unwrap_or_default();
        Authenticator { issuers, by_iss, cache: TokenCache::new(16, 4096), revocations }
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
        let (token, source) = match extract_token(headers, query, sources)? {
            Some(found) => found,
            None if mode == AuthMode::Optional => return Ok(Authenticated::anonymous()),
            None => return Err(AuthError::Missing),
        };
        let now = unix_now();
        let key = TokenCache::key(&token);
        if let Some(p) = self.cache.get(&key, now).filter(|p| self.keys_unchanged(p)) {
            self.check_revoked(&p, now)?;
            let authorization_verified = source == TokenSource::Header;
            return Ok(Authenticated { principal: Some(p), cache_hit: true, authorization_verified, source: Some(source) });
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid(FailReason::TooLarge, format!("token of {} bytes", token.len())));
        }
        let introspected = self.issuers.iter().find_map(|i| i.introspector.as_ref().filter(|x| x.takes(&token)).map(|x| (i, x)));
        let (principal, admission) = match introspected {
            Some((issuer, x)) => (x.principal(&issuer.settings, &token, key, now).await?, Admission::Always),
            None => (Arc::new(self.verify(&token, now).await?), Admission::SecondUse),
        };
        self.cache.insert(key, principal.clone(), admission);
        self.check_revoked(&principal, now)?;
        let authorization_verified = source == TokenSource::Header;
        Ok(Authenticated { principal: Some(principal), cache_hit: false, authorization_verified, source: Some(source) })
    }

    fn check_revoked(&self, p: &Principal, now: u64) -> Result<(), AuthError> {
        match self.revocations.is_revoked(p, now) {
            true => Err(invalid(FailReason::Revoked, "the token is revoked")),
            false => Ok(()),
        }
    }

    /// The revoked tokens this gateway refuses.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
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
        // Parameters only a JWE carries (RFC 7516 §4.1, RFC 7518 §4.6-4.8): a JWS with them is a confused or
        // crafted token (RFC 8725 §3.11).
        if let Some(p) = JWE_ONLY.iter().find(|p| header.contains_key(**p)) {
            return Err(invalid(FailReason::Malformed, format!("JWE header parameter {p:?} in a JWS")));
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
        // One spelling per token: base64url without padding, canonical trailing bits (RFC 7515 §2). Decoded on
        // the stack: the largest signature is an 8192-bit RSA one.
        let mut sig = [0u8; MAX_SIGNATURE_BYTES + 8];
        let sig_len = match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(s64, &mut sig) {
            Ok(n) if n <= MAX_SIGNATURE_BYTES => n,
            Ok(_) | Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
                return Err(invalid(FailReason::Malformed, "signature is longer than any supported key's"))
            }
            Err(base64::DecodeSliceError::DecodeError(_)) => {
                return Err(invalid(FailReason::Malformed, "signature is not canonical base64url"))
            }
        };
        let message_len = h64.len() + 1 + p64.len();
        let message = &token.as_bytes()[..message_len];
        self.check_signature(issuer, kid, alg, message, &sig[..sig_len]).await?;
        check_claims(s, &claims, now)?;
        Ok(Principal { key_generation, ..principal_from(s, claims) })
    }

    async fn check_signature(
        &self,
        issuer: &Issuer,
        kid: Option<&str>,
        alg: Algorithm,
        message: &[u8],
        sig: &[u8],
    ) -> Result<(), AuthError> {
        let s = &issuer.settings;
        let verify_with = |k: &VerifyKey| -> bool { k.verifies(alg, message, sig) };
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
        if !jwks.has_keys() && !candidates.iter().any(|k| verify_with(k)) {
            // One throttled fetch may bring the first keys; without them the token cannot be judged either way.
            if jwks.refetch_for_unknown_kid(kid.unwrap_or_default()).await.is_none() && !jwks.has_keys() {
                return Err(AuthError::KeysUnavailable(s.id.clone()));
            }
        }
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

/// The longest signature of a supported key: RSA of 8192 bits (aws-lc-rs verifies 2048 to 8192).
const MAX_SIGNATURE_BYTES: usize = 1024;

/// Header parameters defined only for JWE: encryption, compression and key agreement.
const JWE_ONLY: [&str; 9] = ["enc", "zip", "epk", "apu", "apv", "iv", "tag", "p2s", "p2c"];

fn bad_signature(alg_fits: bool) -> AuthError {
    if alg_fits {
        invalid(FailReason::BadSignature, "signature does not verify")
    } else {
        invalid(FailReason::Algorithm, "the token's algorithm does not fit the selected key")
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn decode_json(seg: &str) -> Result<Map<String, Value>, String> {
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
                    match out.entry(k) {
                        serde_json::map::Entry::Vacant(e) => {
                            e.insert(v);
                        }
                        serde_json::map::Entry::Occupied(e) => {
                            return Err(serde::de::Error::custom(format!("member {:?} appears more than once", e.key())));
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_json_refuses_duplicates() {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert!(decode_json(&b64(r#"{"sub":"a","sub":"b"}"#)).is_err());
        assert!(decode_json(&b64(r#"{"a":{"r":1,"r":2}}"#)).is_err());
        assert!(decode_json(&b64(r#"{"sub":"a"}"#)).is_ok());
        assert!(decode_json(&b64(r#"[1]"#)).is_err());
    }
}
