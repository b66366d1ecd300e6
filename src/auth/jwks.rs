//! JWKS and OIDC discovery: fetching an issuer's keys, refreshing them in the background, kid lookup, and a
//! throttled refetch for unknown kids.
//!
//! Fetches go only to URLs from the config (or the discovery document of a configured issuer): https, or http to
//! loopback. Redirects are not followed, bodies are capped, and a failed refresh keeps the last good keys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::auth::keys::bind_key;
use crate::auth::{JwksSettings, JwksSource, VerifyKey};

/// An error and its causes, one after another (hyper's client names only the outermost, "client error (Connect)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Receives a key set's fetch outcomes: issuer id, whether the fetch succeeded, keys held.
pub type Reporter = Box<dyn Fn(&str, bool, usize) + Send + Sync>;

/// Largest JWKS or discovery document accepted.
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot build the TLS client: {0}")]
    Tls(String),
    #[error("request to {url} failed: {}", chain(.source))]
    Request {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("{url} answered {status}{}", if .status.is_redirection() { " (redirects are not followed)" } else { "" })]
    Status { url: String, status: http::StatusCode },
    #[error("reading {0} failed or exceeded the size cap")]
    Body(String),
    #[error("{url} is not valid JSON: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("discovery document: {0}")]
    Discovery(String),
    #[error("the JWKS at {0} has no usable signing key")]
    NoKeys(String),
}

