//! The built-in token endpoint (RFC 6749 password and client_credentials grants, RFC 8414/JWKS documents), and
//! minting the tokens it issues (also `portcullis token` and the demo).

pub mod accounts;
pub mod attempts;
pub mod revoke;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::auth::keys::public_key_of;
use crate::auth::IssuerSettings;
use crate::body::Body;
use crate::store::Store;
use accounts::{hash_class, hash_classes, hash_password, verify_password, Account};
use attempts::{Attempt, Attempts, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuer {0:?} has no signing key (an HMAC secret or private_key)")]
    NoSigningKey(String),
    #[error("signing key: {0}")]
    Key(String),
    #[error("signing failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// The key that signs for an issuer, with the algorithm it signs with.
pub fn signing_key(issuer: &IssuerSettings) -> Result<(EncodingKey, Algorithm), IssuerError> {
    if let Some(path) = &issuer.private_key {
        let pem = std::fs::read(path).map_err(|e| IssuerError::Key(format!("{}: {e}", path.display())))?;
        let (_, family) = public_key_of(&pem).map_err(IssuerError::Key)?;
        let alg =
            issuer.algorithms.iter().copied().find(|a| a.family() == family).ok_or_else(|| IssuerError::NoSigningKey(issuer.id.clone()))?;
        let key = match family {
            AlgorithmFamily::Ed => EncodingKey::from_ed_pem(&pem),
            AlgorithmFamily::Ec => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .map_err(|e| IssuerError::Key(e.to_string()))?;
        return Ok((key, alg));
    }
    if let Some(secret) = &issuer.hmac_secret {
        let alg = issuer
            .algorithms
            .iter()
            .copied()
            .find(|a| a.family() == AlgorithmFamily::Hmac)
            .ok_or_else(|| IssuerError::NoSigningKey(issuer.id.clone()))?;
        return Ok((EncodingKey::from_secret(secret), alg));
    }
    Err(IssuerError::NoSigningKey(issuer.id.clone()))
}

/// Mints an access token (`typ: at+jwt`) for `sub` with roles and scopes, valid for `ttl_secs`.
pub fn mint(issuer: &IssuerSettings, sub: &str, roles: &[String], scopes: &[String], ttl_secs: u64) -> Result<String, IssuerError> {
    let (key, alg) = signing_key(issuer)?;
    let mut header = Header::new(alg);
    header.typ = Some("at+jwt".into());
    // The same kid the token endpoint sets and publishes, so a JWKS consumer finds the key.
    if alg.family() != AlgorithmFamily::Hmac {
        header.kid = Some(public_jwk(issuer, &key, alg)?.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256));
    }
    Ok(jsonwebtoken::encode(&header, &token_claims(issuer, sub, roles, scopes, ttl_secs, None), &key)?)
}

/// Forms and passwords larger than this are refused before any hashing.
pub const MAX_FORM_BYTES: usize = 4 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("invalid_request: {0}")]
    InvalidRequest(&'static str),
    #[error("unsupported grant type")]
    UnsupportedGrantType,
    #[error("invalid username or password")]
    InvalidGrant,
    #[error("client authentication failed")]
    InvalidClient,
    #[error("requested scope is not allowed")]
    InvalidScope,
    #[error("only {allow} is allowed")]
    MethodNotAllowed { allow: &'static str },
    #[error("too many failed attempts")]
    TooManyAttempts { retry_after_secs: u64 },
    #[error("too many token requests waiting for a password check")]
    Busy,
    #[error("token signing failed: {0}")]
    Signing(String),
    /// The token names another client than the authenticated one (RFC 7009 §2.1).
    #[error("the token was issued to another client")]
    UnauthorizedClient,
    /// The revocation holds here, but the store could not take it for the other replicas.
    #[error("the revocation store is down: {0}")]
    StoreDown(String),
}

impl TokenError {
    /// The RFC 6749 §5.2 error code (or ours for the non-OAuth cases).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::InvalidRequest(_) => "invalid_request",
            TokenError::UnsupportedGrantType => "unsupported_grant_type",
            TokenError::InvalidGrant => "invalid_grant",
            TokenError::InvalidClient => "invalid_client",
            TokenError::InvalidScope => "invalid_scope",
            TokenError::MethodNotAllowed { .. } => "method_not_allowed",
            TokenError::TooManyAttempts { .. } => "rate_limited",
            TokenError::Busy => "temporarily_unavailable",
            TokenError::Signing(_) => "server_error",
            TokenError::UnauthorizedClient => "unauthorized_client",
            TokenError::StoreDown(_) => "temporarily_unavailable",
        }
    }
}

