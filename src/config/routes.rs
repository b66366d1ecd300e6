//! `[[routes]]`: each checked into a `Route` (pattern, policy, limits, headers, CORS, token sources), then the
//! table as a whole (shadowed routes, rewrites that would forward into stricter routes).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use toml::Spanned;

use crate::auth::authz::{AuthMode, ClaimRule, Policy};
use crate::edge::ratelimit::LimitKey;
use crate::router::{PathPattern, Route, RouteTable};
use crate::upstream::{Balance, HashKey, RetryPolicy, RouteCall, UpstreamSettings};

use super::file::*;
use super::validate::{origin_host, Declared};
use super::*;

impl Validator<'_> {
    pub(super) fn routes(
        &mut self,
        routes: Vec<RouteFile>,
        upstreams: &BTreeMap<String, UpstreamSettings>,
        declared: &Declared,
        case_insensitive: bool,
    ) -> (RouteTable, Vec<RouteCall>) {
        let mut out: Vec<Route> = Vec::new();
        let mut calls = Vec::new();
        let mut strip_spans = Vec::new();
        let mut names = HashSet::new();
        for r in routes {
            let name = r.name.get_ref().clone();
            if !names.insert(name.clone()) {
                self.error(r.name.span(), format!("route name {name:?} is used twice (names label metrics)"));
            }
            let pattern = match PathPattern::parse(r.path.get_ref()) {
                Ok(p) => p,
                Err(e) => {
                    self.error(r.path.span(), format!("route {name:?}: {e}"));
                    continue;
                }
            };
            // Case-insensitive matching folds ASCII only: `/CAFÉ` would miss `/café/*`'s rules at an upstream that
            // folds it (IIS, ASP.NET).
            if case_insensitive && !r.path.get_ref().is_ascii() {
                self.error(r.path.span(), format!("route {name:?}: with [routing] case_insensitive, paths must be ASCII (only ASCII letters are matched without regard to case)"));
            }
            let methods = match &r.methods {
                None => None,
                Some(m) => {
                    let mut out = Vec::new();
                    for s in m.get_ref() {
                        match http::Method::from_bytes(s.to_ascii_uppercase().as_bytes()) {
                            Ok(http::Method::CONNECT) => {
                                self.error(m.span(), format!("route {name:?}: CONNECT opens a tunnel and cannot be routed to an upstream"))
                            }
                            Ok(method) => out.push(method),
                            Err(_) => self.error(m.span(), format!("route {name:?}: invalid method {s:?}")),
                        }
                    }
                    if out.is_empty() {
                        self.error(m.span(), format!("route {name:?}: `methods` is empty; omit it to allow any method"));
                    }
                    Some(out)
                }
            };
            // Without its upstream the route is not built, but the rest of it is still checked.
            let upstream = r.upstream.get_ref().clone();
            let upstream_ok = upstreams.contains_key(&upstream);
            // Declared but refused: that upstream's own problem says why.
            if !upstream_ok && !declared.upstream(&upstream) {
                self.error(r.upstream.span(), format!("route {name:?}: upstream {upstream:?} is not defined in [upstreams]"));
            }
            let strip_prefix = match &r.strip_prefix {
                Some(p) if !p.get_ref().starts_with('/') || p.get_ref().len() < 2 => {
                    self.error(p.span(), format!("route {name:?}: strip_prefix must start with '/' and not be \"/\""));
                    None
                }
                Some(p) if case_insensitive && !p.get_ref().is_ascii() => {
                    self.error(p.span(), format!("route {name:?}: with [routing] case_insensitive, strip_prefix must be ASCII"));
                    None
                }
                // In the form the normalised paths it is cut from take (non-ASCII percent-encoded).
                Some(p) => match p.get_ref().trim_end_matches('/').split('/').map(canonical_or_empty).collect::<Result<Vec<_>, _>>() {
                    Ok(segments) => Some(segments.join("/")),
                    Err(e) => {
                        self.error(p.span(), format!("route {name:?}: strip_prefix: {e}"));
                        None
                    }
                },
                None => None,
            };
            if let Some(iss) = &r.issuers {
                for id in iss.get_ref() {
                    if !declared.issuer(id) {
                        self.error(iss.span(), format!("route {name:?}: issuer {id:?} is not defined in [[issuers]]"));
                    }
                }
            }
            let mut claims = Vec::new();
            if let Some(c) = &r.claims {
                for (claim, want) in c.get_ref() {
                    match ClaimRule::parse(claim, want, |p| pattern.has_param(p)) {
                        Ok(rule) => claims.push(rule),
                        Err(e) => self.error(c.span(), format!("route {name:?}: {e}")),
                    }
                }
            }
            let call = self.route_call(&name, &r, upstreams.get(r.upstream.get_ref()));
            let cert_policy = self.cert_policy(&name, &r);
            let policy = Policy {
                auth: r.auth,
                issuers: r.issuers.map(|i| i.into_inner()),
                roles_any: r.roles_any.unwrap_or_default(),
                roles_all: r.roles_all.unwrap_or_default(),
                scopes_any: r.scopes_any.unwrap_or_default(),
                scopes_all: r.scopes_all.unwrap_or_default(),
                claims,
                bypass_roles: r.bypass_roles.unwrap_or_default(),
            };
            if policy.auth == AuthMode::Public && policy.has_rules() {
                self.error(r.path.span(), format!("route {name:?}: auth = \"public\" cannot carry roles, scopes, claims or issuers rules"));
            }
            if r.auth != AuthMode::Public && declared.no_issuers() {
                self.error(
                    r.path.span(),
                    format!(
                        "route {name:?}: needs a token (auth = {:?}) but no [[issuers]] are configured; add one or set auth = \"public\"",
                        r.auth.as_str()
                    ),
                );
            }
            let route = Route::new(out.len(), name.clone(), pattern, methods, upstream, strip_prefix, policy, case_insensitive);
            if let Some(earlier) = out.iter().find(|e| e.shadows(&route, case_insensitive)) {
                let msg = format!("route {name:?} can never match: route {:?} before it matches every request it would", earlier.name);
                self.warn(r.path.span(), msg);
            }
            let mut route = route;
            route.rate_limit = r.rate_limit.as_ref().and_then(|l| self.limit(l, false));
            if r.auth == AuthMode::Public
                && route.rate_limit.as_ref().is_some_and(|l| matches!(l.key, LimitKey::Subject | LimitKey::Claim(_)))
            {
                let span = r.rate_limit.as_ref().map_or(r.path.span(), Spanned::span);
                self.warn(
                    span,
                    format!("route {name:?} is public: its subject or claim rate limit counts every request by client address"),
                );
            }
            if let Some(h) = &r.headers {
                let base = self.route_headers_base.clone();
                route.headers = Some(Arc::new(self.secure_headers(base.as_ref(), Some(&(h.span(), h.get_ref().clone())))));
            }
            route.client_cert = cert_policy;
            route.allow_double_encoding = r.allow_double_encoding;
            if let Some(pass) = r.pass_authorization.as_ref().filter(|p| *p.get_ref()) {
                route.pass_authorization = true;
                if r.auth != AuthMode::Public {
                    let msg =
                        format!("route {name:?}: pass_authorization is for public routes (others forward only the token they verified)");
                    self.error(pass.span(), msg);
                }
            }
            route.token_sources = crate::auth::TokenSources {
                cookie: r.token_cookie.clone().or_else(|| self.default_cookie.clone()),
                query: r.token_query.clone(),
            };
            route.cors = r.cors.as_ref().and_then(|c| self.cors(c.span(), c.get_ref())).map(Arc::new);
            if upstream_ok {
                strip_spans.push(r.strip_prefix.as_ref().map(|p| p.span()));
                out.push(route);
                calls.push(call);
            }
        }
        self.check_rewrites(&out, &strip_spans, upstreams, case_insensitive);
        (RouteTable::new(out, case_insensitive), calls)
    }

    /// The route's rules on the client certificate: `client_cert = "required"`, and `cert_subject` or
    /// `cert_san_any` (either implies it).
    fn cert_policy(&mut self, name: &str, r: &RouteFile) -> Option<crate::edge::client_cert::CertPolicy> {
        let required = match &r.client_cert {
            Some(c) if c.get_ref() == "required" => true,
            Some(c) => {
                self.error(c.span(), format!("route {name:?}: client_cert must be \"required\" (omit it otherwise)"));
                true
            }
            None => false,
        };
        let rules = r.cert_subject.is_some() || r.cert_san_any.is_some();
        if !(required || rules) {
            return None;
        }
        if !self.client_certs {
            self.error(r.path.span(), format!("route {name:?}: client certificate rules need [tls] client_ca"));
        }
        if r.cert_san_any.as_ref().is_some_and(|l| l.is_empty() || l.iter().any(|p| p.is_empty() || p == "*")) {
            self.error(r.path.span(), format!("route {name:?}: cert_san_any must list names or prefixes, and not \"*\""));
        }
        Some(crate::edge::client_cert::CertPolicy { subject: r.cert_subject.clone(), san_any: r.cert_san_any.clone().unwrap_or_default() })
    }

    /// The route's `timeout` and `retries`, and whether its upstream's hash key can be found on its requests.
    fn route_call(&mut self, name: &str, r: &RouteFile, upstream: Option<&UpstreamSettings>) -> RouteCall {
        let timeout = r.timeout.as_ref().and_then(|t| self.positive(t, &format!("route {name:?}: timeout")));
        if let Some(Balance::Hash(HashKey::Claim(claim))) = upstream.map(|u| &u.balance) {
            if r.auth == AuthMode::Public {
                let msg = format!(
                    "route {name:?} is public, but its upstream {:?} balances by claim {claim:?}: a public request has no claims",
                    r.upstream.get_ref()
                );
                self.error(r.upstream.span(), msg);
            }
        }
        let retries = r.retries.as_ref().map(|spanned| {
            let f = spanned.get_ref();
            let mut policy = RetryPolicy {
                attempts: f.attempts.as_ref().map_or(2, |a| *a.get_ref()),
                on_connect: false,
                on_reset: false,
                on_timeout: false,
                on_status: Vec::new(),
                budget_percent: 20,
            };
            if let Some(a) = f.attempts.as_ref().filter(|a| !(1..=10).contains(a.get_ref())) {
                self.error(a.span(), format!("route {name:?}: retries.attempts must be 1 to 10"));
            }
            match &f.on {
                Some(on) => {
                    for entry in on.get_ref() {
                        if let Err(e) = policy.add_on(entry) {
                            self.error(on.span(), format!("route {name:?}: {e}"));
                        }
                    }
                }
                None => {
                    policy.on_connect = true;
                    policy.on_reset = true;
                }
            }
            if let Some(b) = &f.budget_percent {
                if !(1..=100).contains(b.get_ref()) {
                    self.error(b.span(), format!("route {name:?}: retries.budget_percent must be 1 to 100"));
                }
                policy.budget_percent = (*b.get_ref()).clamp(1, 100);
            }
            policy
        });
        RouteCall { timeout, retries }
    }

    /// A route that strips a prefix forwards into the upstream's own path space: if those paths are another
    /// route's on the same upstream origin, under rules this route's requests need not meet, a client allowed
    /// here reaches them without those rules (`/api/*` stripping `/api` would serve `/api/admin/x` as
    /// `/admin/x` to any valid token, past `/admin/*`'s `roles_any`). Refused rather than warned about.
    pub(super) fn check_rewrites(
        &mut self,
        routes: &[Route],
        strip_spans: &[Option<std::ops::Range<usize>>],
        upstreams: &BTreeMap<String, UpstreamSettings>,
        case_insensitive: bool,
    ) {
        // One server under two spellings is one origin: default ports, `localhost`, the loopback and unspecified
        // addresses however written (`127.1`, `0x7f.0.0.1`, `[::ffff:127.0.0.1]`, `0.0.0.0`). Compared as
        // configured, not through DNS.
        let origins = |r: &Route| -> Vec<(http::uri::Scheme, String, u16)> {
            upstreams.get(&r.upstream).map_or_else(Vec::new, |u| {
                let default_port = if u.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 };
                u.targets
                    .iter()
                    .map(|t| (u.scheme.clone(), origin_host(t.authority.host()), t.authority.port_u16().unwrap_or(default_port)))
                    .collect()
            })
        };
        // Two upstreams are one server to this check when any of their targets is.
        let same_origin = |a: &Route, b: &Route| {
            let theirs = origins(b);
            origins(a).iter().any(|o| theirs.contains(o))
        };
        for (a, span) in routes.iter().zip(strip_spans) {
            let (Some(prefix), Some(span)) = (&a.strip_prefix, span) else { continue };
            let Some((forwarded, _)) = a.pattern.stripped(prefix, case_insensitive) else { continue };
            let exposed = routes.iter().find(|b| {
                b.index != a.index
                    && same_origin(a, b)
                    && b.forwarded_patterns().iter().any(|p| forwarded.overlaps(p, case_insensitive))
                    && !a.policy.admits_no_more_than(&b.policy)
            });
            if let Some(b) = exposed {
                let msg = format!(
                    "route {an:?} strips {prefix:?}, so it forwards \"{forwarded}\" into the paths of route {bn:?} (\"{bp}\") on the same \
                     upstream without {bn:?}'s rules: a request allowed on {an:?} would reach them unchecked; give {an:?} its own \
                     upstream, a narrower path, or rules at least as strict",
                    an = a.name,
                    bn = b.name,
                    bp = b.pattern
                );
                self.error(span.clone(), msg);
            }
        }
    }
}

fn canonical_or_empty(segment: &str) -> Result<String, String> {
    if segment.is_empty() {
        Ok(String::new())
    } else {
        crate::router::canonical_segment(segment)
    }
}
