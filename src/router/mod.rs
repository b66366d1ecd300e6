//! Path normalisation and route matching (exact, `{param}`, `/*` prefix); first match in file order wins.
//!
//! Threat model: a client crafts a path that the gateway routes one way and the upstream reads another
//! (`//admin`, `/./admin`, `/x/../admin`, `/%61dmin`, `/admin%2fx`, `\admin`, `/public/..;/admin`). The defence is to decide on one
//! canonical form and forward exactly that form: dot-segments are removed and slashes merged after unreserved
//! characters and the delimiters a segment may carry raw (`:@!$&'()*+,=`) are decoded, non-ASCII is encoded,
//! route literals are kept in that same form (so `/v1/items%3Apurge` is `/v1/items:purge`, and `/café` is
//! `/caf%C3%A9`), and anything whose meaning differs between servers (an encoded `/` or `\`, a `;` path
//! parameter, NUL, other control bytes) is refused with 400 rather than guessed at. The upstream never sees a path the policy did not.

use std::borrow::Cow;

use http::{HeaderValue, Method};

use crate::auth::authz::Policy;

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
    #[error("no route matches")]
    NotFound,
    #[error("route matches but the method is not allowed")]
    MethodNotAllowed { allow: HeaderValue },
    #[error("bad Host: {0}")]
    BadHost(&'static str),
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

/// Bytes of `host[:port]`: reg-name (unreserved, pct-encoded, sub-delims), an IP literal's brackets, the port's
/// colon. A table: this runs on every request.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let allowed = b"-._~%!$&'()*+,;=:[]0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut i = 0;
    while i < allowed.len() {
        t[allowed[i] as usize] = true;
        i += 1;
    }
    t
};