/// The checked `[token_endpoint]`.
#[derive(Debug, Clone)]
pub struct TokenEndpointSettings {
    pub path: String,
    pub issuer: String,
    pub users_file: Option<PathBuf>,
    pub clients_file: Option<PathBuf>,
    pub users: Arc<BTreeMap<String, Account>>,
    pub clients: Arc<BTreeMap<String, Account>>,
    pub ttl: Duration,
    pub rate: Duration,
    pub burst: NonZeroU32,
    pub allow_plaintext: bool,
    /// Failed attempts are counted in the shared store too (`[token_endpoint.rate_limit] store`).
    pub shared_attempts: bool,
    /// The RFC 7009 revocation endpoint.
    pub revocation_path: String,
    /// How long a token request's form may take to arrive (`[limits] header_read_timeout`).
    pub form_timeout: Duration,
}

/// The running token endpoint: accounts, the signing key, the brute-force limiter, and the published JWKS.
pub struct TokenEndpoint {
    pub settings: TokenEndpointSettings,
    issuer: IssuerSettings,
    key: EncodingKey,
    alg: Algorithm,
    kid: Option<String>,
    jwks: Option<Bytes>,
    /// One real hash per hash kind and cost in use: every failed attempt is checked against each class once,
    /// so an unknown name, and a wrong password for any user, cost the same time.
    dummy_hashes: Arc<[String]>,
    /// Failed attempts per account and client, and the hashes waiting per client (see `attempts`).
    attempts: Arc<Attempts>,
    /// Where failed attempts are shared across replicas.
    store: Option<Arc<Store>>,
    hashing: Arc<tokio::sync::Semaphore>,
}

/// A parsed `application/x-www-form-urlencoded` body; a repeated parameter is an error (RFC 6749 §3.2), and
/// one without a value counts as omitted (§3.1).
pub(crate) fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, TokenError> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(body) {
        if v.is_empty() {
            continue;
        }
        if out.insert(k.into_owned(), v.into_owned()).is_some() {
            return Err(TokenError::InvalidRequest("a parameter is repeated"));
        }
    }
    Ok(out)
}

