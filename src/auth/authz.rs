//! Route policy: issuers, roles, scopes and claim rules, evaluated against a verified principal.
//!
//! Every condition on a route must hold. Authorization runs on every request, also when the token's signature
//! check was skipped by the verified-token cache, so a token accepted on one route unlocks nothing on another.

use crate::auth::{lookup_claim, Principal};
use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthzError {
    #[error("token issuer {0:?} is not accepted on this route")]
    Issuer(String),
    #[error("missing a required role")]
    Roles,
    #[error("missing a required scope")]
    Scopes { needed: String },
    #[error("claim {0:?} does not satisfy the route's rule")]
    Claims(String),
    #[error("the route's rules need a token and none was sent")]
    Anonymous,
}

impl AuthzError {
    /// Names the rule that denied, for metrics (`roles`, `scopes`, `claims`, `issuer`).
    pub fn rule(&self) -> &'static str {
        match self {
            AuthzError::Issuer(_) => "issuer",
            AuthzError::Roles => "roles",
            AuthzError::Scopes { .. } => "scopes",
            AuthzError::Claims(_) => "claims",
            AuthzError::Anonymous => "anonymous",
        }
    }
}

/// Whether a route needs a token. `required` is the default, so a forgotten line fails closed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Public,
    Optional,
    #[default]
    Required,
}

impl AuthMode {
    /// The mode as the config spells it (`auth = "public"`), for what the gateway prints.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::Public => "public",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        }
    }
}

/// What a claim must equal: a literal, or a path parameter of the matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimValue {
    Literal(String),
    Param(String),
}

/// `claims = { sub = "{id}" }`: the claim (top-level name, else dotted path) must equal the value exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRule {
    pub claim: String,
    pub value: ClaimValue,
}

impl ClaimRule {
    /// Checks a rule against the route's path: a `{param}` value must name one of its parameters.
    pub fn parse(claim: &str, want: &str, has_param: impl Fn(&str) -> bool) -> Result<ClaimRule, String> {
        if claim.is_empty() {
            return Err("a claims rule needs a claim name".into());
        }
        let value = match want.strip_prefix('{').and_then(|w| w.strip_suffix('}')) {
            Some(param) if has_param(param) => ClaimValue::Param(param.to_string()),
            Some(param) => return Err(format!("claims rule {claim:?} names {{{param}}}, which is not a parameter of the route's path")),
            None => ClaimValue::Literal(want.to_string()),
        };
        Ok(ClaimRule { claim: claim.to_string(), value })
    }
}

/// A route's access rule, checked once at config load.
#[derive(Debug, Clone)]
pub struct Policy {
    pub auth: AuthMode,
    pub issuers: Option<Vec<String>>,
    pub roles_any: Vec<String>,
    pub roles_all: Vec<String>,
    pub scopes_any: Vec<String>,
    pub scopes_all: Vec<String>,
    pub claims: Vec<ClaimRule>,
    pub bypass_roles: Vec<String>,
}

impl Policy {
    /// Returns a policy that lets anyone through without a token.
    pub fn public() -> Policy {
        Policy {
            auth: AuthMode::Public,
            issuers: None,
            roles_any: Vec::new(),
            roles_all: Vec::new(),
            scopes_any: Vec::new(),
            scopes_all: Vec::new(),
            claims: Vec::new(),
            bypass_roles: Vec::new(),
        }
    }

    /// True if every request this policy admits, `other` admits too (false when that cannot be shown from the
    /// rules alone): forwarding this policy's requests into `other`'s paths then grants nothing `other` refuses.
    pub fn admits_no_more_than(&self, other: &Policy) -> bool {
        if other.auth == AuthMode::Public {
            return true;
        }
        // `optional` without rules admits anyone, but refuses a token it cannot verify, which `public` passes on.
        if other.auth == AuthMode::Optional && !other.has_rules() {
            return self.auth != AuthMode::Public;
        }
        if self.auth == AuthMode::Public || self.auth == AuthMode::Optional && !self.has_rules() {
            return false;
        }
        // Names every admitted token is sure to carry: all of `*_all`, and the one of a single-name `*_any`.
        let sure =
            |all: &[String], any: &[String]| -> Vec<String> { all.iter().chain(if any.len() == 1 { any } else { &[] }).cloned().collect() };
        let covers = |all: &[String], any: &[String], other_all: &[String], other_any: &[String]| {
            let sure = sure(all, any);
            other_all.iter().all(|n| sure.contains(n))
                && (other_any.is_empty()
                    || sure.iter().any(|n| other_any.contains(n))
                    || !any.is_empty() && any.iter().all(|n| other_any.contains(n)))
        };
        let issuers = match (&self.issuers, &other.issuers) {
            (_, None) => true,
            (Some(mine), Some(theirs)) => mine.iter().all(|i| theirs.contains(i)),
            (None, Some(_)) => false,
        };
        // Claim rules depend on each route's own path parameters: only a bypass role every token carries
        // settles them.
        let claims = other.claims.is_empty() || sure(&self.roles_all, &self.roles_any).iter().any(|r| other.bypass_roles.contains(r));
        issuers
            && covers(&self.roles_all, &self.roles_any, &other.roles_all, &other.roles_any)
            && covers(&self.scopes_all, &self.scopes_any, &other.scopes_all, &other.scopes_any)
            && claims
    }

    /// Returns true if the policy has any rule beyond "a valid token".
    pub fn has_rules(&self) -> bool {
        self.issuers.is_some()
            || !self.roles_any.is_empty()
            || !self.roles_all.is_empty()
            || !self.scopes_any.is_empty()
            || !self.scopes_all.is_empty()
            || !self.claims.is_empty()
    }
}

