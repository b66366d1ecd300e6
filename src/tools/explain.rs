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
    /// Claims taken as verified (a policy question, not a token question). `issuer` is the id of the issuer they
    /// are from, for claims without `iss`; without either, they are decided under each issuer the route accepts.
    Claims {
        claims: Map<String, Value>,
        issuer: Option<String>,
    },
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
    /// The issuer (id) claims without `iss` were decided under.
    pub issuer: Option<String>,
}

fn refuse(e: GatewayError, route: Option<String>, mut lines: Vec<String>) -> Decision {
    let rsp = e.to_response(false);
    let www = rsp.headers().get(http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_string);
    lines.push(format!(
        "decision: {} {}",
        rsp.status().as_u16(),
        www.as_deref().map(|w| format!("(WWW-Authenticate: {w})")).unwrap_or_default()
    ));
    Decision { status: rsp.status().as_u16(), www_authenticate: www, route, upstream: None, lines, issuer: None }
}

/// The lines of one or more decisions. Several (claims without `iss`, decided under each issuer the route accepts)
/// share their first steps, printed once; each step after that names the issuer it was decided under.
pub fn render(decisions: &[Decision]) -> Vec<String> {
    let [first, rest @ ..] = decisions else { return Vec::new() };
    if rest.is_empty() {
        return first.lines.clone();
    }
    let shared = rest.iter().map(|d| first.lines.iter().zip(&d.lines).take_while(|(a, b)| a == b).count()).min().unwrap_or(0);
    let mut out = first.lines[..shared].to_vec();
    for d in decisions {
        let who = d.issuer.as_deref().map_or_else(|| "-".to_string(), |i| format!("{i:?}"));
        out.extend(d.lines[shared..].iter().map(|l| format!("[issuer {who}] {l}")));
    }
    out
}

/// Explains how the gateway would answer `method path` with the given credentials: one decision, or, for claims
/// without `iss` and no issuer named, one per issuer the matched route accepts (never a guess at one of them).
/// An error is a question that cannot be answered as asked (an issuer that does not exist, or that `iss` contradicts).
pub async fn explain(config: &Config, method: &Method, raw_path: &str, creds: Credentials) -> Result<Vec<Decision>, String> {
    if let Credentials::Claims { claims, issuer: Some(id) } = &creds {
        let Some(named) = config.issuers.iter().find(|i| i.id == *id) else {
            let ids: Vec<&str> = config.issuers.iter().map(|i| i.id.as_str()).collect();
            return Err(format!("no issuer {id:?} in the config (issuers: {ids:?})"));
        };
        if let Some(iss) = claims.get("iss").and_then(Value::as_str).filter(|iss| *iss != named.issuer) {
            return Err(format!("the claims' iss {iss:?} is not issuer {id:?}'s ({:?})", named.issuer));
        }
    }
    let mut lines = Vec::new();
    let path = match normalize_path(raw_path.split('?').next().unwrap_or(raw_path)) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            lines.push(format!("path {raw_path:?} is refused: {e}"));
            return Ok(vec![refuse(GatewayError::Route(e), None, lines)]);
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
            return Ok(vec![refuse(e, None, lines)]);
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
        (Credentials::None, AuthMode::Required) => {
            return Ok(vec![refuse(GatewayError::Auth(crate::auth::AuthError::Missing), name, lines)]);
        }
        (Credentials::Claims { claims, issuer }, _) => {
            let under = match claims_issuers(config, route, claims, issuer.as_deref(), &mut lines) {
                Ok(under) => under,
                Err(e) => return Ok(vec![refuse(e, name, lines)]),
            };
            let mut decisions = Vec::new();
            for issuer in under {
                let mut claims = claims.clone();
                claims.entry("iss").or_insert_with(|| issuer.issuer.clone().into());
                let p = principal_from(issuer, claims);
                let mut d = decide(config, lines.clone(), Some(p), &matched, &path);
                d.issuer = Some(issuer.id.clone());
                decisions.push(d);
            }
            return Ok(decisions);
        }
        (Credentials::Token(t), _) => match verify_token(config, t).await {
            Ok(p) => {
                lines.push("token verified".into());
                Some(p)
            }
            Err(e) => {
                lines.push(format!("token refused: {e}"));
                return Ok(vec![refuse(e, name, lines)]);
            }
        },
    };
    Ok(vec![decide(config, lines, principal, &matched, &path)])
}