impl TokenEndpoint {
    /// Builds the endpoint for its issuer.
    /// With `previous` (a reload) and unchanged attempt limits, failed-attempt state carries over, so a reload
    /// never resets a brute-force counter.
    pub fn new(
        settings: TokenEndpointSettings,
        issuer: &IssuerSettings,
        ipv6_prefix: u8,
        previous: Option<&TokenEndpoint>,
        store: Option<&Arc<Store>>,
    ) -> Result<TokenEndpoint, IssuerError> {
        let (key, alg) = signing_key(issuer)?;
        let mut kid = None;
        let mut jwks = None;
        if alg.family() != AlgorithmFamily::Hmac {
            let mut jwk = public_jwk(issuer, &key, alg)?;
            let thumb = jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256);
            jwk.common.key_id = Some(thumb.clone());
            jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
            kid = Some(thumb);
            let set = serde_json::json!({ "keys": [jwk] });
            jwks = Some(Bytes::from(set.to_string()));
        }
        let mut dummy_hashes = hash_classes(settings.users.values().chain(settings.clients.values()));
        if dummy_hashes.is_empty() {
            dummy_hashes.push(hash_password(b"portcullis-dummy").map_err(IssuerError::Key)?);
        }
        let attempts = match previous.filter(|p| p.attempts.same_limits(settings.rate, settings.burst.get(), ipv6_prefix)) {
            Some(p) => p.attempts.clone(),
            None => Arc::new(Attempts::new(settings.rate, settings.burst.get(), ipv6_prefix)),
        };
        let permits = std::thread::available_parallelism().map_or(2, |n| n.get()).max(1);
        Ok(TokenEndpoint {
            settings,
            issuer: issuer.clone(),
            key,
            alg,
            kid,
            jwks,
            dummy_hashes: dummy_hashes.into(),
            attempts,
            store: store.cloned(),
            hashing: Arc::new(tokio::sync::Semaphore::new(permits)),
        })
    }

    /// Returns true for the paths this endpoint answers: the token path and (asymmetric keys) the well-known ones.
    pub fn serves(&self, path: &str) -> bool {
        path == self.settings.path
            || path == self.settings.revocation_path
            || (self.jwks.is_some() && matches!(path, "/.well-known/jwks.json" | "/.well-known/openid-configuration"))
    }

    /// Answers the well-known documents when the path names one (asymmetric keys only); they are read-only.
    pub fn well_known(&self, method: &Method, path: &str) -> Option<Result<Response<Body>, TokenError>> {
        let jwks = self.jwks.as_ref()?;
        let doc = self.well_known_doc(jwks, path)?;
        if method != Method::GET && method != Method::HEAD {
            return Some(Err(TokenError::MethodNotAllowed { allow: "GET, HEAD" }));
        }
        Some(Ok(doc))
    }

    fn well_known_doc(&self, jwks: &Bytes, path: &str) -> Option<Response<Body>> {
        match path {
            "/.well-known/jwks.json" => Some(json_answer(StatusCode::OK, jwks.clone(), false)),
            "/.well-known/openid-configuration" => {
                let iss = self.issuer.issuer.trim_end_matches('/');
                let doc = serde_json::json!({
                    "issuer": self.issuer.issuer,
                    "token_endpoint": format!("{iss}{}", self.settings.path),
                    "revocation_endpoint": format!("{iss}{}", self.settings.revocation_path),
                    "jwks_uri": format!("{iss}/.well-known/jwks.json"),
                    "grant_types_supported": ["password", "client_credentials"],
                    "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                    "id_token_signing_alg_values_supported": [format!("{:?}", self.alg)],
                });
                Some(json_answer(StatusCode::OK, Bytes::from(doc.to_string()), false))
            }
            _ => None,
        }
    }

    /// Serves `POST {path}`: reads the small form, checks the grant, and issues a token. Returns the grant's
    /// name (for metrics) with the outcome.
    pub async fn handle(
        &self,
        req: Request<crate::body::RequestBody>,
        client_ip: IpAddr,
    ) -> (&'static str, Result<Response<Body>, TokenError>) {
        let mut grant = "unknown";
        let result = self.handle_grant(req, client_ip, &mut grant).await;
        (grant, result)
    }

    async fn handle_grant(
        &self,
        req: Request<crate::body::RequestBody>,
        client_ip: IpAddr,
        grant: &mut &'static str,
    ) -> Result<Response<Body>, TokenError> {
        let (form, basic) = self.read_form(req).await?;
        match form.get("grant_type").map(String::as_str) {
            None => Err(TokenError::InvalidRequest("grant_type is missing")),
            Some("password") => {
                *grant = "password";
                self.password_grant(&form, basic.as_ref(), client_ip).await
            }
            Some("client_credentials") => {
                *grant = "client_credentials";
                self.client_credentials_grant(&form, basic.as_ref(), client_ip).await
            }
            Some(_) => Err(TokenError::UnsupportedGrantType),
        }
    }

    /// Reads a POSTed form (small, and within `form_timeout`) and the request's `Authorization`.
    async fn read_form(
        &self,
        req: Request<crate::body::RequestBody>,
    ) -> Result<(HashMap<String, String>, Option<HeaderValue>), TokenError> {
        if req.method() != Method::POST {
            return Err(TokenError::MethodNotAllowed { allow: "POST" });
        }
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            return Err(TokenError::InvalidRequest("the body must be application/x-www-form-urlencoded"));
        }
        let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > MAX_FORM_BYTES) {
            return Err(TokenError::InvalidRequest("the form is too large"));
        }
        let basic = req.headers().get(header::AUTHORIZATION).cloned();
        // A deadline: a client that declares a form and sends it a byte at a time would otherwise hold its
        // connection (a `max_connections` place) for as long as it likes.
        let reading = http_body_util::Limited::new(req.into_body(), MAX_FORM_BYTES).collect();
        let body = tokio::time::timeout(self.settings.form_timeout, reading)
            .await
            .map_err(|_| TokenError::InvalidRequest("the form did not arrive in time"))?
            .map_err(|_| TokenError::InvalidRequest("the form is too large or was cut off"))?
            .to_bytes();
        let form = parse_form(&body)?;
        Ok((form, basic))
    }

    /// Starts an attempt, or refuses it before any hashing (too many failures here or, with a store, across the
    /// replicas; or too many hashes waiting).
    async fn begin(&self, account: String, ip: IpAddr) -> Result<Attempt, TokenError> {
        let refused = |r| match r {
            Refusal::TooMany { retry_after_secs } => TokenError::TooManyAttempts { retry_after_secs },
            Refusal::Busy => TokenError::Busy,
        };
        let attempt = self.attempts.begin(account, ip).map_err(refused)?;
        match &self.store {
            Some(store) => attempt.charge_shared(store).await.map_err(refused),
            None => Ok(attempt),
        }
    }

    /// Returns a task that drops idle failed-attempt state every 30 s, bounding memory under a flood of
    /// made-up usernames. It holds only that state, so it ends when no gateway uses it any more.
    pub fn pruner(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let attempts = Arc::downgrade(&self.attempts);
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(attempts) = attempts.upgrade() else { return };
                attempts.prune();
            }
        }
    }

    /// Checks a secret against the account's hash (None: unknown account) off the executor. A failure also
    /// checks it against one hash of every other class in use, so every failure costs the same. The attempt and
    /// the hashing place go with the hash into the blocking task: a client that cancels its request (an HTTP/2
    /// reset) cannot free them while its hash still runs, and a failure is charged when the hash ends, whether
    /// or not anyone still waits for the answer.
    async fn verify_off_executor(&self, attempt: Attempt, password: &[u8], hash: Option<&str>) -> bool {
        let Ok(permit) = self.hashing.clone().acquire_owned().await else { return false };
        let password = password.to_vec();
        let hash = hash.map(str::to_string);
        let dummies = self.dummy_hashes.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let ok = hash.as_deref().is_some_and(|h| verify_password(&password, h));
            if !ok {
                let own = hash.as_deref().map(hash_class);
                for d in dummies.iter().filter(|d| Some(hash_class(d)) != own) {
                    let _ = verify_password(&password, d);
                }
                attempt.failed();
            }
            ok
        })
        .await
        .unwrap_or(false)
    }

    async fn password_grant(
        &self,
        form: &HashMap<String, String>,
        basic: Option<&HeaderValue>,
        ip: IpAddr,
    ) -> Result<Response<Body>, TokenError> {
        let username = form.get("username").ok_or(TokenError::InvalidRequest("username is missing"))?;
        let password = form.get("password").ok_or(TokenError::InvalidRequest("password is missing"))?;
        // RFC 6749 §4.3.2: a client that includes its credentials is authenticated, and a wrong one refused,
        // before the user's password is looked at.
        let client = match presented_client(form, basic)? {
            Some((id, secret)) => Some(self.authenticate_client(id, &secret, ip).await?.0),
            None => None,
        };
        let attempt = self.begin(attempt_key(username), ip).await?;
        // A disabled account is checked like an unknown one: the same hash verifications, whatever the password.
        let account = self.settings.users.get(username).filter(|a| !a.disabled);
        // An unknown user costs the same hash verifications as a wrong password.
        let ok = self.verify_off_executor(attempt, password.as_bytes(), account.map(|a| a.password_hash.as_str())).await;
        match account {
            Some(a) if ok => self.issue(username, a, form.get("scope"), client.as_deref()),
            _ => Err(TokenError::InvalidGrant),
        }
    }

    /// Checks a client's secret (off the executor, as a counted attempt): its id and account, or `invalid_client`.
    async fn authenticate_client(&self, id: String, secret: &str, ip: IpAddr) -> Result<(String, &Account), TokenError> {
        let attempt = self.begin(format!("client:{}", attempt_key(&id)), ip).await?;
        let account = self.settings.clients.get(&id).filter(|a| !a.disabled);
        let ok = self.verify_off_executor(attempt, secret.as_bytes(), account.map(|a| a.password_hash.as_str())).await;
        match account {
            Some(a) if ok => Ok((id, a)),
            _ => Err(TokenError::InvalidClient),
        }
    }

    async fn client_credentials_grant(
        &self,
        form: &HashMap<String, String>,
        basic: Option<&HeaderValue>,
        ip: IpAddr,
    ) -> Result<Response<Body>, TokenError> {
        let (id, secret) = presented_client(form, basic)?.ok_or(TokenError::InvalidClient)?;
        let (id, account) = self.authenticate_client(id, &secret, ip).await?;
        self.issue(&id, account, form.get("scope"), Some(&id))
    }

    /// Issues the token: the granted scopes are the requested ones the account has (all of its own when none
    /// are requested). `client` is the authenticated client, if any (RFC 9068 `client_id`).
    fn issue(&self, sub: &str, account: &Account, requested: Option<&String>, client: Option<&str>) -> Result<Response<Body>, TokenError> {
        let granted: Vec<String> = match requested {
            None => account.scopes.clone(),
            Some(req) => {
                let req = requested_scopes(req)?;
                if req.is_empty() {
                    return self.issue(sub, account, None, client);
                }
                let g: Vec<String> = req.into_iter().filter(|s| account.scopes.iter().any(|a| a == s)).map(str::to_string).collect();
                if g.is_empty() {
                    return Err(TokenError::InvalidScope);
                }
                g
            }
        };
        let ttl = self.settings.ttl.as_secs();
        let token = self.sign(sub, &account.roles, &granted, ttl, client).map_err(|e| TokenError::Signing(e.to_string()))?;
        let mut body = serde_json::json!({"access_token": token, "token_type": "bearer", "expires_in": ttl});
        if !granted.is_empty() {
            body["scope"] = granted.join(" ").into();
        }
        Ok(json_answer(StatusCode::OK, Bytes::from(body.to_string()), true))
    }

    fn sign(&self, sub: &str, roles: &[String], scopes: &[String], ttl: u64, client: Option<&str>) -> Result<String, IssuerError> {
        let claims = token_claims(&self.issuer, sub, roles, scopes, ttl, client);
        let mut header = Header::new(self.alg);
        header.typ = Some("at+jwt".into());
        header.kid = self.kid.clone();
        Ok(jsonwebtoken::encode(&header, &claims, &self.key)?)
    }
}

