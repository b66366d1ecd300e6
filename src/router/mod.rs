//! Path normalisation and route matching (exact, `{param}`, `/*` prefix); first match in file order wins.
//!
//! Threat model: a client crafts a path that the gateway routes one way and the upstream reads another
//! (`//admin`, `/./admin`, `/x/../admin`, `/%61dmin`, `/admin%2fx`, `\admin`, `/public/..;/admin`). The defence is to decide on one
//! canonical form and forward exactly that form: dot-segments are removed and slashes merged after unreserved
//! characters and the delimiters a segment may carry raw (`:@!$&'()*+,=`) are decoded, non-ASCII is encoded,
//! route literals are kept in that same form (so `/v1/items%3Apurge` is `/v1/items:purge`, and `/café` is
//! `/caf%C3%A9`), and anything whose meaning differs between servers (an encoded `/` or `\`, a `;` path
//! parameter, NUL, other control bytes) is refused with 400 rather than guessed at. The upstream never sees a path the policy did not.

mod path;

use http::{HeaderValue, Method};

use crate::auth::authz::Policy;

pub(crate) use path::canonical_segment;
pub use path::{decodes_again, normalize_path, request_host};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("request target is not an absolute path")]
    NotAbsolutePath,
    #[error("path has a malformed percent-escape")]
    BadEscape,
    #[error("path contains an encoded slash, a backslash, a ';' or a control character")]
    ForbiddenByte,
    #[error("a path parameter is not valid UTF-8 once decoded")]
    NotUtf8,
    /// What a second decoding would turn into a dot, slash, backslash or `;` escape, or a dot segment carrying an
    /// encoded `;`: an upstream or proxy that decodes again would route it elsewhere.
    #[error("path has an escape that a second decoding would turn into a path delimiter")]
    DoubleEncoded,
    #[error("no route matches")]
    NotFound,
    #[error("route matches but the method is not allowed")]
    MethodNotAllowed { allow: HeaderValue },
    #[error("bad Host: {0}")]
    BadHost(&'static str),
    #[error("the request's scheme is neither http nor https")]
    BadScheme,
    /// CONNECT, or TRACE on a route that does not list it.
    #[error("method {0} is not proxied")]
    NotImplemented(Method),
    /// Methods are case-sensitive (RFC 9110 §9.1), but frameworks that upper-case them would run `delete` as the
    /// DELETE a route refused: refused rather than routed as another method.
    #[error("method {0:?} has lowercase letters")]
    LowercaseMethod(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

/// A compiled route path: `/exact/path`, `/users/{id}` (one segment each), `/prefix/*` (the rest).
#[derive(Debug, Clone)]
pub struct PathPattern {
    segments: Vec<Segment>,
    prefix: bool,
    trailing_slash: bool,
}

impl PathPattern {
    /// Compiles a route's `path`.
    pub fn parse(s: &str) -> Result<PathPattern, String> {
        if !s.starts_with('/') {
            return Err(format!("path {s:?} must start with '/'"));
        }
        let (body, prefix) = match s.strip_suffix("/*") {
            Some(b) => (b, true),
            None => (s, false),
        };
        let trailing_slash = !prefix && body.len() > 1 && body.ends_with('/');
        let mut segments = Vec::new();
        let mut seen = Vec::new();
        for seg in body.split('/').filter(|x| !x.is_empty()) {
            if seg == "." || seg == ".." || seg.contains('*') || seg.contains('%') || seg.contains('\\') {
                return Err(format!("path {s:?}: segment {seg:?} is not allowed ('*' only as a final \"/*\")"));
            }
            if let Some(name) = seg.strip_prefix('{').and_then(|x| x.strip_suffix('}')) {
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("path {s:?}: parameter {seg:?} needs a name of letters, digits or '_'"));
                }
                if seen.contains(&name) {
                    return Err(format!("path {s:?}: parameter {{{name}}} appears twice"));
                }
                seen.push(name);
                segments.push(Segment::Param(name.to_string()));
            } else if seg.contains('{') || seg.contains('}') {
                return Err(format!("path {s:?}: a parameter must be a whole segment, like \"/users/{{id}}\""));
            } else {
                segments.push(Segment::Literal(canonical_segment(seg).map_err(|e| format!("path {s:?}: {e}"))?));
            }
        }
        if body.contains("//") {
            return Err(format!("path {s:?} has an empty segment"));
        }
        Ok(PathPattern { segments, prefix, trailing_slash })
    }

    /// Returns true if the pattern has a `{name}` parameter.
    pub fn has_param(&self, name: &str) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Param(p) if p == name))
    }

    fn matches<'p>(&self, path: &'p str, case_insensitive: bool, params: &mut Vec<(usize, &'p str)>) -> bool {
        params.clear();
        let rest = &path[1..];
        let trimmed = rest.strip_suffix('/').unwrap_or(rest);
        let mut parts = trimmed.split('/').filter(|p| !p.is_empty());
        for (i, seg) in self.segments.iter().enumerate() {
            let Some(part) = parts.next() else {
                return false;
            };
            match seg {
                Segment::Literal(l) => {
                    let eq = if case_insensitive { l.eq_ignore_ascii_case(part) } else { l == part };
                    if !eq {
                        return false;
                    }
                }
                Segment::Param(_) => params.push((i, part)),
            }
        }
        if self.prefix {
            return true;
        }
        if parts.next().is_some() {
            return false;
        }
        // "/users/me/" is "/users/me" (and the other way round): most frameworks serve both, or redirect one to
        // the other, so both must meet the same route's rules rather than fall through to a later route's.
        true
    }

    /// True if every path this pattern's `other` matches is also matched by `self` (literals compared the way
    /// the table matches them).
    fn covers(&self, other: &PathPattern, case_insensitive: bool) -> bool {
        if !self.prefix && (other.prefix || self.segments.len() != other.segments.len()) {
            return false;
        }
        if self.segments.len() > other.segments.len() {
            return false;
        }
        self.segments.iter().zip(&other.segments).all(|(a, b)| match (a, b) {
            (Segment::Param(_), _) => true,
            (Segment::Literal(x), Segment::Literal(y)) => x == y || (case_insensitive && x.eq_ignore_ascii_case(y)),
            (Segment::Literal(_), Segment::Param(_)) => false,
        })
    }
}