/// The rules and the decision for one principal (or none) on the matched route.
fn decide(
    config: &Config,
    mut lines: Vec<String>,
    principal: Option<Principal>,
    matched: &crate::router::RouteMatch<'_>,
    path: &str,
) -> Decision {
    let route = matched.route;
    let name = Some(route.name.clone());
    if let Some(p) = &principal {
        lines.push(format!("principal: sub={:?} issuer={:?} roles={:?} scopes={:?}", p.subject, p.issuer_id, p.roles, p.scopes));
        explain_rules(&mut lines, p, matched);
    }
    if let Err(e) = authorize(principal.as_ref(), &route.policy, |n| matched.param(n)) {
        return refuse(GatewayError::Authz(e), name, lines);
    }
    let upstream_path = route.upstream_path(path).to_string();
    if let Some(u) = config.upstreams.get(&route.upstream) {
        lines.push(upstream_line(u, config.route_calls.get(route.index), principal.as_ref()));
    }
    lines.push(format!("decision: forward to upstream {:?} as {upstream_path}", route.upstream));
    Decision { status: 200, www_authenticate: None, route: name, upstream: Some(route.upstream.clone()), lines, issuer: None }
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

/// The issuers claims are decided under: the one their `iss` names, else the one asked for, else every issuer the
/// route accepts (saying so when that is one). A token carries its issuer; claims without `iss` do not, and picking
/// one of several would decide a question nobody asked.
fn claims_issuers<'c>(
    config: &'c Config,
    route: &crate::router::Route,
    claims: &Map<String, Value>,
    asked: Option<&str>,
    lines: &mut Vec<String>,
) -> Result<Vec<&'c crate::auth::IssuerSettings>, GatewayError> {
    let invalid = |d: &str| {
        GatewayError::Auth(crate::auth::AuthError::InvalidToken { reason: crate::auth::FailReason::Issuer, detail: d.to_string() })
    };
    if let Some(iss) = claims.get("iss").and_then(Value::as_str) {
        return config.issuers.iter().find(|i| i.issuer == iss).map(|i| vec![i]).ok_or_else(|| invalid("unknown issuer"));
    }
    if let Some(id) = asked {
        lines.push(format!("claims have no iss: decided as issuer {id:?}'s, as asked"));
        return Ok(config.issuers.iter().filter(|i| i.id == id).collect());
    }
    let accepted: Vec<_> = config.issuers.iter().filter(|i| route.policy.issuers.as_ref().is_none_or(|ids| ids.contains(&i.id))).collect();
    match accepted.as_slice() {
        [] => Err(invalid("no issuers configured")),
        [one] => {
            lines.push(format!(
                "claims have no iss: decided as issuer {:?}'s ({}), the one issuer route {:?} accepts",
                one.id, one.issuer, route.name
            ));
            Ok(accepted)
        }
        several => {
            let ids: Vec<&str> = several.iter().map(|i| i.id.as_str()).collect();
            lines.push(format!(
                "claims have no iss: route {:?} accepts {} issuers {ids:?}; decided under each (name one to decide under it alone)",
                route.name,
                several.len()
            ));
            Ok(accepted)
        }
    }
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
    /// The issuer (id) claims without `iss` are from; required when the route accepts several.
    pub issuer: Option<String>,
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
    if case.issuer.is_some() && case.claims.is_none() {
        return Err(format!("case {:?}: `issuer` says where claims are from: give it with `claims`", case.name));
    }
    let creds = match (&case.claims, &case.token) {
        (Some(_), Some(_)) => return Err(format!("case {:?}: give claims or token, not both", case.name)),
        (Some(c), None) => Credentials::Claims { claims: c.clone(), issuer: case.issuer.clone() },
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
                let decisions = match explain(config, &method, &case.path, creds).await {
                    Ok(d) => d,
                    Err(e) => {
                        all = false;
                        out.push(format!("FAIL {}: {e}", case.name));
                        continue;
                    }
                };
                // Decided under several issuers: the case does not say which one it tests, and passing under one
                // while failing under another would test nothing in particular.
                let [d] = decisions.as_slice() else {
                    all = false;
                    let ids: Vec<&str> = decisions.iter().filter_map(|d| d.issuer.as_deref()).collect();
                    out.push(format!(
                        "FAIL {} ({} {}): its claims have no iss and the route accepts issuers {ids:?}: name one with `issuer = \"…\"` \
                         (or set iss)",
                        case.name, case.method, case.path
                    ));
                    continue;
                };
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

/// Which targets the request would go to, by which rule, with what timeout and retries.
fn upstream_line(u: &crate::upstream::UpstreamSettings, call: Option<&crate::upstream::RouteCall>, p: Option<&Principal>) -> String {
    use crate::upstream::{Balance, HashKey};
    let targets: Vec<String> = u.targets.iter().map(|t| format!("{}://{} (weight {})", u.scheme, t.authority, t.weight)).collect();
    let key = match &u.balance {
        Balance::Hash(HashKey::Claim(c)) => match p.and_then(|p| crate::auth::lookup_claim(&p.claims, c)) {
            Some(v) => format!(", key {c}={v}"),
            None => format!(", claim {c:?} absent: round robin for this request"),
        },
        _ => String::new(),
    };
    let timeout = call.and_then(|c| c.timeout).unwrap_or(u.timeout);
    let retries = match call.and_then(|c| c.retries.as_ref()) {
        Some(r) => format!(", up to {} retries within {}% of requests", r.attempts, r.budget_percent),
        None => ", no retries".to_string(),
    };
    format!(
        "upstream {:?}: {} over [{}]{key}, protocol {}, timeout {}{retries}",
        u.name,
        u.balance,
        targets.join(", "),
        u.protocol.as_str(),
        crate::config::format_duration(timeout)
    )
}