/// The public JWK of the signing key (jsonwebtoken cannot build one for Ed25519 itself).
fn public_jwk(issuer: &IssuerSettings, key: &EncodingKey, alg: Algorithm) -> Result<jsonwebtoken::jwk::Jwk, IssuerError> {
    if alg.family() != AlgorithmFamily::Ed {
        return Ok(jsonwebtoken::jwk::Jwk::from_encoding_key(key, alg)?);
    }
    let path = issuer.private_key.as_ref().ok_or_else(|| IssuerError::NoSigningKey(issuer.id.clone()))?;
    let pem = std::fs::read(path).map_err(|e| IssuerError::Key(format!("{}: {e}", path.display())))?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| IssuerError::Key(e.to_string()))?;
    let kp = Ed25519KeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| IssuerError::Key(e.to_string()))?;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key().as_ref());
    let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": x});
    serde_json::from_value(jwk).map_err(|e| IssuerError::Key(e.to_string()))
}

/// A hash's class: its kind and cost parameters ("$argon2id$v=19$m=19456,t=2,p=1" or "$2b$12$"), without salt
/// and digest.
/// The failed-attempt key for a name: capped, so made-up names of any length cost a bounded amount of memory.
fn attempt_key(name: &str) -> String {
    let mut end = name.len().min(256);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

pub(crate) fn parse_basic(v: &HeaderValue) -> Result<(String, String), TokenError> {
    let s = v.to_str().map_err(|_| TokenError::InvalidClient)?;
    let (scheme, cred) = s.split_once(' ').ok_or(TokenError::InvalidClient)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(TokenError::InvalidClient);
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(cred.trim()).map_err(|_| TokenError::InvalidClient)?;
    let raw = String::from_utf8(raw).map_err(|_| TokenError::InvalidClient)?;
    let (id, secret) = raw.split_once(':').ok_or(TokenError::InvalidClient)?;
    // RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding, so each is decoded whole (an `&`
    // in it is data, not a separator).
    let dec = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8()
            .map(|d| d.into_owned())
            .map_err(|_| TokenError::InvalidClient)
    };
    Ok((dec(id)?, dec(secret)?))
}