/// Returns true for URLs we may fetch keys from: https anywhere, http only to loopback.
pub fn allowed_fetch_uri(u: &http::Uri) -> bool {
    let Some(host) = u.host() else { return false };
    match u.scheme_str() {
        Some("https") => true,
        Some("http") => {
            let h = host.trim_start_matches('[').trim_end_matches(']');
            h == "localhost" || h.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

/// An HTTP(S) client for key fetches: system roots plus an optional private CA.
pub type FetchClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Builds a fetch client trusting the system roots and, if given, the CA certificates in `ca_file`.
pub fn fetch_client(ca_file: Option<&Path>) -> Result<FetchClient, JwksError> {
    let pem = match ca_file {
        Some(path) => Some((path, std::fs::read(path).map_err(|e| JwksError::Tls(format!("{}: {e}", path.display())))?)),
        None => None,
    };
    let tls = crate::tls_client::client_config(pem.as_ref().map(|(p, b)| (*p, b.as_slice()))).map_err(|e| JwksError::Tls(e.to_string()))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector))
}

/// A key from a JWKS.
#[derive(Debug)]
pub struct JwkKey {
    pub key: VerifyKey,
}

/// An issuer's live JWKS: swapped whole on each successful fetch; readers never lock.
pub struct KeySet {
    issuer_id: String,
    issuer: String,
    settings: JwksSettings,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<HashMap<String, Arc<JwkKey>>>,
    keyless: ArcSwap<Vec<Arc<JwkKey>>>,
    client: Option<FetchClient>,
    client_error: Option<String>,
    has_keys: AtomicBool,
    /// Bumped whenever a fetch brings keys that differ from the last ones: tokens verified under an older
    /// generation are verified again, so a key the IdP withdrew stops working for cached tokens too.
    generation: AtomicU64,
    /// The last fetched `keys` array, to tell a changed JWKS from the same one fetched again.
    keys_doc: Mutex<Option<serde_json::Value>>,
    /// Where fetch outcomes are counted (the gateway's metrics), from the refresh loop and refetches alike.
    reporter: std::sync::OnceLock<Reporter>,
    /// When the last refetch for an unknown kid happened (the miss path only).
    last_refetch: Mutex<Option<Instant>>,
    fetching: tokio::sync::Mutex<()>,
    /// When the next scheduled refresh is due (set by each successful fetch; taken over on a reload).
    next_due: Mutex<Option<tokio::time::Instant>>,
}

impl KeySet {
    /// Creates an empty key set; keys arrive with the first [`KeySet::refresh`].
    pub fn new(issuer_id: String, issuer: String, settings: JwksSettings, algorithms: Vec<Algorithm>, shared: &FetchClient) -> KeySet {
        let (client, client_error) = match &settings.ca_file {
            None => (Some(shared.clone()), None),
            Some(ca) => match fetch_client(Some(ca)) {
                Ok(c) => (Some(c), None),
                Err(JwksError::Tls(e)) => (None, Some(e)),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        KeySet {
            issuer_id,
            issuer,
            settings,
            algorithms,
            keys: ArcSwap::from_pointee(HashMap::new()),
            keyless: ArcSwap::from_pointee(Vec::new()),
            client,
            client_error,
            has_keys: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            keys_doc: Mutex::new(None),
            reporter: std::sync::OnceLock::new(),
            last_refetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            next_due: Mutex::new(None),
        }
    }

    /// Takes over the keys of the key set this one replaces on a reload, if both fetch the same keys the same
    /// way for the same issuer. A change of `algorithms` alone keeps them: every token's algorithm is checked
    /// against the issuer's list before any key is used, and the reload's fetch rebinds them at once.
    pub fn seed_from(&self, old: &KeySet) {
        let same = old.issuer_id == self.issuer_id
            && old.issuer == self.issuer
            && old.settings.source == self.settings.source
            && old.settings.ca_file == self.settings.ca_file;
        if same && old.has_keys() {
            self.keys.store(old.keys.load_full());
            self.keyless.store(old.keyless.load_full());
            self.has_keys.store(true, Ordering::Release);
            if let (Ok(mut mine), Ok(theirs)) = (self.keys_doc.lock(), old.keys_doc.lock()) {
                mine.clone_from(&theirs);
            }
            // Unchanged in every way that shapes the keys: no fetch until the old schedule's next one.
            if old.settings == self.settings && old.algorithms == self.algorithms {
                if let (Ok(mut mine), Ok(theirs)) = (self.next_due.lock(), old.next_due.lock()) {
                    mine.clone_from(&theirs);
                }
            }
        }
    }

    /// Sets where fetch outcomes go: `(issuer id, succeeded, keys held)`. Once; later calls are ignored.
    pub fn report_to(&self, reporter: Reporter) {
        let _ = self.reporter.set(reporter);
    }

    fn report(&self, ok: bool) {
        if let Some(r) = self.reporter.get() {
            r(&self.issuer_id, ok, self.key_count());
        }
    }

    /// The generation of the keys held now (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Names the issuer this key set belongs to.
    pub fn issuer_id(&self) -> &str {
        &self.issuer_id
    }

    /// Returns true once a fetch has produced at least one key.
    pub fn has_keys(&self) -> bool {
        self.has_keys.load(Ordering::Acquire)
    }

    /// Counts the keys held now.
    pub fn key_count(&self) -> usize {
        self.keys.load().len() + self.keyless.load().len()
    }

    /// Looks up a key by kid.
    pub fn get(&self, kid: &str) -> Option<Arc<JwkKey>> {
        self.keys.load().get(kid).cloned()
    }

    /// For a token without a kid: the key that fits `alg`, only if exactly one does.
    pub fn single_key_for(&self, alg: Algorithm) -> Option<Arc<JwkKey>> {
        let keys = self.keys.load();
        let keyless = self.keyless.load();
        let mut fits = keys.values().chain(keyless.iter()).filter(|k| k.key.algorithms.contains(&alg));
        let first = fits.next()?;
        fits.next().is_none().then(|| first.clone())
    }

    /// Refetches the JWKS for an unknown kid, at most once per cool-down window across all requests.
    pub async fn refetch_for_unknown_kid(&self, kid: &str) -> Option<Arc<JwkKey>> {
        // Whether this request refetches, decided together with taking the fetch lock: a request right behind
        // it must find the fetch under way and wait for it, not look before it has begun.
        let claim = {
            let Ok(mut last) = self.last_refetch.lock() else {
                return None;
            };
            if last.is_some_and(|t| t.elapsed() < self.settings.refetch_cooldown) {
                None
            } else {
                *last = Some(Instant::now());
                Some(self.fetching.try_lock().ok())
            }
        };
        let Some(held) = claim else {
            // Within the cool-down: wait for a fetch under way (a rotation's first token started it) and look
            // again, so the tokens right behind the first are not refused meanwhile.
            drop(self.fetching.lock().await);
            return self.get(kid);
        };
        let _one_at_a_time = match held {
            Some(guard) => guard,
            None => self.fetching.lock().await,
        };
        tracing::info!(issuer = %self.issuer_id, "unknown kid: refetching JWKS");
        let fetched = self.fetch_and_swap().await;
        self.report(fetched.is_ok());
        if let Err(e) = fetched {
            self.warn_failed("JWKS refetch failed", &e);
        }
        self.get(kid)
    }

    /// Fetches the JWKS now and swaps it in, and reports the outcome. Returns how long until the next refresh
    /// is due.
    pub async fn refresh(&self) -> Result<Duration, JwksError> {
        let _one_at_a_time = self.fetching.lock().await;
        let fetched = self.fetch_and_swap().await;
        self.report(fetched.is_ok());
        fetched
    }

    /// [`KeySet::refresh`] under the fetch lock.
    async fn fetch_and_swap(&self) -> Result<Duration, JwksError> {
        let Some(client) = &self.client else {
            return Err(JwksError::Tls(self.client_error.clone().unwrap_or_default()));
        };
        let jwks_uri = match &self.settings.source {
            JwksSource::Url(u) => u.clone(),
            JwksSource::Discovery(u) => {
                let (doc, _) = self.get_json(client, u).await?;
                discovered_jwks_uri(&doc, &self.issuer)?
            }
        };
        let (doc, max_age) = self.get_json(client, &jwks_uri).await?;
        let (keys, keyless) = self.parse_keys(&doc);
        if keys.is_empty() && keyless.is_empty() {
            return Err(JwksError::NoKeys(jwks_uri.to_string()));
        }
        tracing::debug!(issuer = %self.issuer_id, keys = keys.len() + keyless.len(), "JWKS loaded");
        self.keys.store(Arc::new(keys));
        self.keyless.store(Arc::new(keyless));
        self.has_keys.store(true, Ordering::Release);
        // After the new keys are in place: a token verified after this load was verified with them.
        if let Ok(mut last) = self.keys_doc.lock() {
            let now = doc.get("keys");
            if last.as_ref() != now {
                *last = now.cloned();
                self.generation.fetch_add(1, Ordering::AcqRel);
            }
        }
        // max-age shortens the interval (floored at 5 s so a tiny max-age cannot hammer the IdP), never lengthens
        // it. Not `clamp`: that panics when the configured interval is itself under 5 s, killing the refresh task
        // (and, on the unknown-kid refetch path, the request).
        let next = match max_age {
            Some(age) => age.max(Duration::from_secs(5)).min(self.settings.refresh),
            None => self.settings.refresh,
        };
        if let Ok(mut due) = self.next_due.lock() {
            *due = Some(tokio::time::Instant::now() + next);
        }
        Ok(next)
    }

    async fn get_json(&self, client: &FetchClient, uri: &http::Uri) -> Result<(serde_json::Value, Option<Duration>), JwksError> {
        let url = uri.to_string();
        let req = http::Request::get(uri.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|_| JwksError::Body(url.clone()))?;
        let fetch = async {
            let rsp = client.request(req).await.map_err(|source| JwksError::Request { url: url.clone(), source })?;
            if rsp.status() != http::StatusCode::OK {
                return Err(JwksError::Status { url: url.clone(), status: rsp.status() });
            }
            let max_age = rsp.headers().get(http::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()).and_then(parse_max_age);
            let body =
                Limited::new(rsp.into_body(), MAX_DOCUMENT_BYTES).collect().await.map_err(|_| JwksError::Body(url.clone()))?.to_bytes();
            let doc = serde_json::from_slice(&body).map_err(|source| JwksError::Json { url: url.clone(), source })?;
            Ok((doc, max_age))
        };
        tokio::time::timeout(self.settings.timeout, fetch).await.map_err(|_| JwksError::Timeout(url.clone()))?
    }

    pub(crate) fn parse_keys(&self, doc: &serde_json::Value) -> (HashMap<String, Arc<JwkKey>>, Vec<Arc<JwkKey>>) {
        let mut keys = HashMap::new();
        let mut keyless = Vec::new();
        for raw in doc.get("keys").and_then(|k| k.as_array()).into_iter().flatten() {
            match self.parse_key(raw) {
                Ok(k) => match k.key.kid.clone() {
                    Some(kid) => {
                        match keys.entry(kid) {
                            // Which of the two signed a token cannot be told: the first published is kept.
                            std::collections::hash_map::Entry::Occupied(e) => {
                                tracing::warn!(issuer = %self.issuer_id, kid = e.key(), "JWKS lists two keys with one kid; keeping the first");
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(Arc::new(k));
                            }
                        }
                    }
                    None => keyless.push(Arc::new(k)),
                },
                Err(why) => {
                    tracing::info!(issuer = %self.issuer_id, kid = ?raw.get("kid"), "skipping JWKS key: {why}")
                }
            }
        }
        (keys, keyless)
    }

    fn parse_key(&self, raw: &serde_json::Value) -> Result<JwkKey, String> {
        let jwk: Jwk = serde_json::from_value(raw.clone()).map_err(|e| format!("unreadable: {e}"))?;
        match &jwk.common.public_key_use {
            None | Some(PublicKeyUse::Signature) => {}
            Some(PublicKeyUse::Encryption) => return Err("marked \"use\": \"enc\"".into()),
            Some(_) => return Err("its \"use\" is not \"sig\"".into()),
        }
        // RFC 7517 §4.3: a key that lists its operations is only for those.
        if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
            return Err("its \"key_ops\" do not include \"verify\"".into());
        }
        let curve_alg = match &jwk.algorithm {
            AlgorithmParameters::OctetKey(_) => return Err("symmetric (oct) keys are never taken from a JWKS".into()),
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Some(Algorithm::ES256),
                EllipticCurve::P384 => Some(Algorithm::ES384),
                _ => return Err("unsupported curve".into()),
            },
            AlgorithmParameters::OctetKeyPair(p) if p.curve != EllipticCurve::Ed25519 => return Err("unsupported OKP curve".into()),
            _ => None,
        };
        let declared = match raw.get("alg") {
            Some(serde_json::Value::String(a)) => Some(a.parse::<Algorithm>().map_err(|_| format!("unsupported alg {a:?}"))?),
            Some(_) => return Err("alg is not a string".into()),
            None => None,
        };
        if let (Some(d), Some(c)) = (declared, curve_alg) {
            if d != c {
                return Err(format!("alg {d:?} disagrees with the curve"));
            }
        }
        let jwk_alg = declared.or(curve_alg);
        if let Some(a) = jwk_alg {
            if !self.algorithms.contains(&a) {
                return Err(format!("alg {a:?} is not allowed for this issuer"));
            }
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("bad key material: {e}"))?;
        let key = bind_key(jwk.common.key_id.clone(), key, &self.algorithms, jwk_alg)?;
        Ok(JwkKey { key })
    }

    /// Logs a failed fetch, saying what is served meanwhile: the last good keys, or none at all.
    fn warn_failed(&self, what: &str, e: &JwksError) {
        if self.has_keys() {
            tracing::warn!(issuer = %self.issuer_id, error = %e, "{what}; keeping the last good keys");
        } else {
            tracing::warn!(issuer = %self.issuer_id, error = %e, "{what}; no keys yet: its tokens are answered 503 until a fetch succeeds");
        }
    }

    /// Runs the background refresh loop until the task is aborted. Retries quickly while no keys are held. A key
    /// set that took over the keys of its predecessor on a reload waits until the predecessor's next refresh was
    /// due: a reload does not refetch from the identity provider (from every replica at once).
    pub async fn run_refresh(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        let resume = self.next_due.lock().ok().and_then(|d| *d);
        if let Some(at) = resume {
            tokio::time::sleep_until(at).await;
        }
        loop {
            let wait = match self.refresh().await {
                Ok(next) => {
                    backoff = Duration::from_millis(500);
                    next
                }
                Err(e) => {
                    self.warn_failed("JWKS refresh failed", &e);
                    let wait = if self.has_keys() { backoff.max(Duration::from_secs(5)).min(self.settings.refresh) } else { backoff };
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The `jwks_uri` of an OIDC discovery document, which must name `issuer` and point where keys may be fetched from.
pub(crate) fn discovered_jwks_uri(doc: &serde_json::Value, issuer: &str) -> Result<http::Uri, JwksError> {
    let iss = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or_default();
    if iss != issuer {
        return Err(JwksError::Discovery(format!("issuer {iss:?} does not match the configured {issuer:?}")));
    }
    let uri = doc.get("jwks_uri").and_then(|v| v.as_str()).ok_or_else(|| JwksError::Discovery("no jwks_uri".into()))?;
    let uri: http::Uri = uri.parse().map_err(|_| JwksError::Discovery(format!("bad jwks_uri {uri:?}")))?;
    if !allowed_fetch_uri(&uri) {
        return Err(JwksError::Discovery(format!("jwks_uri {uri} must be https (http only to loopback)")));
    }
    Ok(uri)
}

pub(crate) fn parse_max_age(cc: &str) -> Option<Duration> {
    cc.split(',').find_map(|d| d.trim().strip_prefix("max-age=")).and_then(|v| v.trim().parse().ok()).map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetch_urls_are_https_or_loopback() {
        assert!(allowed_fetch_uri(&"https://sso.example.com/x".parse().unwrap()));
        assert!(allowed_fetch_uri(&"http://127.0.0.1:9/x".parse().unwrap()));
        assert!(allowed_fetch_uri(&"http://[::1]:9/x".parse().unwrap()));
        assert!(!allowed_fetch_uri(&"http://sso.example.com/x".parse().unwrap()));
        assert!(!allowed_fetch_uri(&"ftp://127.0.0.1/x".parse().unwrap()));
    }

    #[test]
    fn max_age() {
        assert_eq!(parse_max_age("public, max-age=300"), Some(Duration::from_secs(300)));
        assert_eq!(parse_max_age("no-store"), None);
    }
}
