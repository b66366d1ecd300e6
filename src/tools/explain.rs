//! Policy you can test before shipping: `portcullis explain` (why a request would be forwarded or refused) and
//! policy test files for `portcullis check --tests`.
//!
//! The decision uses the same functions as the request path (normalize_path, match_route, authorize, and the
//! one error-to-response mapping), so what explain says is what a real request gets.

use std::path::Path;
use std::sync::Arc;

use http::Method;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::authz::AuthMode;
use crate::auth::authz::{authorize, ClaimValue};
use crate::auth::{lookup_claim, principal_from, Authenticator, Principal};
use crate::config::Config;
use crate::error::GatewayError;
use crate::router::normalize_path;

/// What a request carries for the explanation.
pub enum Credentials {
    None,
    /// Claims taken as verified (a policy question, not a token question).
    Claims(Map<String, Value>),
    /// A token, verified with the issuers' keys.
    Token(String),
}

/// The outcome of a request, as a client would see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub status: u16,
    pub www_authenticate: Option<String>,
    pub route: Option<String>,
    pub upstream: Option<String>,
    /// The reasoning, one step a line.
    pub lines: Vec<String>,
}

fn refuse(e: GatewayError, route: Option<String>, mut lines: Vec<String>) -> Decision {
    let rsp = e.to_response(false);
    let www = rsp.headers().get(http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_string);
    lines.push(format!(
        "decision: {} {}",
        rsp.status().as_u16(),
        www.as_deref().map(|w| format!("(WWW-Authenticate: {w})")).unwrap_or_default()
    ));
    Decision { status: rsp.status().as_u16(), www_authenticate: www, route, upstream: None, lines }
}

/// Explains how the gateway would answer `method path` with the given credentials.
pub async fn explain(config: &Config, method: &Method, raw_path: &str, creds: Credentials) -> Decision {
    let mut lines = Vec::new();
    let path = match normalize_path(raw_path.split('?').next().unwrap_or(raw_path)) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            lines.push(format!("path {raw_path:?} is refused: {e}"));
            return refuse(GatewayError::Route(e), None, lines);
        }
    };
    lines.push(format!("normalised path: {path}"));
    if let Some(te) = config.token_endpoint.as_ref().filter(|t| t.path == path) {
        lines.push(format!("{} is the token endpoint (issuer {:?}); it is served by the gateway, not routed", te.path, te.issuer));
    }
    for (route, path_ok, method_ok) in config.routes.trace(method, &path) {
        let why = match (path_ok, method_ok) {
            (false, _) => format!("path pattern {} does not match", route.pattern),
            (true, false) => format!("path matches but {method} is not in its methods"),
            (true, true) => "matches".to_string(),
        };
        lines.push(format!("route {:?}: {why}", route.name));
    }
    let matched = match config.routes.match_route(method, &path) {
        Ok(m) => m,
        Err(e) => {
            let e = GatewayError::Route(e);
            return refuse(e, None, lines);
        }
    };
    let route = matched.route;
    let name = Some(route.name.clone());
    lines.push(format!("auth = {:?}", route.policy.auth.as_str()));
    let principal: Option<Principal> = match (&creds, route.policy.auth) {
        (_, AuthMode::Public) => None,
        (Credentials::None, AuthMode::Optional) => {
            lines.push("no token: anonymous".into());
            None
        }
        (Credentials::None, AuthMode::Required) => return refuse(GatewayError::Auth(crate::auth::AuthError::Missing), name, lines),
        (Credentials::Claims(c), _) => match principal_from_claims(config, c) {
            Ok(p) => Some(p),
            Err(e) => return refuse(e, name, lines),
        },
        (Credentials::Token(t), _) => match verify_token(config, t).await {
            Ok(p) => {
                lines.push("token verified".into());
                Some(p)
            }
            Err(e) => {
                lines.push(format!("token refused: {e}"));
                return refuse(e, name, lines);
            }
        },
    };
    if let Some(p) = &principal {
        lines.push(format!("principal: sub={:?} issuer={:?} roles={:?} scopes={:?}", p.subject, p.issuer_id, p.roles, p.scopes));
        explain_rules(&mut lines, p, &matched);
    }
    if let Err(e) = authorize(principal.as_ref(), &route.policy, |n| matched.param(n)) {
        return refuse(GatewayError::Authz(e), name, lines);
    }
    let upstream_path = route.upstream_path(&path).to_string();
    lines.push(format!("decision: forward to upstream {:?} as {upstream_path}", route.upstream));
    Decision { status: 200, www_authenticate: None, route: name, upstream: Some(route.upstream.clone()), lines }
}