impl PathPattern {
    /// The pattern of the paths a route forwards once `prefix` is stripped from those it applies to (None if
    /// it applies to none of this pattern's paths), and whether it applies to all of them (a `{param}` or a
    /// short `/*` may let others through, which go upstream as they were routed).
    pub(crate) fn stripped(&self, prefix: &str, case_insensitive: bool) -> Option<(PathPattern, bool)> {
        if prefix.contains("//") {
            return None;
        }
        let (mut k, mut always) = (0, true);
        for part in prefix.split('/').filter(|p| !p.is_empty()) {
            match self.segments.get(k) {
                // A prefix pattern that ends inside the stripped part: anything may follow.
                None if self.prefix => return Some((PathPattern { segments: Vec::new(), prefix: true, trailing_slash: false }, false)),
                None => return None,
                Some(Segment::Literal(l)) if !(l == part || (case_insensitive && l.eq_ignore_ascii_case(part))) => return None,
                Some(Segment::Literal(_)) => k += 1,
                Some(Segment::Param(_)) => (k, always) = (k + 1, false),
            }
        }
        let segments = self.segments[k..].to_vec();
        let trailing_slash = self.trailing_slash && !segments.is_empty();
        Some((PathPattern { segments, prefix: self.prefix, trailing_slash }, always))
    }

    /// True if some path matches both patterns.
    pub(crate) fn overlaps(&self, other: &PathPattern, case_insensitive: bool) -> bool {
        let literals_agree = self.segments.iter().zip(&other.segments).all(|(a, b)| match (a, b) {
            (Segment::Literal(x), Segment::Literal(y)) => x == y || (case_insensitive && x.eq_ignore_ascii_case(y)),
            _ => true,
        });
        let (a, b) = (self.segments.len(), other.segments.len());
        literals_agree
            && match (self.prefix, other.prefix) {
                (true, true) => true,
                (true, false) => b >= a,
                (false, true) => a >= b,
                (false, false) => a == b,
            }
    }
}

