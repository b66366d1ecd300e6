//! `[token_endpoint]`: checked into the token endpoint's settings (accounts loaded, the signing issuer found).

use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use crate::auth::IssuerSettings;
use crate::token_endpoint::TokenEndpointSettings;

use super::file::*;
use super::validate::Declared;
use super::*;
use crate::token_endpoint::accounts::{hash_kind, Account};
use serde::Deserialize;

impl Validator<'_> {
    pub(super) fn token_endpoint(
        &mut self,
        t: Spanned<TokenEndpointFile>,
        issuers: &mut [IssuerSettings],
        declared: &Declared,
        form_timeout: Duration,
    ) -> Option<TokenEndpointSettings> {
        let span = t.span();
        let t = t.into_inner();
        let before = self.problems.len();
        let path = t.path.unwrap_or_else(|| "/token".into());
        if !path.starts_with('/') || crate::router::normalize_path(&path).ok().as_deref() != Some(path.as_str()) {
            self.error(span.clone(), format!("[token_endpoint] path {path:?} must be a normalised absolute path"));
        }
        let Some(issuer) = issuers.iter_mut().find(|i| i.id == t.issuer) else {
            // A declared issuer that was refused has its own problem; the endpoint cannot be checked without it.
            if !declared.issuer(&t.issuer) {
                self.error(span, format!("[token_endpoint] issuer {:?} is not defined in [[issuers]]", t.issuer));
            }
            return None;
        };
        if let Some(pk) = &t.private_key {
            let p = self.resolve(pk);
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|pem| crate::auth::keys::public_from_private_pem(&pem))
                .and_then(|k| crate::auth::keys::bind_key(None, k, &issuer.algorithms, None))
            {
                Ok(k) => {
                    issuer.static_keys.push(k);
                    issuer.private_key = Some(p);
                }
                Err(e) => self.error(span.clone(), format!("[token_endpoint] private_key {}: {e}", p.display())),
            }
        }
        if issuer.private_key.is_none() && issuer.hmac_secret.is_none() && self.generate {
            self.error(span.clone(), format!("[token_endpoint] issuer {:?} has no signing key (an HMAC secret or private_key)", issuer.id));
        }
        let load = |file: &Option<PathBuf>, clients: bool, v: &mut Self| match file {
            None => Some(std::collections::BTreeMap::new()),
            Some(f) => match load_accounts(&v.resolve(f), clients) {
                Ok(a) => Some(a),
                Err(e) => {
                    v.error(span.clone(), format!("[token_endpoint] {e}"));
                    None
                }
            },
        };
        let ttl = t.access_token_ttl.map_or(Duration::from_secs(1800), |d| d.0);
        // The gateway refuses tokens living longer than their issuer's max_lifetime: it must not issue them.
        if ttl.as_secs() > issuer.max_lifetime {
            self.error(
                span.clone(),
                format!(
                    "[token_endpoint] access_token_ttl ({}s) is longer than issuer {:?}'s max_lifetime ({}s): its tokens would be refused",
                    ttl.as_secs(),
                    issuer.id,
                    issuer.max_lifetime
                ),
            );
        }
        let users = load(&t.users_file, false, self);
        let clients = load(&t.clients_file, true, self);
        // Both grants put the account's name in `sub`: a client named like a user would pass that user's
        // `claims = { sub = "{id}" }` rules.
        if let (Some(u), Some(c)) = (&users, &clients) {
            for name in u.keys().filter(|n| c.contains_key(*n)) {
                self.error(
                    span.clone(),
                    format!("[token_endpoint] {name:?} is both a user and a client: their tokens would carry the same sub"),
                );
            }
        }
        let (burst, rate) = match &t.rate_limit {
            None => (5, Duration::from_secs(12)),
            Some(r) => match crate::edge::ratelimit::parse_rate(&r.rate) {
                Ok((n, per)) => (r.burst.unwrap_or(n), per),
                Err(e) => {
                    self.error(span.clone(), format!("[token_endpoint] rate_limit: {e}"));
                    (1, Duration::from_secs(1))
                }
            },
        };
        // Failed logins are shared by default when there is a store: a brute-force limit N replicas multiply is
        // N times weaker.
        let login_store = t.rate_limit.as_ref().and_then(|r| r.store.as_ref());
        let shared_attempts = match login_store {
            Some(s) => self.limit_store(Some(s), None) != crate::edge::ratelimit::LimitStore::Local,
            None => self.store_replicas.is_some(),
        };
        let revocation_path = t.revocation_path.clone().unwrap_or_else(|| "/revoke".into());
        if !revocation_path.starts_with('/')
            || crate::router::normalize_path(&revocation_path).ok().as_deref() != Some(revocation_path.as_str())
            || revocation_path == path
        {
            self.error(
                span.clone(),
                format!("[token_endpoint] revocation_path {revocation_path:?} must be a normalised absolute path other than `path`"),
            );
        }
        if self.problems.len() != before {
            return None;
        }
        Some(TokenEndpointSettings {
            shared_attempts,
            revocation_path,
            path,
            issuer: t.issuer,
            users_file: t.users_file.as_ref().map(|f| self.resolve(f)),
            clients_file: t.clients_file.as_ref().map(|f| self.resolve(f)),
            users: std::sync::Arc::new(users.unwrap_or_default()),
            clients: std::sync::Arc::new(clients.unwrap_or_default()),
            ttl,
            rate,
            burst: std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN),
            allow_plaintext: t.allow_plaintext,
            form_timeout,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: BTreeMap<String, Account>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    clients: BTreeMap<String, Account>,
}

/// Reads and checks a users file (`[users."name"]`) or clients file (`[clients."id"]`).
fn load_accounts(path: &Path, clients: bool) -> Result<BTreeMap<String, Account>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let accounts =
        if clients { toml::from_str::<ClientsFile>(&text).map(|f| f.clients) } else { toml::from_str::<UsersFile>(&text).map(|f| f.users) }
            .map_err(|e| {
                let (line, col) = e.span().map(|s| line_col(&text, s.start)).unwrap_or((1, 1));
                format!("{}:{line}:{col}: {}", path.display(), e.message().trim())
            })?;
    for (name, a) in &accounts {
        if hash_kind(&a.password_hash).is_none() {
            return Err(format!(
                "{}: {name:?}: password_hash is neither argon2 ($argon2id$…) nor bcrypt ($2b$/$2a$/$2y$…)",
                path.display()
            ));
        }
    }
    Ok(accounts)
}