/// The client credentials a request presents: HTTP Basic, or `client_id` with `client_secret` in the form (not
/// both, and not an id without its secret).
fn presented_client(form: &HashMap<String, String>, basic: Option<&HeaderValue>) -> Result<Option<(String, String)>, TokenError> {
    let from_body = match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) => Some((id.clone(), secret.clone())),
        (None, None) => None,
        _ => return Err(TokenError::InvalidRequest("client_id and client_secret go together")),
    };
    match (basic.map(parse_basic).transpose()?, from_body) {
        (Some(_), Some(_)) => Err(TokenError::InvalidRequest("use one client authentication method")),
        (Some(c), None) | (None, Some(c)) => Ok(Some(c)),
        (None, None) => Ok(None),
    }
}

/// A `scope` parameter's tokens (RFC 6749 §3.3: separated by single spaces, each of printable ASCII other than
/// `"` and `\`), without repeats; a malformed one is `invalid_scope`.
pub(crate) fn requested_scopes(req: &str) -> Result<Vec<&str>, TokenError> {
    let mut out: Vec<&str> = Vec::new();
    for s in req.split(' ').filter(|s| !s.is_empty()) {
        if !s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
            return Err(TokenError::InvalidScope);
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn json_answer(status: StatusCode, body: Bytes, no_store: bool) -> Response<Body> {
    let mut rsp = Response::new(Body::full(body));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if no_store {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    } else {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    }
    rsp
}

/// The claims of an issued access token (RFC 9068): nothing about the user beyond identity and policy.
fn token_claims(
    issuer: &IssuerSettings,
    sub: &str,
    roles: &[String],
    scopes: &[String],
    ttl: u64,
    client: Option<&str>,
) -> serde_json::Map<String, serde_json::Value> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), issuer.issuer.clone().into());
    claims.insert("sub".into(), sub.into());
    if let Some(aud) = issuer.audiences.first() {
        claims.insert("aud".into(), aud.clone().into());
    }
    claims.insert("iat".into(), now.into());
    claims.insert("nbf".into(), now.into());
    claims.insert("exp".into(), (now + ttl).into());
    claims.insert("jti".into(), unpredictable_id().into());
    if let Some(client) = client {
        claims.insert("client_id".into(), client.into());
    }
    claims.insert(issuer.roles_claim.clone(), roles.to_vec().into());
    if !scopes.is_empty() {
        claims.insert(issuer.scopes_claim.clone(), scopes.join(" ").into());
    }
    claims
}

