//! Opaque tokens: RFC 7662 introspection. A token that is not a JWT (or any token, with `introspect = "all"`) is
//! sent to the issuer's introspection endpoint, with the gateway's client credentials; an active answer becomes a
//! principal for the same policy as a verified JWT's claims.
//!
//! - Active answers are cached (by the verified-token cache) until the smaller of their `exp` and `cache_for`;
//!   inactive ones for `negative_cache_for`, in a bounded map of their own.
//! - Concurrent requests with the same uncached token make one call (single flight).
//! - An endpoint that cannot be reached, or answers anything but a JSON object with a boolean `active`, is a 503:
//!   never an allow.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value};

use super::{invalid, AuthError, FailReason, IssuerSettings, Principal};

/// An introspection issuer's endpoint and client, checked.
#[derive(Clone, PartialEq, Eq)]
pub struct IntrospectionSettings {
    pub url: http::Uri,
    pub client_id: String,
    /// Read from the environment at load (`client_secret_env`); never logged.
    pub client_secret: String,
    pub ca_file: Option<PathBuf>,
    pub cache_for: Duration,
    pub negative_cache_for: Duration,
    /// Inactive tokens remembered at most.
    pub negative_entries: usize,
    /// Introspect JWTs too (`introspect = "all"`), not only tokens that are not JWTs.
    pub all_tokens: bool,
    pub timeout: Duration,
}

impl std::fmt::Debug for IntrospectionSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntrospectionSettings")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("cache_for", &self.cache_for)
            .field("negative_cache_for", &self.negative_cache_for)
            .field("all_tokens", &self.all_tokens)
            .finish_non_exhaustive()
    }
}

type PostClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What one introspection call found, shared by the requests that waited for it.
#[derive(Clone)]
enum Found {
    Active(Arc<Principal>),
    Refused(FailReason, String),
    Unavailable(String),
}

/// The runtime side: the client, the negative cache, the calls in flight.
pub struct Introspector {
    settings: IntrospectionSettings,
    client: Result<PostClient, String>,
    authorization: Option<HeaderValue>,
    /// Inactive tokens by digest, until (unix seconds).
    inactive: Mutex<HashMap<[u8; 32], u64>>,
    in_flight: Mutex<HashMap<[u8; 32], Arc<tokio::sync::OnceCell<Found>>>>,
}