impl std::fmt::Display for PathPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.segments.is_empty() && !self.prefix {
            return f.write_str("/");
        }
        for s in &self.segments {
            match s {
                Segment::Literal(l) => write!(f, "/{l}")?,
                Segment::Param(p) => write!(f, "/{{{p}}}")?,
            }
        }
        if self.prefix {
            f.write_str("/*")?;
        } else if self.trailing_slash {
            f.write_str("/")?;
        }
        Ok(())
    }
}

/// A checked route: where matching requests go and the policy that decides on them.
#[derive(Debug, Clone)]
pub struct Route {
    /// Position in file order; indexes per-route state (upstream client, metrics handles).
    pub index: usize,
    pub name: String,
    pub pattern: PathPattern,
    pub methods: Option<Vec<Method>>,
    pub upstream: String,
    pub strip_prefix: Option<String>,
    pub policy: Policy,
    /// The route's own limit, checked after authentication.
    pub rate_limit: Option<crate::edge::ratelimit::LimitSettings>,
    /// The route's secure headers, when it overrides the global ones.
    pub headers: Option<std::sync::Arc<crate::edge::headers_response::SecureHeaders>>,
    /// The route's CORS policy, when it overrides the global one.
    pub cors: Option<std::sync::Arc<crate::edge::cors::CorsPolicy>>,
    /// Where this route accepts a token besides the Authorization header.
    pub token_sources: crate::auth::TokenSources,
    /// Paths with escapes a second decoding would resolve (`%252e`, `..%3B`) are served, not refused: only for an
    /// upstream known to decode once.
    pub allow_double_encoding: bool,
    /// On a public route, the client's `Authorization` goes to the upstream (unverified): only for an upstream that
    /// checks it itself.
    pub pass_authorization: bool,
    /// The connection's client certificate must be present and meet these rules.
    pub client_cert: Option<crate::edge::client_cert::CertPolicy>,
    case_insensitive: bool,
}

impl Route {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        index: usize,
        name: String,
        pattern: PathPattern,
        methods: Option<Vec<Method>>,
        upstream: String,
        strip_prefix: Option<String>,
        policy: Policy,
        case_insensitive: bool,
    ) -> Route {
        Route {
            index,
            name,
            pattern,
            methods,
            upstream,
            strip_prefix,
            policy,
            rate_limit: None,
            headers: None,
            cors: None,
            token_sources: Default::default(),
            allow_double_encoding: false,
            pass_authorization: false,
            client_cert: None,
            case_insensitive,
        }
    }

    /// Without `methods`, any method but CONNECT (a tunnel, meaningless to an upstream origin) and TRACE (it
    /// echoes the request, forwarded credentials and identity headers included).
    fn allows(&self, method: &Method) -> bool {
        match &self.methods {
            None => *method != Method::CONNECT && *method != Method::TRACE,
            Some(m) => m.contains(method) || (*method == Method::HEAD && m.contains(&Method::GET)),
        }
    }

    /// True if this route matches every request `later` would, so `later` can never be chosen.
    pub(crate) fn shadows(&self, later: &Route, case_insensitive: bool) -> bool {
        let methods = match (&self.methods, &later.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.iter().all(|m| a.contains(m)),
        };
        methods && self.pattern.covers(&later.pattern, case_insensitive)
    }

    /// The patterns of the paths this route sends upstream: its own, or what `strip_prefix` leaves of them.
    pub(crate) fn forwarded_patterns(&self) -> Vec<PathPattern> {
        match self.strip_prefix.as_deref().and_then(|p| self.pattern.stripped(p, self.case_insensitive)) {
            Some((stripped, true)) => vec![stripped],
            Some((stripped, false)) => vec![stripped, self.pattern.clone()],
            None => vec![self.pattern.clone()],
        }
    }

    /// Returns the path to send upstream: the normalised path with `strip_prefix` removed.
    pub fn upstream_path<'a>(&self, path: &'a str) -> &'a str {
        let Some(prefix) = &self.strip_prefix else {
            return path;
        };
        let head = path.get(..prefix.len());
        let same = head.is_some_and(|h| if self.case_insensitive { h.eq_ignore_ascii_case(prefix) } else { h == prefix });
        if !same {
            return path;
        }
        match &path[prefix.len()..] {
            "" => "/",
            rest if rest.starts_with('/') => rest,
            _ => path,
        }
    }
}