/// 128 random bits in hex, from the system's CSPRNG: a token id no one can guess from request ids or earlier
/// tokens (the request-id generator is fast, not secret).
fn unpredictable_id() -> String {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // No randomness at all: still unique per process, if guessable.
        return crate::edge::headers_request::new_request_id().to_str().unwrap_or_default().to_string();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(hash: &str) -> Account {
        Account { password_hash: hash.to_string(), roles: vec![], scopes: vec![], disabled: false }
    }

    #[test]
    fn every_hash_class_in_use_gets_one_dummy_in_a_fixed_order() {
        let argon = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2g";
        let argon_other_salt = "$argon2id$v=19$m=19456,t=2,p=1$b3RoZXJzYWx0$aGFzaGhhc2g";
        let bcrypt12 = "$2b$12$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234";
        let bcrypt4 = "$2b$04$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234";
        let accounts = [account(bcrypt12), account(argon), account(argon_other_salt), account(bcrypt4)];
        let classes = hash_classes(accounts.iter());
        assert_eq!(classes.len(), 3, "{classes:?}");
        let reversed = hash_classes(accounts.iter().rev());
        let names = |c: &[String]| c.iter().map(|h| hash_class(h).to_string()).collect::<Vec<_>>();
        assert_eq!(names(&classes), names(&reversed));
        assert_eq!(hash_class(argon), hash_class(argon_other_salt));
        assert_ne!(hash_class(bcrypt12), hash_class(bcrypt4));
    }

    #[test]
    fn attempt_keys_are_capped_on_a_char_boundary() {
        assert_eq!(attempt_key("john"), "john");
        let long = "é".repeat(200);
        let k = attempt_key(&long);
        assert!(k.len() <= 256 && long.starts_with(&k));
    }

    #[test]
    fn bcrypt_long_passwords_do_not_match_their_prefix() {
        let x = format!("{}X", "a".repeat(72));
        let y = format!("{}Y", "a".repeat(72));
        let h = bcrypt::hash(x.as_bytes(), 4).unwrap();
        assert!(!verify_password(y.as_bytes(), &h));
        assert!(!verify_password(x.as_bytes(), &h));
        let short = bcrypt::hash("pw", 4).unwrap();
        assert!(verify_password(b"pw", &short));
    }

    #[test]
    fn bcrypt_never_matches_a_password_with_a_nul_byte() {
        // bcrypt stops at NUL and repeats the key: "pw\0pw" would otherwise match a hash of "pw".
        let h = bcrypt::hash("pw", 4).unwrap();
        assert!(verify_password(b"pw", &h));
        assert!(!verify_password(b"pw\0pw", &h));
        assert!(!verify_password(b"pw\0", &h));
    }

    #[test]
    fn scopes_split_at_spaces_only_and_count_once() {
        assert_eq!(requested_scopes("a b  a").ok(), Some(vec!["a", "b"]));
        assert!(requested_scopes("a\tb").is_err());
        assert!(requested_scopes("a\\b").is_err());
        assert_eq!(requested_scopes(" ").ok(), Some(vec![]));
    }

    #[test]
    fn token_ids_are_random_128_bit_hex() {
        let (a, b) = (unpredictable_id(), unpredictable_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn argon2_round_trip() {
        let h = hash_password(b"securepassword").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password(b"securepassword", &h));
        assert!(!verify_password(b"wrong", &h));
    }

    #[test]
    fn repeated_form_parameters_are_refused() {
        assert!(parse_form(b"grant_type=password&grant_type=password").is_err());
        assert_eq!(parse_form(b"a=1&b=%20").unwrap()["b"], " ");
    }
}