fn explain_rules(lines: &mut Vec<String>, p: &Principal, m: &crate::router::RouteMatch<'_>) {
    let pol = &m.route.policy;
    let mark = |ok: bool| if ok { "pass" } else { "FAIL" };
    if let Some(iss) = &pol.issuers {
        lines.push(format!("  issuers {iss:?}: {}", mark(iss.contains(&p.issuer_id))));
    }
    let has = |list: &[String], x: &String| list.iter().any(|y| y == x);
    if !pol.roles_any.is_empty() {
        lines.push(format!("  roles_any {:?}: {}", pol.roles_any, mark(pol.roles_any.iter().any(|r| has(&p.roles, r)))));
    }
    if !pol.roles_all.is_empty() {
        lines.push(format!("  roles_all {:?}: {}", pol.roles_all, mark(pol.roles_all.iter().all(|r| has(&p.roles, r)))));
    }
    if !pol.scopes_any.is_empty() {
        lines.push(format!("  scopes_any {:?}: {}", pol.scopes_any, mark(pol.scopes_any.iter().any(|s| has(&p.scopes, s)))));
    }
    if !pol.scopes_all.is_empty() {
        lines.push(format!("  scopes_all {:?}: {}", pol.scopes_all, mark(pol.scopes_all.iter().all(|s| has(&p.scopes, s)))));
    }
    let bypass = pol.bypass_roles.iter().any(|r| has(&p.roles, r));
    for rule in &pol.claims {
        let want = match &rule.value {
            ClaimValue::Literal(v) => Some(v.as_str()),
            ClaimValue::Param(n) => m.param(n),
        };
        let have = lookup_claim(&p.claims, &rule.claim).and_then(|v| v.as_str());
        let ok = have.is_some() && have == want;
        let note = if bypass && !ok { " (bypassed by role)" } else { "" };
        lines.push(format!("  claim {} = {:?} (token has {:?}): {}{note}", rule.claim, want, have, mark(ok)));
    }
}

fn principal_from_claims(config: &Config, claims: &Map<String, Value>) -> Result<Principal, GatewayError> {
    let invalid = |d: &str| {
        GatewayError::Auth(crate::auth::AuthError::InvalidToken { reason: crate::auth::FailReason::Issuer, detail: d.to_string() })
    };
    let issuer = match claims.get("iss").and_then(Value::as_str) {
        Some(iss) => config.issuers.iter().find(|i| i.issuer == iss).ok_or_else(|| invalid("unknown issuer"))?,
        None => config.issuers.first().ok_or_else(|| invalid("no issuers configured"))?,
    };
    let mut claims = claims.clone();
    claims.entry("iss").or_insert_with(|| issuer.issuer.clone().into());
    Ok(principal_from(issuer, claims))
}

async fn verify_token(config: &Config, token: &str) -> Result<Principal, GatewayError> {
    let client = crate::auth::jwks::fetch_client(None).map_err(|_| GatewayError::Auth(crate::auth::AuthError::Missing))?;
    let authn = Authenticator::new(&config.issuers, &client, None);
    for i in authn.issuers() {
        if let Some(ks) = &i.jwks {
            let _ = ks.refresh().await;
        }
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    authn.verify(token, now).await.map_err(GatewayError::Auth)
}

// ---------------------------------------------------------------------------------------------------------------
// Policy test files.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestsFile {
    #[serde(default)]
    case: Vec<Case>,
}

/// One policy test case.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default = "get")]
    pub method: String,
    pub path: String,
    pub claims: Option<Map<String, Value>>,
    pub token: Option<String>,
    pub expect: u16,
}

fn get() -> String {
    "GET".into()
}

/// Reads a policy tests file.
pub fn load_cases(path: &Path) -> Result<Vec<Case>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: TestsFile = toml::from_str(&text).map_err(|e| {
        let (l, c) = e.span().map(|s| crate::config::line_col(&text, s.start)).unwrap_or((1, 1));
        format!("{}:{l}:{c}: {}", path.display(), e.message().trim())
    })?;
    Ok(f.case)
}

/// Converts a case into what `explain` takes.
pub fn case_request(case: &Case) -> Result<(Method, Credentials), String> {
    let method =
        Method::from_bytes(case.method.to_ascii_uppercase().as_bytes()).map_err(|_| format!("case {:?}: bad method", case.name))?;
    let creds = match (&case.claims, &case.token) {
        (Some(_), Some(_)) => return Err(format!("case {:?}: give claims or token, not both", case.name)),
        (Some(c), None) => Credentials::Claims(c.clone()),
        (None, Some(t)) => Credentials::Token(t.clone()),
        (None, None) => Credentials::None,
    };
    Ok((method, creds))
}

/// Runs every case against the config; returns one line per case and whether all passed.
pub async fn run_cases(config: &Arc<Config>, cases: &[Case]) -> (Vec<String>, bool) {
    let mut out = Vec::new();
    let mut all = true;
    for case in cases {
        match case_request(case) {
            Err(e) => {
                all = false;
                out.push(format!("FAIL {e}"));
            }
            Ok((method, creds)) => {
                let d = explain(config, &method, &case.path, creds).await;
                if d.status == case.expect {
                    out.push(format!("pass {} ({} {} -> {})", case.name, case.method, case.path, d.status));
                } else {
                    all = false;
                    out.push(format!(
                        "FAIL {} ({} {}): expected {}, got {}\n{}",
                        case.name,
                        case.method,
                        case.path,
                        case.expect,
                        d.status,
                        d.lines.join("\n")
                    ));
                }
            }
        }
    }
    (out, all)
}