/// A path parameter taken from the matched path, fully percent-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathParam {
    pub name: String,
    pub value: String,
}

/// The route a request matched, with its decoded path parameters.
#[derive(Debug)]
pub struct RouteMatch<'r> {
    pub route: &'r Route,
    pub params: Vec<PathParam>,
}

impl RouteMatch<'_> {
    /// Returns the decoded value of path parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|p| p.name == name).map(|p| p.value.as_str())
    }
}

/// The routes in file order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    case_insensitive: bool,
}

impl RouteTable {
    pub(crate) fn new(routes: Vec<Route>, case_insensitive: bool) -> RouteTable {
        RouteTable { routes, case_insensitive }
    }

    /// Lists the routes in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Returns true if paths match without regard to ASCII case.
    pub fn case_insensitive(&self) -> bool {
        self.case_insensitive
    }

    /// For `explain`: each route in order with whether its path and its methods match, up to the first that
    /// matches both.
    pub fn trace(&self, method: &Method, path: &str) -> Vec<(&Route, bool, bool)> {
        let mut scratch = Vec::new();
        let mut out = Vec::new();
        let mut fences: Vec<&PathPattern> = Vec::new();
        for route in &self.routes {
            // A route broader than a fence counts as not matching the path (see `match_route`).
            let path_ok = route.pattern.matches(path, self.case_insensitive, &mut scratch)
                && fences.iter().all(|f| f.covers(&route.pattern, self.case_insensitive));
            let method_ok = route.allows(method);
            out.push((route, path_ok, method_ok));
            if path_ok && method_ok {
                break;
            }
            if path_ok {
                fences.push(&route.pattern);
            }
        }
        out
    }

    /// Finds the first route whose path and method match a normalised path. A path that some route matches
    /// only for other methods is 405 with `Allow`; no path match at all is 404.
    ///
    /// A route whose path matched but whose methods did not fences the path: a later route is chosen only if
    /// every path it matches is that route's too (another method's route for the same path, or a narrower one),
    /// never a broader one, so `DELETE` on a `GET`-only `/reports/*` is 405, not a catch-all `/*`'s request.
    pub fn match_route<'r>(&'r self, method: &Method, path: &str) -> Result<RouteMatch<'r>, RouteError> {
        if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(RouteError::LowercaseMethod(method.as_str().to_string()));
        }
        let mut scratch = Vec::new();
        let mut allowed: Vec<&Method> = Vec::new();
        let mut any_method_route = false;
        let mut fences: Vec<&PathPattern> = Vec::new();
        for route in &self.routes {
            if !route.pattern.matches(path, self.case_insensitive, &mut scratch) {
                continue;
            }
            if !fences.iter().all(|f| f.covers(&route.pattern, self.case_insensitive)) {
                continue;
            }
            if route.allows(method) {
                if !route.allow_double_encoding && path::decodes_again(path) {
                    return Err(RouteError::DoubleEncoded);
                }
                let mut params = Vec::new();
                for (i, raw) in &scratch {
                    if let Segment::Param(name) = &route.pattern.segments[*i] {
                        // Strict: a lossy decode would map different paths (%FF, %FE) to one value.
                        let value = percent_encoding::percent_decode_str(raw).decode_utf8().map_err(|_| RouteError::NotUtf8)?;
                        params.push(PathParam { name: name.clone(), value: value.into_owned() });
                    }
                }
                return Ok(RouteMatch { route, params });
            }
            match &route.methods {
                Some(ms) => allowed.extend(ms.iter()),
                None => any_method_route = true,
            }
            fences.push(&route.pattern);
        }
        if any_method_route {
            return Err(RouteError::NotImplemented(method.clone()));
        }
        if allowed.is_empty() {
            return Err(RouteError::NotFound);
        }
        let mut names: Vec<&str> = allowed.iter().map(|m| m.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let allow = HeaderValue::from_str(&names.join(", ")).unwrap_or(HeaderValue::from_static("GET"));
        Err(RouteError::MethodNotAllowed { allow })
    }
}

#[cfg(test)]
mod tests;
