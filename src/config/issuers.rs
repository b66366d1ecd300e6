//! `[[issuers]]`: checked into [`IssuerSettings`] (keys read and bound to algorithms, JWKS source, typ list).

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{AlgorithmFamily, DecodingKey};

use crate::auth::issuer::normalize_typ;
use crate::auth::keys::{bind_key, parse_alg, public_from_private_pem, read_public_pem};
use crate::auth::{IssuerSettings, JwksSettings, JwksSource};

use super::file::{IntrospectWhich, IssuerFile, IssuerKind, PublicKeyFile, PublicKeyWithKid};
use super::Validator;

pub(super) fn validate_issuer(v: &mut Validator<'_>, span: std::ops::Range<usize>, f: IssuerFile) -> Option<IssuerSettings> {
    let id = f.id.clone();
    let before = v.problem_count();
    let err = |v: &mut Validator<'_>, msg: String| v.error(span.clone(), format!("issuer {id:?}: {msg}"));
    if f.kind == Some(IssuerKind::Introspection) {
        return validate_introspection_issuer(v, span, f);
    }
    for (key, set) in [
        ("introspection_url", f.introspection_url.is_some()),
        ("client_id", f.client_id.is_some()),
        ("client_secret_env", f.client_secret_env.is_some()),
        ("cache_for", f.cache_for.is_some()),
        ("negative_cache_for", f.negative_cache_for.is_some()),
        ("introspect", f.introspect.is_some()),
        ("introspection_timeout", f.introspection_timeout.is_some()),
    ] {
        if set {
            err(v, format!("`{key}` is for kind = \"introspection\" issuers"));
        }
    }
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
    // Without one usable algorithm every key would also be reported as fitting none: that is the same mistake.
    let bind = !algorithms.is_empty();
    let mut static_keys = Vec::new();
    if let Some(s) = secret {
        if s.len() < 32 {
            err(v, format!("HMAC secret is {} bytes; at least 32 are required", s.len()));
        } else if bind {
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
            PublicKeyFile::WithKid(PublicKeyWithKid { path, kid }) => (path, Some(kid.clone())),
        };
        let p = v.resolve(path);
        match std::fs::read(&p) {
            Ok(pem) => match read_public_pem(&pem) {
                Some(_) if !bind => {}
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
                if let Err(e) = crate::auth::keys::generate_ed25519(p) {
                    err(v, format!("cannot generate private_key {}: {e}", p.display()));
                }
                false
            }
        },
        _ => false,
    };
    if let Some(p) = private_key.as_ref().filter(|_| !pending) {
        match std::fs::read(p) {
            Ok(pem) => match public_from_private_pem(&pem).and_then(|key| bind.then(|| bind_key(None, key, &algorithms, None)).transpose())
            {
                Ok(k) => static_keys.extend(k),
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
                    if let Err(e) = crate::tls_client::client_config(Some((ca.as_path(), pem.as_slice()))) {
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
        introspection: None,
    })
}

/// An issuer of opaque tokens: its introspection endpoint and the gateway's credentials there; none of the keys
/// and algorithms of a JWT issuer.
fn validate_introspection_issuer(v: &mut Validator<'_>, span: std::ops::Range<usize>, f: IssuerFile) -> Option<IssuerSettings> {
    let id = f.id.clone();
    let before = v.problem_count();
    let err = |v: &mut Validator<'_>, msg: String| v.error(span.clone(), format!("issuer {id:?}: {msg}"));
    for (key, set) in [
        ("algorithms", !f.algorithms.is_empty()),
        ("secret_env", f.secret_env.is_some()),
        ("secret_file", f.secret_file.is_some()),
        ("public_keys", f.public_keys.is_some()),
        ("discovery", f.discovery),
        ("jwks_url", f.jwks_url.is_some()),
        ("private_key", f.private_key.is_some()),
        ("typ", f.typ.is_some()),
    ] {
        if set {
            err(v, format!("`{key}` does not apply to an introspection issuer (its tokens are not verified locally)"));
        }
    }
    let url = match &f.introspection_url {
        Some(u) => match u.parse::<http::Uri>() {
            Ok(uri) if crate::auth::jwks::allowed_fetch_uri(&uri) => Some(uri),
            _ => {
                err(v, format!("introspection_url {u:?} must be an https:// URL (http:// only to loopback)"));
                None
            }
        },
        None => {
            err(v, "kind = \"introspection\" needs `introspection_url`".into());
            None
        }
    };
    let client_id = f.client_id.clone().unwrap_or_else(|| {
        err(v, "kind = \"introspection\" needs `client_id` (the gateway's client at the endpoint)".into());
        String::new()
    });
    let client_secret = match &f.client_secret_env {
        Some(var) => match std::env::var(var) {
            Ok(s) if !s.is_empty() => s,
            _ => {
                err(v, format!("environment variable {var} (client_secret_env) is not set"));
                String::new()
            }
        },
        None => {
            err(v, "kind = \"introspection\" needs `client_secret_env`".into());
            String::new()
        }
    };
    let ca_file = f.ca_file.as_ref().map(|p| v.resolve(p));
    if let Some(ca) = &ca_file {
        match std::fs::read(ca) {
            Ok(pem) => {
                if let Err(e) = crate::tls_client::client_config(Some((ca.as_path(), pem.as_slice()))) {
                    err(v, format!("ca_file {}: {e}", ca.display()));
                }
            }
            Err(e) => err(v, format!("cannot read ca_file {}: {e}", ca.display())),
        }
    }
    let timeout = f.introspection_timeout.map_or(Duration::from_secs(2), |d| d.0);
    if timeout < Duration::from_millis(10) {
        err(v, "introspection_timeout must be at least 10ms".into());
    }
    if v.problem_count() != before {
        return None;
    }
    let introspection = crate::auth::introspect::IntrospectionSettings {
        url: url?,
        client_id,
        client_secret,
        ca_file,
        cache_for: f.cache_for.map_or(Duration::from_secs(60), |d| d.0),
        negative_cache_for: f.negative_cache_for.map_or(Duration::from_secs(10), |d| d.0),
        negative_entries: 100_000,
        all_tokens: f.introspect == Some(IntrospectWhich::All),
        timeout,
    };
    Some(IssuerSettings {
        id: f.id,
        issuer: f.issuer,
        audiences: f.audiences.unwrap_or_default(),
        algorithms: Vec::new(),
        static_keys: Vec::new(),
        jwks: None,
        leeway: f.leeway.map_or(30, |d| d.0.as_secs()),
        max_lifetime: f.max_lifetime.map_or(30 * 86_400, |d| d.0.as_secs()),
        roles_claim: f.roles_claim.unwrap_or_else(|| "roles".into()),
        scopes_claim: f.scopes_claim.unwrap_or_else(|| "scope".into()),
        typ: Vec::new(),
        private_key: None,
        hmac_secret: None,
        introspection: Some(introspection),
    })
}