impl Introspector {
    pub fn new(settings: IntrospectionSettings) -> Introspector {
        let client = post_client(settings.ca_file.as_deref());
        // RFC 6749 §2.3.1: client_secret_basic, each part form-encoded first.
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            format!("{}:{}", enc(&settings.client_id), enc(&settings.client_secret)),
        );
        let authorization = HeaderValue::from_str(&format!("Basic {basic}")).ok().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Introspector { settings, client, authorization, inactive: Mutex::new(HashMap::new()), in_flight: Mutex::new(HashMap::new()) }
    }

    pub fn settings(&self) -> &IntrospectionSettings {
        &self.settings
    }

    /// Whether this introspector takes `token` (every token, or those that are not JWTs).
    pub fn takes(&self, token: &str) -> bool {
        self.settings.all_tokens || token.split('.').count() != 3
    }

    /// The principal of an active token, or why it is refused. One call per token at a time.
    pub async fn principal(&self, issuer: &IssuerSettings, token: &str, key: [u8; 32], now: u64) -> Result<Arc<Principal>, AuthError> {
        if self.inactive.lock().ok().and_then(|m| m.get(&key).copied()).is_some_and(|until| now < until) {
            return Err(invalid(FailReason::Inactive, "inactive (cached)"));
        }
        let cell = {
            let Ok(mut m) = self.in_flight.lock() else {
                return Err(AuthError::IntrospectionUnavailable("lock poisoned".into()));
            };
            m.entry(key).or_default().clone()
        };
        let found = cell.get_or_init(|| self.call(issuer, token, now)).await.clone();
        if let Ok(mut m) = self.in_flight.lock() {
            m.remove(&key);
        }
        match found {
            Found::Active(p) => Ok(p),
            Found::Refused(reason, detail) => {
                if reason == FailReason::Inactive {
                    self.remember_inactive(key, now);
                }
                Err(invalid(reason, detail))
            }
            Found::Unavailable(why) => Err(AuthError::IntrospectionUnavailable(why)),
        }
    }

    fn remember_inactive(&self, key: [u8; 32], now: u64) {
        let Ok(mut m) = self.inactive.lock() else { return };
        if m.len() >= self.settings.negative_entries {
            m.retain(|_, until| now < *until);
            if m.len() >= self.settings.negative_entries {
                // Still full of live entries: forget them rather than grow; the worst case is one more call each.
                m.clear();
            }
        }
        m.insert(key, now.saturating_add(self.settings.negative_cache_for.as_secs()));
    }

    async fn call(&self, issuer: &IssuerSettings, token: &str, now: u64) -> Found {
        let client = match &self.client {
            Ok(c) => c,
            Err(e) => return Found::Unavailable(e.clone()),
        };
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let mut req = http::Request::post(self.settings.url.clone());
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a.clone());
        }
        let req = match req
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
        {
            Ok(r) => r,
            Err(e) => return Found::Unavailable(e.to_string()),
        };
        let exchange = async {
            let rsp = client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
            if rsp.status() != http::StatusCode::OK {
                return Err(format!("status {}", rsp.status()));
            }
            let body =
                http_body_util::Limited::new(rsp.into_body(), 64 * 1024).collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            serde_json::from_slice::<Map<String, Value>>(&body).map_err(|e| format!("not a JSON object: {e}"))
        };
        let answer = match tokio::time::timeout(self.settings.timeout, exchange).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Found::Unavailable(format!("{}: {e}", self.settings.url)),
            Err(_) => return Found::Unavailable(format!("{}: no answer within {:?}", self.settings.url, self.settings.timeout)),
        };
        match principal_of(issuer, &self.settings, answer, now) {
            Ok(p) => Found::Active(Arc::new(p)),
            Err(Some((reason, detail))) => Found::Refused(reason, detail),
            Err(None) => Found::Unavailable(format!("{}: `active` is missing or not a boolean", self.settings.url)),
        }
    }
}

/// An introspection answer as a principal: `active` must be true, `exp` in the future, `iss` (when present) the
/// issuer's, `aud` one of the issuer's audiences (when it has any). Err(None): the answer is not one.
fn principal_of(
    issuer: &IssuerSettings,
    settings: &IntrospectionSettings,
    mut claims: Map<String, Value>,
    now: u64,
) -> Result<Principal, Option<(FailReason, String)>> {
    match claims.get("active") {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => return Err(Some((FailReason::Inactive, "the introspection endpoint says inactive".into()))),
        _ => return Err(None),
    }
    let exp = match claims.get("exp") {
        None => None,
        Some(v) => match v.as_u64() {
            Some(e) => Some(e),
            None => return Err(Some((FailReason::Malformed, "exp is not a number".into()))),
        },
    };
    if exp.is_some_and(|e| e <= now) {
        return Err(Some((FailReason::Expired, "exp has passed".into())));
    }
    if let Some(iss) = claims.get("iss") {
        if iss.as_str() != Some(issuer.issuer.as_str()) {
            return Err(Some((FailReason::Issuer, format!("iss {iss} is not {:?}", issuer.issuer))));
        }
    }
    if !issuer.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => issuer.audiences.contains(a),
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str().is_some_and(|a| issuer.audiences.iter().any(|x| x == a))),
            _ => false,
        };
        if !ok {
            return Err(Some((FailReason::Audience, "aud is missing or not an accepted audience".into())));
        }
    }
    // A client-credentials token may name only its client.
    if !claims.contains_key("sub") {
        if let Some(client) = claims.get("client_id").cloned() {
            claims.insert("sub".into(), client);
        }
    }
    let mut p = super::principal_from(issuer, claims);
    let cap = now.saturating_add(settings.cache_for.as_secs());
    p.expires_at = exp.map_or(cap, |e| e.min(cap));
    Ok(p)
}

fn post_client(ca_file: Option<&std::path::Path>) -> Result<PostClient, String> {
    let pem = match ca_file {
        Some(path) => Some((path, std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?)),
        None => None,
    };
    let tls = crate::tls_client::client_config(pem.as_ref().map(|(p, b)| (*p, b.as_slice()))).map_err(|e| e.to_string())?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector))
}