/// Decides whether `principal` may use the matched route, whose path parameters `param` looks up. Anonymous
/// principals (no token on an `optional` route) pass only a policy without rules.
pub fn authorize<'m>(principal: Option<&Principal>, policy: &Policy, param: impl Fn(&str) -> Option<&'m str>) -> Result<(), AuthzError> {
    let Some(p) = principal else {
        if policy.auth == AuthMode::Required {
            // authenticate() already refuses this; kept so authorize() alone is never the weak link.
            return Err(AuthzError::Roles);
        }
        // No credential was sent: that calls for a challenge (401), not a 403 (RFC 6750 §3.1).
        return if policy.has_rules() { Err(AuthzError::Anonymous) } else { Ok(()) };
    };
    if let Some(allowed) = &policy.issuers {
        if !allowed.contains(&p.issuer_id) {
            return Err(AuthzError::Issuer(p.issuer_id.clone()));
        }
    }
    let has_role = |r: &String| p.roles.iter().any(|x| x == r);
    let has_scope = |s: &String| p.scopes.iter().any(|x| x == s);
    if !policy.roles_any.is_empty() && !policy.roles_any.iter().any(has_role) {
        return Err(AuthzError::Roles);
    }
    if !policy.roles_all.iter().all(has_role) {
        return Err(AuthzError::Roles);
    }
    if (!policy.scopes_any.is_empty() && !policy.scopes_any.iter().any(has_scope)) || !policy.scopes_all.iter().all(has_scope) {
        return Err(AuthzError::Scopes { needed: needed_scopes(policy) });
    }
    if policy.bypass_roles.iter().any(has_role) {
        return Ok(());
    }
    for rule in &policy.claims {
        let want = match &rule.value {
            ClaimValue::Literal(v) => Some(v.as_str()),
            ClaimValue::Param(name) => param(name),
        };
        let have = lookup_claim(&p.claims, &rule.claim).and_then(|v| v.as_str());
        match (have, want) {
            (Some(h), Some(w)) if h == w => {}
            _ => return Err(AuthzError::Claims(rule.claim.clone())),
        }
    }
    Ok(())
}

fn needed_scopes(policy: &Policy) -> String {
    let mut s: Vec<&str> = policy.scopes_all.iter().map(String::as_str).collect();
    if s.is_empty() {
        s = policy.scopes_any.iter().map(String::as_str).collect();
    }
    s.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::{PathPattern, Route, RouteTable};
    use http::Method;
    use std::sync::Arc;

    fn principal(roles: &[&str], scopes: &[&str], claims: serde_json::Value) -> Principal {
        Principal {
            issuer_id: "local".into(),
            subject: claims["sub"].as_str().unwrap_or("").to_string(),
            roles: roles.iter().map(|s| s.to_string()).collect(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            claims: Arc::new(claims.as_object().cloned().unwrap_or_default()),
            expires_at: u64::MAX,
            identity_values: Default::default(),
            key_generation: None,
        }
    }

    fn route(path: &str, f: impl FnOnce(&mut Policy)) -> RouteTable {
        let pattern = PathPattern::parse(path).unwrap();
        let mut policy = Policy::public();
        policy.auth = AuthMode::Required;
        f(&mut policy);
        RouteTable::new(vec![Route::new(0, "r".into(), pattern, None, "u".into(), None, policy, false)], false)
    }

    #[test]
    fn roles_scopes_and_claims() {
        let t = route("/users/{id}", |p| {
            p.claims = vec![ClaimRule::parse("sub", "{id}", |p| PathPattern::parse("/users/{id}").unwrap().has_param(p)).unwrap()];
            p.bypass_roles = vec!["admin".into()];
            p.scopes_all = vec!["read".into()];
        });
        let m = t.match_route(&Method::GET, "/users/alice").unwrap();
        let pol = &m.route.policy;
        let alice = principal(&[], &["read"], serde_json::json!({"sub": "alice"}));
        let bob = principal(&[], &["read"], serde_json::json!({"sub": "bob"}));
        let admin = principal(&["admin"], &["read"], serde_json::json!({"sub": "root"}));
        let noscope = principal(&[], &[], serde_json::json!({"sub": "alice"}));
        assert_eq!(authorize(Some(&alice), pol, |n| m.param(n)), Ok(()));
        assert_eq!(authorize(Some(&bob), pol, |n| m.param(n)), Err(AuthzError::Claims("sub".into())));
        assert_eq!(authorize(Some(&admin), pol, |n| m.param(n)), Ok(()));
        assert_eq!(authorize(Some(&noscope), pol, |n| m.param(n)), Err(AuthzError::Scopes { needed: "read".into() }));
    }

    #[test]
    fn issuer_and_roles() {
        let t = route("/admin/*", |p| {
            p.issuers = Some(vec!["kc".into()]);
            p.roles_any = vec!["admin".into()];
        });
        let m = t.match_route(&Method::GET, "/admin/x").unwrap();
        let admin = principal(&["admin"], &[], serde_json::json!({"sub": "a"}));
        assert_eq!(authorize(Some(&admin), &m.route.policy, |n| m.param(n)), Err(AuthzError::Issuer("local".into())));
        let mut kc_user = principal(&["user"], &[], serde_json::json!({"sub": "a"}));
        kc_user.issuer_id = "kc".into();
        assert_eq!(authorize(Some(&kc_user), &m.route.policy, |n| m.param(n)), Err(AuthzError::Roles));
        assert_eq!(authorize(None, &m.route.policy, |n| m.param(n)), Err(AuthzError::Roles));
    }
}