/// Checks the request's host (RFC 9112 §3.2, RFC 9113 §8.3.1) and returns the one to forward: an HTTP/1.1
/// request needs exactly one `Host`, of `host[:port]` syntax (no path, query or userinfo an upstream could read a
/// different origin from); on HTTP/2 a `host` beside `:authority` must name the same. The target's authority
/// (absolute-form, or `:authority`) wins over `Host`.
pub fn request_host(
    headers: &http::HeaderMap,
    authority: Option<&http::uri::Authority>,
    version: http::Version,
) -> Result<Option<HeaderValue>, RouteError> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(RouteError::BadHost("more than one Host field"));
    }
    let host_syntax = |b: &[u8]| b.iter().all(|&b| HOST_BYTES[usize::from(b)]);
    // The target's authority too: `http::uri::Authority` takes userinfo (`GET http://x@victim/`).
    if !host.is_none_or(|h| host_syntax(h.as_bytes())) || !authority.is_none_or(|a| host_syntax(a.as_str().as_bytes())) {
        return Err(RouteError::BadHost("not of host[:port] syntax"));
    }
    match (authority, host) {
        (Some(a), Some(h)) if version == http::Version::HTTP_2 && !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => {
            Err(RouteError::BadHost("host differs from :authority"))
        }
        (Some(a), _) => Ok(HeaderValue::from_str(a.as_str()).ok()),
        (None, Some(h)) => Ok(Some(h.clone())),
        (None, None) if version == http::Version::HTTP_11 => Err(RouteError::BadHost("an HTTP/1.1 request without Host")),
        (None, None) => Ok(None),
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

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The delimiters a path segment may carry raw (RFC 3986 `pchar`), which frameworks decode before routing: their
/// escapes are decoded too, so a route literal `items:purge` is `items%3Apurge`. `;` is not among them: it is
/// refused raw (Tomcat path parameters), and its escape is data.
fn is_segment_delimiter(b: u8) -> bool {
    matches!(b, b':' | b'@' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=')
}

/// Bytes a normalised path carries percent-encoded, never raw: non-ASCII, and the ASCII a URI may not hold raw.
fn must_encode(b: u8) -> bool {
    b >= 0x80 || matches!(b, b' ' | b'"' | b'<' | b'>' | b'[' | b']' | b'^' | b'`' | b'{' | b'|' | b'}')
}

/// A route literal (one segment, or a `strip_prefix` segment) in the form normalised request paths take:
/// non-ASCII and the other characters a URI may not carry raw are percent-encoded (so `/café` matches
/// `/caf%C3%A9` and a raw `/café`). `;`, `#`, `?` and controls are refused: no normalised path holds them.
pub(crate) fn canonical_segment(seg: &str) -> Result<String, String> {
    let mut out = String::with_capacity(seg.len());
    for &b in seg.as_bytes() {
        if is_unreserved(b) || is_segment_delimiter(b) {
            out.push(char::from(b));
        } else if must_encode(b) {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        } else {
            return Err(format!("segment {seg:?} has {:?}, which no normalised request path holds", char::from(b)));
        }
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a request path (RFC 3986 §6.2.2): decodes percent-escaped unreserved characters (and the delimiters
/// a segment carries raw, which frameworks decode before routing), upper-cases the
/// remaining escapes, removes dot-segments and merges repeated slashes. Refuses an encoded `/` or `\`, a raw `\`,
/// and NUL or any other control character. Paths already in normal form are returned without copying.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, RouteError> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(RouteError::NotAbsolutePath);
    }
    let needs_work = bytes.iter().any(|&b| b == b'%' || b == b'\\' || b == b';' || b < 0x20 || b == 0x7f || must_encode(b))
        || raw.contains("//")
        || raw.contains("/./")
        || raw.contains("/../")
        || raw.ends_with("/.")
        || raw.ends_with("/..");
    if !needs_work {
        return Ok(Cow::Borrowed(raw));
    }
    // Pass 1: escapes and forbidden bytes.
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|&x| hex(x)), bytes.get(i + 2).and_then(|&x| hex(x))) else {
                    return Err(RouteError::BadEscape);
                };
                let v = h * 16 + l;
                if v == b'/' || v == b'\\' || v < 0x20 || v == 0x7f {
                    return Err(RouteError::ForbiddenByte);
                }
                if is_unreserved(v) || is_segment_delimiter(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                    decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
                }
                i += 3;
            }
            // A path parameter: servers that strip ";…" from a segment before routing (Tomcat, Jetty, Spring) would
            // read "/public/..;/admin" as "/admin" and "/admin;x" as "/admin".
            b'\\' | b';' => return Err(RouteError::ForbiddenByte),
            b if b < 0x20 || b == 0x7f => return Err(RouteError::ForbiddenByte),
            // Raw UTF-8 and the characters a URI may not carry raw (hyper lets them through): encoded, as the
            // route literals are, so `/café` and `/caf%C3%A9` are one path.
            b if must_encode(b) => {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
                i += 1;
            }
            _ => {
                decoded.push(char::from(b));
                i += 1;
            }
        }
    }
    // Pass 2: dot-segments and empty segments.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        trailing = false;
        match seg {
            "" | "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for seg in &out {
        path.push('/');
        path.push_str(seg);
    }
    if path.is_empty() || trailing {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::authz::Policy;

    fn table(paths: &[(&str, Option<&[&str]>)], ci: bool) -> RouteTable {
        let routes = paths
            .iter()
            .enumerate()
            .map(|(i, (p, m))| {
                let methods = m.map(|m| m.iter().map(|s| Method::from_bytes(s.as_bytes()).unwrap()).collect());
                Route::new(i, format!("r{i}"), PathPattern::parse(p).unwrap(), methods, "u".into(), None, Policy::public(), ci)
            })
            .collect();
        RouteTable::new(routes, ci)
    }

    #[test]
    fn route_literals_match_their_encoded_forms() {
        let t = table(&[("/v1/items:purge", None), ("/café/*", None), ("/users/@me", None), ("/*", None)], false);
        let route = |p: &str| t.match_route(&Method::GET, &normalize_path(p).unwrap()).unwrap().route.index;
        for p in ["/v1/items:purge", "/v1/items%3Apurge", "/v1/items%3apurge", "/v1/%69tems%3Apurge"] {
            assert_eq!(route(p), 0, "{p}");
        }
        for p in ["/caf%C3%A9/x", "/caf%c3%a9/x", "/caf%C3%A9"] {
            assert_eq!(route(p), 1, "{p}");
        }
        assert_eq!(route("/users/%40me"), 2);
        // The forwarded path is the form the route matched.
        assert_eq!(normalize_path("/v1/items%3apurge%2b%3b").unwrap(), "/v1/items:purge+%3B");
        assert_eq!(route("/v1/items%3Bpurge"), 3, "an encoded ';' is data, not ':'");
        for bad in ["/a;b", "/a?b", "/a#b", "/a\tb"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad} could never match a request");
        }
        // Raw UTF-8 and raw characters a URI may not hold are encoded like the literal: one path, one route.
        assert_eq!(normalize_path("/caf\u{e9}/x").unwrap(), "/caf%C3%A9/x");
        assert_eq!(route("/caf\u{e9}/x"), 1);
        let t2 = table(&[("/a[0]", None), ("/my files/*", None), ("/*", None)], false);
        let route2 = |p: &str| t2.match_route(&Method::GET, &normalize_path(p).unwrap()).unwrap().route.index;
        assert_eq!(route2("/a[0]"), 0);
        assert_eq!(route2("/a%5b0%5D"), 0);
        assert_eq!(route2("/my%20files/x"), 1);
        assert_eq!(normalize_path("/a|b^c").unwrap(), "/a%7Cb%5Ec");
    }

    #[test]
    fn a_trailing_slash_meets_the_same_route() {
        let t = table(&[("/users/{id}", None), ("/x/", None), ("/admin", None), ("/*", None)], false);
        for (p, want) in [("/users/alice/", 0), ("/users/alice", 0), ("/x", 1), ("/x/", 1), ("/admin/", 2), ("/admin/.", 2), ("/y/", 3)] {
            let path = normalize_path(p).unwrap();
            assert_eq!(t.match_route(&Method::GET, &path).unwrap().route.index, want, "{p}");
        }
    }

    #[test]
    fn a_broader_later_route_never_takes_a_method_a_route_refused() {
        let t = table(
            &[
                ("/reports/*", Some(&["GET"])),
                ("/reports/special", Some(&["DELETE"])),
                ("/items", Some(&["GET"])),
                ("/items", Some(&["POST"])),
                ("/*", None),
            ],
            false,
        );
        let m = |s: &str| Method::from_bytes(s.as_bytes()).unwrap();
        match t.match_route(&m("DELETE"), "/reports/q3") {
            Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "GET"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.match_route(&m("DELETE"), "/reports/special").unwrap().route.index, 1, "a narrower route may");
        assert_eq!(t.match_route(&m("POST"), "/items").unwrap().route.index, 3, "the same path's other route may");
        match t.match_route(&m("DELETE"), "/items") {
            Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "GET, POST"),
            other => panic!("{other:?}"),
        }
        assert_eq!(t.match_route(&m("DELETE"), "/other").unwrap().route.index, 4);
        let traced: Vec<_> = t.trace(&m("DELETE"), "/reports/q3").iter().map(|(r, p, m)| (r.index, *p, *m)).collect();
        assert_eq!(traced.last(), Some(&(4, false, true)), "explain shows the catch-all as not taking it: {traced:?}");
    }

    #[test]
    fn lowercase_methods_are_refused_not_routed() {
        let t = table(&[("/items", Some(&["DELETE"])), ("/*", None)], false);
        for m in ["delete", "Delete", "trace", "connect", "get"] {
            let r = t.match_route(&Method::from_bytes(m.as_bytes()).unwrap(), "/items");
            assert!(matches!(r, Err(RouteError::LowercaseMethod(_))), "{m}: {r:?}");
        }
        assert_eq!(t.match_route(&Method::from_bytes(b"PROPFIND").unwrap(), "/x").unwrap().route.index, 1);
    }

    #[test]
    fn connect_never_and_trace_only_where_listed() {
        let t = table(&[("/echo", Some(&["TRACE"])), ("/*", None)], false);
        assert_eq!(t.match_route(&Method::TRACE, "/echo").unwrap().route.index, 0);
        assert!(matches!(t.match_route(&Method::TRACE, "/x"), Err(RouteError::NotImplemented(_))));
        assert!(matches!(t.match_route(&Method::CONNECT, "/x"), Err(RouteError::NotImplemented(_))));
        assert_eq!(t.match_route(&Method::PATCH, "/x").unwrap().route.index, 1);
    }

    #[test]
    fn normalises_bypass_attempts_to_one_form() {
        for p in [
            "/admin/x",
            "//admin/x",
            "/./admin/x",
            "/public/../admin/x",
            "/%61dmin/x",
            "/admin//x",
            "/a/b/../../admin/x",
            "/%2e%2e/admin/x",
        ] {
            assert_eq!(normalize_path(p).unwrap(), "/admin/x", "{p}");
        }
        assert_eq!(normalize_path("/../..").unwrap(), "/");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
        assert_eq!(normalize_path("/a%20b").unwrap(), "/a%20b");
        assert_eq!(normalize_path("/a%7eb%3f").unwrap(), "/a~b%3F");
    }

    #[test]
    fn refuses_ambiguous_bytes() {
        for p in ["/admin%2fx", "/admin%2Fx", "/admin%5cx", "/a\\b", "/a%00", "/a%0d%0a", "/a%zz", "/a%4", "/public/..;/admin", "/admin;x"]
        {
            assert!(normalize_path(p).is_err(), "{p}");
        }
        assert!(normalize_path("admin").is_err());
    }

    #[test]
    fn first_match_wins_and_prefix_includes_base() {
        let t = table(&[("/admin/*", None), ("/users/{id}", None), ("/", None), ("/*", None)], false);
        let m = |p: &str| t.match_route(&Method::GET, p).unwrap().route.name.clone();
        assert_eq!(m("/admin"), "r0");
        assert_eq!(m("/admin/"), "r0");
        assert_eq!(m("/admin/a/b"), "r0");
        assert_eq!(m("/adminx"), "r3");
        assert_eq!(m("/users/alice"), "r1");
        assert_eq!(m("/users/alice/x"), "r3");
        assert_eq!(m("/"), "r2");
        let rm = t.match_route(&Method::GET, "/users/al%20ice").unwrap();
        assert_eq!(rm.param("id"), Some("al ice"));
        // Two different invalid byte sequences must not both become U+FFFD and match one claim value.
        for p in ["/users/%FF", "/users/%FE"] {
            assert!(matches!(t.match_route(&Method::GET, p), Err(RouteError::NotUtf8)), "{p}");
        }
        assert_eq!(t.match_route(&Method::GET, "/users/%C3%A9").unwrap().param("id"), Some("é"));
    }

    #[test]
    fn method_mismatch_is_405_and_no_match_404() {
        let t = table(&[("/items", Some(&["POST"])), ("/items", Some(&["PUT"]))], false);
        assert!(t.match_route(&Method::POST, "/items").is_ok());
        match t.match_route(&Method::GET, "/items") {
            Err(RouteError::MethodNotAllowed { allow }) => assert_eq!(allow, "POST, PUT"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(t.match_route(&Method::GET, "/nope"), Err(RouteError::NotFound)));
    }

    #[test]
    fn case_insensitive_is_opt_in() {
        let t = table(&[("/admin/*", None)], false);
        assert!(t.match_route(&Method::GET, "/ADMIN/x").is_err());
        let t = table(&[("/admin/*", None)], true);
        assert!(t.match_route(&Method::GET, "/ADMIN/x").is_ok());
    }

    #[test]
    fn shadowing_is_detected() {
        let t = table(&[("/*", None), ("/admin", Some(&["GET"]))], false);
        assert!(t.routes()[0].shadows(&t.routes()[1], false));
        let t = table(&[("/admin", Some(&["GET"])), ("/*", None)], false);
        assert!(!t.routes()[0].shadows(&t.routes()[1], false));
        // With case-insensitive matching, /Admin/* takes every request /admin/x would.
        let t = table(&[("/Admin/*", None), ("/admin/x", None)], true);
        assert!(t.routes()[0].shadows(&t.routes()[1], true));
        assert!(!t.routes()[0].shadows(&t.routes()[1], false));
    }

    #[test]
    fn strip_prefix_on_segment_boundary() {
        let mut r = Route::new(
            0,
            "r".into(),
            PathPattern::parse("/api/*").unwrap(),
            None,
            "u".into(),
            Some("/api".into()),
            Policy::public(),
            false,
        );
        assert_eq!(r.upstream_path("/api/x"), "/x");
        assert_eq!(r.upstream_path("/api"), "/");
        assert_eq!(r.upstream_path("/apix"), "/apix");
        r.strip_prefix = None;
        assert_eq!(r.upstream_path("/api/x"), "/api/x");
    }

    #[test]
    fn normalising_is_idempotent_and_leaves_no_dot_empty_or_decodable_segments() {
        // Seeded random paths over the characters normalisation treats specially: whatever it accepts, it returns
        // in a form it returns unchanged, so the path the policy saw is the path forwarded, and re-reading it
        // (an upstream decoding once more) finds nothing left to resolve.
        const PIECES: [&str; 22] = [
            "/", "/", "a", "B", ".", "..", "%2e", "%2E", "%2f", "%25", "%41", "%3a", "%3A", "%7e", "%", "%zz", ";", "\\", "é", " ", "~",
            ":",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut raw = String::from("/");
            for _ in 0..next(9) {
                raw.push_str(PIECES[next(PIECES.len())]);
            }
            let Ok(once) = normalize_path(&raw) else { continue };
            accepted += 1;
            let once = once.into_owned();
            assert_eq!(normalize_path(&once).ok().map(Cow::into_owned), Some(once.clone()), "{raw:?} -> {once:?}");
            assert!(once.starts_with('/') && !once.contains("//"), "{raw:?} -> {once:?}");
            assert!(once.split('/').all(|seg| seg != "." && seg != ".."), "{raw:?} -> {once:?}");
            // What escapes are left decode to nothing a router resolves: no slash, dot, unreserved or delimiter.
            for esc in once.split('%').skip(1) {
                let v = u8::from_str_radix(&esc[..2], 16).expect("a whole escape");
                assert!(!is_unreserved(v) && !is_segment_delimiter(v) && v != b'/', "{raw:?} -> {once:?}");
                assert!(esc[..2].bytes().all(|b| !b.is_ascii_lowercase()), "upper-case escapes: {once:?}");
            }
        }
        assert!(accepted > 5_000, "only {accepted} paths were accepted: the generator tests little");
    }
}
