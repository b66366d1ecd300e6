//! Header work on both sides of the proxy: hop-by-hop removal (RFC 9110 §7.6.1), X-Forwarded-*, the request id,
//! and the identity headers the upstream trusts.
//!
//! Identity headers are removed from every incoming request before anything else, so a client can never forge its
//! identity to the upstream, on public routes included.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::auth::{lookup_claim, Principal};
use crate::h1::answer::AnswerFields;

/// Which claims the upstream receives, in which headers, and whether the bearer token goes along.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub headers: Vec<(HeaderName, String)>,
    pub forward_authorization: bool,
}

impl Default for IdentitySettings {
    fn default() -> Self {
        let h = |n: &'static str, c: &str| (HeaderName::from_static(n), c.to_string());
        IdentitySettings {
            headers: vec![h("x-auth-subject", "sub"), h("x-auth-roles", "roles"), h("x-auth-scopes", "scope"), h("x-auth-issuer", "iss")],
            forward_authorization: true,
        }
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Returns the name of the request-id header.
pub fn request_id_header() -> &'static HeaderName {
    &X_REQUEST_ID
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish() | 1
    });
}

fn next_random() -> u64 {
    // splitmix64 over a per-thread seed: unique ids without a lock shared by every request.
    RNG.with(|s| {
        let x = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// Generates a new request id: 32 hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for half in buf.chunks_exact_mut(16) {
        let n = next_random();
        for (i, pair) in half.chunks_exact_mut(2).enumerate() {
            let byte = (n >> (8 * i)) as u8;
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 15)];
        }
    }
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
}

/// Picks the request id: a trusted proxy's own (if sane), else a fresh one.
pub fn request_id(headers: &HeaderMap, from_trusted_proxy: bool) -> HeaderValue {
    if from_trusted_proxy {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            if !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic()) {
                return v.clone();
            }
        }
    }
    new_request_id()
}

/// The fields that say where a request came from: the gateway sets them, or extends a trusted proxy's. Every
/// `X-Forwarded-*` (`-Prefix` and `-Port` move routing in Spring and Werkzeug), and the other client-address
/// fields frameworks read.
fn is_forwarding(k: &HeaderName) -> bool {
    let k = k.as_str();
    k.starts_with("x-forwarded-") || CLIENT_ADDRESS_LENGTHS & (1 << k.len().min(63)) != 0 && CLIENT_ADDRESS.contains(&k)
}

const CLIENT_ADDRESS: [&str; 6] = ["forwarded", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip", "x-request-id"];
const CLIENT_ADDRESS_LENGTHS: u64 = lengths_of(&CLIENT_ADDRESS);

/// Fields some frameworks route or dispatch on instead of the request line (IIS, older Symfony and Zend; method
/// overrides): the upstream must act on the path and method the policy decided on, so no client sets them.
const ROUTING_OVERRIDES: [&str; 6] =
    ["x-original-url", "x-rewrite-url", "x-original-uri", "x-http-method-override", "x-http-method", "x-method-override"];
const ROUTING_OVERRIDES_LENGTHS: u64 = lengths_of(&ROUTING_OVERRIDES);

/// `sent` names `ours` for some server: CGI/WSGI-style servers read `X_Auth_Subject` as `X-Auth-Subject`, and
/// others map every separator alike (`X.Auth.Subject`), so names that differ only in which separator stands
/// where are one name. Same length first: most names stop there.
fn loose_eq(sent: &str, ours: &str) -> bool {
    let separator = |b: u8| !b.is_ascii_alphanumeric();
    sent.len() == ours.len() && sent.bytes().zip(ours.bytes()).all(|(s, o)| s == o || separator(s) && separator(o))
}

/// Another spelling (`X_Forwarded_For`, `Content.Length`) of a field the gateway sets or frames by: the gateway
/// does not read it, a server that maps separators would.
fn is_respelled_managed(k: &str) -> bool {
    // A plain loop: names are short, and a memchr call costs more than it saves on them.
    if k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return false;
    }
    k.get(..12).is_some_and(|p| loose_eq(p, "x-forwarded-"))
        || CLIENT_ADDRESS.iter().chain(&HOP_BY_HOP).chain(&["content-length", "host", "expect"]).any(|n| loose_eq(k, n))
}

/// Removes from a request's trailer section every field the gateway decides on or sets: identity, forwarding,
/// credentials, framing and hop-by-hop fields. RFC 9110 §6.5.1: they have no meaning after the content, and an
/// upstream that merges trailers into its headers would take a client's `X-Auth-Subject` trailer for the
/// gateway's. Other fields pass when the request's `Trailer` field declares them (hyper's encoder checks that).
pub fn strip_request_trailers(trailers: &mut HeaderMap, identity: &IdentitySettings) {
    strip_forged(trailers, identity);
    strip_hop_by_hop(trailers, false);
    remove_present(trailers, |k| {
        is_forwarding(k)
            || k == header::AUTHORIZATION
            || k == header::COOKIE
            || k == header::HOST
            || k == header::CONTENT_LENGTH
            || k == header::EXPECT
            || k == header::TRAILER
    });
}

/// Removes what no client may tell the upstream, trusted proxies included: the identity headers, the
/// routing and method overrides, and underscore spellings of the fields the gateway sets or frames by.
pub fn strip_forged(headers: &mut HeaderMap, identity: &IdentitySettings) {
    remove_present(headers, |k| {
        let k = k.as_str();
        identity.headers.iter().any(|(n, _)| loose_eq(k, n.as_str()))
            || ROUTING_OVERRIDES_LENGTHS & (1 << k.len().min(63)) != 0 && ROUTING_OVERRIDES.iter().any(|n| loose_eq(k, n))
            || is_respelled_managed(k)
    });
}

/// Removes every header whose name matches. One pass over the names; a hash lookup only for those present
/// (usually none), and no allocation.
fn remove_present(headers: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    while let Some(name) = headers.keys().find(|k| matches(k)).cloned() {
        headers.remove(&name);
    }
}

/// Joins an HTTP/2 request's cookie crumbs into one field for HTTP/1.1 (RFC 9113 §8.2.3): many HTTP/1 servers
/// read only the first or the last `Cookie` line, and would see other cookies than the gateway did.
pub fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.next().is_none() || crumbs.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers.get_all(header::COOKIE).iter().map(HeaderValue::as_bytes).collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes the headers a `Connection` value lists (a token that is no valid header name names nothing).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue, upgrading: bool) {
    for token in connection.to_str().unwrap_or_default().split(',').map(str::trim) {
        let kept_upgrade = upgrading && token.eq_ignore_ascii_case("upgrade");
        if !token.is_empty() && !kept_upgrade {
            headers.remove(token);
        }
    }
}

/// The hop-by-hop fields (RFC 9110 §7.6.1): they go whatever `Connection` lists, `upgrade` apart (kept on an
/// upgrade). The one list every check of them is built from.
pub const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "proxy-authorization", "proxy-authenticate", "upgrade"];

/// Bit n: one of `names` is n bytes long (bit 63: 63 or more). A name of another length is none of them.
pub const fn lengths_of(names: &[&str]) -> u64 {
    let mut mask = 0u64;
    let mut i = 0;
    while i < names.len() {
        let n = names[i].len();
        mask |= 1 << if n < 63 { n } else { 63 };
        i += 1;
    }
    mask
}

const HOP_BY_HOP_LENGTHS: u64 = lengths_of(&HOP_BY_HOP);

/// True for a field that is hop-by-hop whatever `Connection` lists (`Upgrade` included).
pub fn is_hop_by_hop(k: &HeaderName) -> bool {
    let k = k.as_str();
    HOP_BY_HOP_LENGTHS & (1 << k.len().min(63)) != 0 && HOP_BY_HOP.contains(&k)
}

/// [`is_hop_by_hop`], `Upgrade` aside.
fn is_fixed_hop_by_hop(k: &HeaderName) -> bool {
    k != header::UPGRADE && is_hop_by_hop(k)
}

/// Removes hop-by-hop headers: `Connection` and every header it names, `Keep-Alive`, `Proxy-Connection`, `TE`,
/// `Transfer-Encoding`, `Upgrade` (kept with `Connection: upgrade` when `upgrading`), `Proxy-Authorization`,
/// `Proxy-Authenticate`. Returns true if `TE: trailers` was asked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) -> bool {
    let mut wants_trailers = false;
    // Usually none is there: one pass over the names, no hash lookup.
    if headers.keys().any(is_hop_by_hop) {
        // Usually one `Connection` value: taken out whole (no copy), so its tokens can name what else goes.
        match headers.get_all(header::CONNECTION).iter().count() {
            0 => {}
            1 => {
                if let Some(v) = headers.remove(header::CONNECTION) {
                    remove_listed(headers, &v, upgrading);
                }
            }
            _ => {
                let values: Vec<HeaderValue> = headers.get_all(header::CONNECTION).iter().cloned().collect();
                values.iter().for_each(|v| remove_listed(headers, v, upgrading));
            }
        }
        wants_trailers = headers
            .get_all(header::TE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
        remove_present(headers, |k| is_fixed_hop_by_hop(k) || (!upgrading && k == header::UPGRADE));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    wants_trailers
}

/// Returns true for an HTTP/1.1 upgrade request (`Connection: upgrade` with an `Upgrade` header).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// What the gateway knows about the connection a request came in on.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    pub peer: SocketAddr,
    /// `peer`'s address as a header value.
    pub peer_ip: &'a HeaderValue,
    pub tls: bool,
    pub from_trusted_proxy: bool,
}

/// What the gateway adds to a request for the upstream. None of these names is left in the request's map by
/// [`prepare_upstream`], so a codec may write them straight after the map's fields (or
/// [`UpstreamFields::insert_into`] adds them to it).
pub struct UpstreamFields<'a> {
    /// `X-Forwarded-For`, `-Proto`, `-Host` for a client that is not a trusted proxy (a trusted proxy's are merged
    /// in the map).
    forwarded: Option<[Option<HeaderValue>; 3]>,
    request_id: &'a HeaderValue,
}

impl UpstreamFields<'_> {
    /// The fields, in the order a codec writes them.
    pub fn fields(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        let names = [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST];
        let forwarded =
            self.forwarded.iter().flat_map(move |values| names.into_iter().zip(values).filter_map(|(n, v)| Some((n, v.as_ref()?))));
        forwarded.chain(std::iter::once((&X_REQUEST_ID, self.request_id)))
    }

    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in self.fields() {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Prepares request headers for the upstream: hop-by-hop removed, the client's `X-Forwarded-*` replaced (or a
/// trusted proxy's extended), the request id, and the verified identity. `host` is the authority the client
/// addressed. Returns the fields still to add.
pub fn prepare_upstream<'a>(
    headers: &mut HeaderMap,
    fwd: &Forwarding<'_>,
    host: Option<&HeaderValue>,
    request_id: &'a HeaderValue,
    principal: Option<&Principal>,
    identity: &IdentitySettings,
    upgrading: bool,
) -> UpstreamFields<'a> {
    let wants_trailers = strip_hop_by_hop(headers, upgrading);
    if wants_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let forwarded = if fwd.from_trusted_proxy {
        let prior: Vec<String> = headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).map(str::to_string).collect();
        let peer = fwd.peer.ip().to_string();
        let joined = if prior.is_empty() { peer } else { format!("{}, {peer}", prior.join(", ")) };
        set(headers, &X_FORWARDED_FOR, &joined);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(&X_FORWARDED_PROTO, proto(fwd.tls));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(h) = host {
                headers.insert(&X_FORWARDED_HOST, h.clone());
            }
        }
        // The gateway answered any `Expect: 100-continue` itself by reading the body.
        remove_present(headers, |k| k == header::EXPECT || k == X_REQUEST_ID);
        None
    } else {
        // Replaced, not trusted; usually none is there (one pass over the names, no hash lookup).
        remove_present(headers, |k| k == header::EXPECT || is_forwarding(k));
        Some([Some(fwd.peer_ip.clone()), Some(proto(fwd.tls)), host.cloned()])
    };
    if !identity.forward_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(p) = principal {
        // Rendered once per cached token, not per request.
        let values = p.identity_values.get_or_init(|| identity.headers.iter().map(|(_, claim)| render_claim(p, claim)).collect());
        for ((name, _), value) in identity.headers.iter().zip(values) {
            match value {
                Some(v) => {
                    headers.insert(name.clone(), v.clone());
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
    UpstreamFields { forwarded, request_id }
}

fn proto(tls: bool) -> HeaderValue {
    HeaderValue::from_static(if tls { "https" } else { "http" })
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name.clone(), v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// Renders a claim as a header value: arrays comma-joined. Values with control or non-ASCII bytes, and lists
/// with an item containing a comma (`"user,admin"` would read as two roles), are refused (the header is not
/// sent) rather than forwarded. `roles` and `scope` mean the issuer's configured claims.
fn render_claim(p: &Principal, claim: &str) -> Option<HeaderValue> {
    let text = match claim {
        "roles" => join_nonempty(&p.roles)?,
        "scope" | "scopes" => join_nonempty(&p.scopes)?,
        "sub" => p.subject.clone(),
        other => match lookup_claim(&p.claims, other)? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Array(a) => {
                let parts: Option<Vec<String>> = a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect();
                join_nonempty(&parts?).unwrap_or_default()
            }
            _ => return None,
        },
    };
    if text.is_empty() || !text.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        if !text.is_empty() {
            tracing::warn!(claim, "claim value has bytes that are unsafe in a header; not forwarded");
        }
        return None;
    }
    // HTTP parsers drop a field value's outer spaces: "admin " would reach the upstream as "admin", which is
    // not what the policy compared.
    if text.starts_with(' ') || text.ends_with(' ') {
        tracing::warn!(claim, "claim value starts or ends with a space, which a header would lose; not forwarded");
        return None;
    }
    HeaderValue::from_str(&text).ok()
}

fn join_nonempty(v: &[String]) -> Option<String> {
    // A reader of the joined list splits at commas and trims: " admin" would read as "admin", which the
    // policy did not see.
    if v.iter().any(|item| item.contains(',') || item.is_empty() || item.trim() != item) {
        tracing::warn!(
            "a list claim has an empty item, or one with a comma or outer spaces, which would be ambiguous in a header; not forwarded"
        );
        return None;
    }
    (!v.is_empty()).then(|| v.join(","))
}

/// Secure response headers: set on proxied answers (keeping the upstream's own value unless `override`) and
/// always on gateway-made answers. HSTS only over TLS. Built once per config ([`SecureHeaders::new`]), with the
/// field lines HTTP/1 answers get rendered ahead.
#[derive(Debug, Clone)]
pub struct SecureHeaders {
    /// At most 64 (one bit each in [`SecureAdd`]); the config has seven names at most.
    set: Vec<(HeaderName, HeaderValue)>,
    hsts: Option<HeaderValue>,
    remove: Vec<HeaderName>,
    override_upstream: bool,
    /// `set` as HTTP/1 field lines, in order, and where each line ends: an answer usually lacks them all, and then
    /// gets them in one copy.
    lines: Vec<u8>,
    line_ends: Vec<usize>,
    hsts_line: Vec<u8>,
    /// Bit n (n < 63; bit 63: 63 or more): some name of `set`, or HSTS, is n bytes long. An answer's name of
    /// another length is none of them, without a comparison.
    set_lengths: u64,
    /// The same for `remove` and X-Request-Id.
    remove_lengths: u64,
}

fn length_bit(name: &HeaderName) -> u64 {
    1 << name.as_str().len().min(63)
}

impl SecureHeaders {
    pub fn new(set: Vec<(HeaderName, HeaderValue)>, hsts: Option<HeaderValue>, remove: Vec<HeaderName>, override_upstream: bool) -> Self {
        let field_line = |out: &mut Vec<u8>, n: &HeaderName, v: &HeaderValue| {
            out.extend_from_slice(n.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        };
        let (mut lines, mut line_ends, mut hsts_line) = (Vec::new(), Vec::new(), Vec::new());
        for (n, v) in &set {
            field_line(&mut lines, n, v);
            line_ends.push(lines.len());
        }
        if let Some(v) = &hsts {
            field_line(&mut hsts_line, &header::STRICT_TRANSPORT_SECURITY, v);
        }
        let set_lengths = set.iter().fold(length_bit(&header::STRICT_TRANSPORT_SECURITY), |m, (n, _)| m | length_bit(n));
        let remove_lengths = remove.iter().fold(length_bit(&X_REQUEST_ID), |m, n| m | length_bit(n));
        SecureHeaders { set, hsts, remove, override_upstream, lines, line_ends, hsts_line, set_lengths, remove_lengths }
    }

    /// The defaults when `[headers]` is absent.
    pub fn defaults() -> SecureHeaders {
        let v = HeaderValue::from_static;
        SecureHeaders::new(
            vec![
                (header::X_CONTENT_TYPE_OPTIONS, v("nosniff")),
                (header::X_FRAME_OPTIONS, v("DENY")),
                (header::REFERRER_POLICY, v("no-referrer")),
                (header::CONTENT_SECURITY_POLICY, v("default-src 'none'; frame-ancestors 'none'")),
                (HeaderName::from_static("cross-origin-opener-policy"), v("same-origin")),
            ],
            Some(v("max-age=63072000; includeSubDomains")),
            vec![header::SERVER, HeaderName::from_static("x-powered-by"), HeaderName::from_static("x-aspnet-version")],
            false,
        )
    }

    pub fn set(&self) -> &[(HeaderName, HeaderValue)] {
        &self.set
    }

    pub fn hsts(&self) -> Option<&HeaderValue> {
        self.hsts.as_ref()
    }

    pub fn remove(&self) -> &[HeaderName] {
        &self.remove
    }

    pub fn override_upstream(&self) -> bool {
        self.override_upstream
    }

    /// Bit n: a name the answer rules remove (or X-Request-Id) is n bytes long (bit 63: 63 or more).
    pub fn remove_lengths(&self) -> u64 {
        self.remove_lengths
    }
}

/// The secure headers an answer still lacks, found by [`prepare_answer`]. None of them is in the answer's map, so
/// a codec may write them straight after the map's fields (or [`SecureAdd::insert_into`] adds them to it).
#[derive(Clone, Copy)]
pub struct SecureAdd<'a> {
    headers: &'a SecureHeaders,
    /// Bit i: `headers.set[i]` is to be added.
    missing: u64,
    hsts: bool,
}

impl<'a> SecureAdd<'a> {
    /// The fields to add, in configuration order.
    pub fn fields(&self) -> impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)> + 'a {
        let (missing, set) = (self.missing, &self.headers.set);
        let hsts = self.hsts.then_some(self.headers.hsts.as_ref()).flatten();
        set.iter()
            .enumerate()
            .filter(move |(i, _)| missing & (1 << i) != 0)
            .map(|(_, (n, v))| (n, v))
            .chain(hsts.map(|v| (&header::STRICT_TRANSPORT_SECURITY, v)))
    }

    pub fn insert_into(&self, h: &mut HeaderMap) {
        for (name, value) in self.fields() {
            h.insert(name.clone(), value.clone());
        }
    }

    /// Writes the fields as HTTP/1 lines, in configuration order (the usual case, all of them: one copy).
    pub fn write_lines(&self, out: &mut Vec<u8>) {
        let s = self.headers;
        let n = s.line_ends.len();
        if n > 0 && self.missing == u64::MAX >> (64 - n) {
            out.extend_from_slice(&s.lines);
        } else {
            let mut start = 0;
            for (i, &end) in s.line_ends.iter().enumerate() {
                if self.missing & (1 << i) != 0 {
                    out.extend_from_slice(&s.lines[start..end]);
                }
                start = end;
            }
        }
        if self.hsts {
            out.extend_from_slice(&s.hsts_line);
        }
    }
}

/// True for an answer field the gateway never passes on: a configured `remove` name, or an upstream's request id
/// (the gateway sets its own). The HTTP/1 client leaves these out as it parses; [`prepare_answer`] removes them
/// from any other answer.
pub fn dropped_from_answer(name: &HeaderName, s: &SecureHeaders) -> bool {
    s.remove_lengths & length_bit(name) != 0 && (name == X_REQUEST_ID || s.remove.contains(name))
}

/// [`HeaderName::from_bytes`] with a fast path for the names most heads carry: one comparison against the one
/// candidate their length and first letter point to, instead of lowercasing into a buffer and matching the whole
/// standard table.
pub fn parse_name(b: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    use header::*;
    let lower = |i: usize| b.get(i).map_or(0, |c| c | 0x20);
    let candidate = match (b.len(), lower(0)) {
        (4, b'd') => DATE,
        (4, b'e') => ETAG,
        (4, b'h') => HOST,
        (4, b'v') => VARY,
        (6, b'a') => ACCEPT,
        (6, b'c') => COOKIE,
        (6, b'o') => ORIGIN,
        (6, b's') => SERVER,
        (7, b'e') => EXPIRES,
        (8, b'l') => LOCATION,
        (10, b'c') => CONNECTION,
        (10, b's') => SET_COOKIE,
        (10, b'u') => USER_AGENT,
        (12, b'c') => CONTENT_TYPE,
        (13, b'a') if lower(1) == b'c' => ACCEPT_RANGES,
        (13, b'a') => AUTHORIZATION,
        (13, b'c') => CACHE_CONTROL,
        (13, b'l') => LAST_MODIFIED,
        (14, b'c') => CONTENT_LENGTH,
        (15, b'a') if lower(7) == b'e' => ACCEPT_ENCODING,
        (15, b'a') => ACCEPT_LANGUAGE,
        (16, b'c') if lower(8) == b'e' => CONTENT_ENCODING,
        (17, b't') => TRANSFER_ENCODING,
        _ => return HeaderName::from_bytes(b),
    };
    if eq_folded(b, candidate.as_str().as_bytes()) {
        Ok(candidate)
    } else {
        HeaderName::from_bytes(b)
    }
}

/// True when `b` is `lower` in any ASCII case. `lower` holds only lowercase letters and dashes (every candidate
/// above does): a letter's 0x40 bit, shifted, is the case bit folded into `b`, so a dash must match exactly.
/// Eight bytes at a time, the last word overlapping the one before (`eq_ignore_ascii_case` goes byte by byte).
fn eq_folded(b: &[u8], lower: &[u8]) -> bool {
    fn word<const N: usize>(s: &[u8], i: usize) -> Option<[u8; N]> {
        s.get(i..i + N)?.try_into().ok()
    }
    let n = b.len();
    if n != lower.len() {
        return false;
    }
    if n < 4 {
        return b.eq_ignore_ascii_case(lower);
    }
    if n < 8 {
        let same = |i| match (word(b, i).map(u32::from_le_bytes), word(lower, i).map(u32::from_le_bytes)) {
            (Some(x), Some(l)) => x | ((l & 0x4040_4040) >> 1) == l,
            _ => false,
        };
        return same(0) && same(n - 4);
    }
    let same = |i| match (word(b, i).map(u64::from_le_bytes), word(lower, i).map(u64::from_le_bytes)) {
        (Some(x), Some(l)) => x | ((l & 0x4040_4040_4040_4040) >> 1) == l,
        _ => false,
    };
    (0..n - 8).step_by(8).all(same) && same(n - 8)
}

/// Readies an answer's headers for the client, in its map and among the upstream's fields still in its head:
/// removes the configured `remove` names and any request id (the gateway sets its own), and finds which secure
/// headers it lacks. `generated`: the gateway made the answer (secure headers always set, whatever was there).
/// HSTS only over TLS.
pub fn prepare_answer<'a>(h: &mut HeaderMap, passed: &mut AnswerFields, s: &'a SecureHeaders, tls: bool, generated: bool) -> SecureAdd<'a> {
    let force = generated || s.override_upstream;
    // One pass over the answer's few names instead of a hash lookup per configured name (most are absent).
    let mut present = 0u64; // bit i: `s.set[i]` is there
    let mut hsts_present = false;
    // Bit i: `s.remove[i]` is there (usually only an upstream's `Server`); bit 63: a request id.
    let mut to_remove = 0u64;
    let names = h.keys().map(|n| n.as_str().as_bytes());
    // The upstream's own spelling: compared in any case.
    let passed_names = passed.iter().map(|(n, _)| n);
    for name in names.chain(passed_names) {
        let length = 1 << name.len().min(63);
        if s.remove_lengths & length != 0 {
            if name.eq_ignore_ascii_case(X_REQUEST_ID.as_str().as_bytes()) {
                to_remove |= 1 << 63;
                continue;
            }
            if let Some(i) = s.remove.iter().position(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes())) {
                to_remove |= 1 << i.min(62);
                continue;
            }
        }
        if s.set_lengths & length == 0 {
            continue;
        }
        for (i, (n, _)) in s.set.iter().enumerate() {
            if name.eq_ignore_ascii_case(n.as_str().as_bytes()) {
                present |= 1 << i;
            }
        }
        hsts_present |= name.eq_ignore_ascii_case(header::STRICT_TRANSPORT_SECURITY.as_str().as_bytes());
    }
    let mut remove = |name: &HeaderName| {
        h.remove(name);
        passed.remove(name);
    };
    if to_remove != 0 {
        for (i, name) in s.remove.iter().enumerate() {
            // Past 62 names (never configured in practice) every one is tried.
            if i >= 62 || to_remove & (1 << i) != 0 {
                remove(name);
            }
        }
        if to_remove & (1 << 63) != 0 {
            remove(&X_REQUEST_ID);
        }
    }
    let mut missing = 0u64;
    for (i, (name, _)) in s.set.iter().enumerate() {
        if present & (1 << i) == 0 {
            missing |= 1 << i;
        } else if force {
            remove(name);
            missing |= 1 << i;
        }
    }
    let hsts = tls && s.hsts.is_some() && (force || !hsts_present);
    if hsts && hsts_present {
        remove(&header::STRICT_TRANSPORT_SECURITY);
    }
    SecureAdd { headers: s, missing, hsts }
}

/// Adds the secure headers to an answer's map (see [`prepare_answer`]).
pub fn apply_secure_headers(h: &mut HeaderMap, s: &SecureHeaders, tls: bool, generated: bool) {
    prepare_answer(h, &mut AnswerFields::default(), s, tls, generated).insert_into(h);
}

/// Cleans an upstream response for the client: hop-by-hop removed; `Content-Length` dropped when the upstream
/// also sent `Transfer-Encoding` (never pass both framings on). (The request id is set on every answer later.)
pub fn finish_response(headers: &mut HeaderMap, upgraded: bool) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, upgraded);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header map from pairs, repeated names appended.
    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_fast_name_parse_agrees_with_the_full_one() {
        let names = [
            "date",
            "etag",
            "host",
            "vary",
            "accept",
            "cookie",
            "origin",
            "server",
            "expires",
            "location",
            "connection",
            "set-cookie",
            "user-agent",
            "content-type",
            "accept-ranges",
            "authorization",
            "cache-control",
            "last-modified",
            "content-length",
            "accept-encoding",
            "accept-language",
            "content-encoding",
            "content-language",
            "content-location",
            "transfer-encoding",
            "keep-alive",
            "x-request-id",
            "a",
            "",
        ];
        let mut cases: Vec<Vec<u8>> = Vec::new();
        for n in names {
            cases.push(n.as_bytes().to_vec());
            cases.push(n.to_ascii_uppercase().into_bytes());
            // Mixed case, and near misses of the same length and first letter.
            cases.push(n.bytes().enumerate().map(|(i, b)| if i % 2 == 0 { b.to_ascii_uppercase() } else { b }).collect());
            for bad in [b'x', b' ', b':', 0, 0xc3] {
                if let Some(last) = n.len().checked_sub(1) {
                    let mut c = n.as_bytes().to_vec();
                    c[last] = bad;
                    cases.push(c);
                }
            }
        }
        for c in cases {
            match (parse_name(&c), HeaderName::from_bytes(&c)) {
                (Ok(fast), Ok(full)) => assert_eq!(fast, full, "{:?}", String::from_utf8_lossy(&c)),
                (Err(_), Err(_)) => {}
                (fast, full) => panic!("{:?}: fast {fast:?}, full {full:?}", String::from_utf8_lossy(&c)),
            }
        }
    }

    #[test]
    fn secure_header_lines_are_the_fields_an_answer_lacks_in_order() {
        // Every combination of upstream-set secure headers, with and without TLS (HSTS).
        let s = SecureHeaders::defaults();
        for present in 0u32..(1 << s.set().len()) {
            for tls in [false, true] {
                let mut h = HeaderMap::new();
                for (i, (n, _)) in s.set().iter().enumerate() {
                    if present & (1 << i) != 0 {
                        h.insert(n.clone(), HeaderValue::from_static("upstream"));
                    }
                }
                h.insert("content-type", HeaderValue::from_static("application/json"));
                let add = prepare_answer(&mut h, &mut AnswerFields::default(), &s, tls, false);
                let mut expected = Vec::new();
                for (n, v) in add.fields() {
                    expected.extend_from_slice(format!("{}: {}\r\n", n, v.to_str().unwrap()).as_bytes());
                }
                let mut lines = Vec::new();
                add.write_lines(&mut lines);
                assert_eq!(String::from_utf8(lines).unwrap(), String::from_utf8(expected).unwrap(), "present {present:b}, tls {tls}");
            }
        }
        // No secure headers configured at all: nothing written (HSTS over TLS aside).
        let none = SecureHeaders::new(Vec::new(), None, Vec::new(), false);
        let mut lines = Vec::new();
        prepare_answer(&mut HeaderMap::new(), &mut AnswerFields::default(), &none, true, true).write_lines(&mut lines);
        assert!(lines.is_empty());
    }

    /// An upstream answer readied for the client, its fields either in its map (hyper's answers) or passed as
    /// lines of its head (the lean client's), then everything in one map to compare.
    fn readied(upstream: &[(&'static str, &'static str)], in_head: bool, s: &SecureHeaders, tls: bool, generated: bool) -> HeaderMap {
        let (mut h, mut passed) =
            if in_head { (HeaderMap::new(), AnswerFields::from_pairs(upstream)) } else { (map(upstream), AnswerFields::default()) };
        let add = prepare_answer(&mut h, &mut passed, s, tls, generated);
        passed.move_into(&mut h);
        // Appended, as a codec writes them: a secure header the answer had would show twice.
        for (n, v) in add.fields() {
            h.append(n.clone(), v.clone());
        }
        h
    }

    #[test]
    fn secure_headers_keep_the_upstreams_own_unless_generated_and_removed_names_go() {
        let d = SecureHeaders::defaults();
        // A name both removed and set: the configured value wins over the upstream's.
        let remove = [d.remove(), &[header::X_FRAME_OPTIONS]].concat();
        let s = SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), remove, false);
        let upstream =
            [("Server", "nginx"), ("X-Content-Type-Options", "upstream"), ("x-frame-options", "SAMEORIGIN"), ("X-Request-ID", "theirs")];
        for in_head in [false, true] {
            let h = readied(&upstream, in_head, &s, false, false);
            assert!(!h.contains_key("server"), "in head: {in_head}");
            assert!(!h.contains_key("x-request-id"));
            assert_eq!(h["x-content-type-options"], "upstream");
            assert_eq!(h.get_all("x-frame-options").iter().collect::<Vec<_>>(), ["DENY"]);
            assert_eq!(h["referrer-policy"], "no-referrer");
            assert!(!h.contains_key("strict-transport-security"), "no HSTS without TLS");
            let h = readied(&upstream, in_head, &s, true, true);
            assert_eq!(h.get_all("x-content-type-options").iter().collect::<Vec<_>>(), ["nosniff"]);
            assert_eq!(h["strict-transport-security"], "max-age=63072000; includeSubDomains");
            let h = readied(&[("Strict-Transport-Security", "max-age=1")], in_head, &s, true, false);
            assert_eq!(h.get_all("strict-transport-security").iter().collect::<Vec<_>>(), ["max-age=1"]);
            let forced = SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), d.remove().to_vec(), true);
            let h =
                readied(&[("Strict-Transport-Security", "max-age=1"), ("X-Frame-Options", "SAMEORIGIN")], in_head, &forced, true, false);
            assert_eq!(h.get_all("strict-transport-security").iter().collect::<Vec<_>>(), ["max-age=63072000; includeSubDomains"]);
            assert_eq!(h.get_all("x-frame-options").iter().collect::<Vec<_>>(), ["DENY"]);
        }
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = map(&[
            ("connection", "x-secret, keep-alive"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers, gzip"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "x"),
            ("x-keep", "1"),
        ]);
        assert!(strip_hop_by_hop(&mut h, false));
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn every_connection_value_is_honoured_and_upgrades_keep_their_upgrade() {
        let mut h = map(&[("connection", "x-one"), ("connection", "X-Two, not a name"), ("x-one", "1"), ("x-two", "2"), ("x-keep", "1")]);
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);

        let mut h = map(&[("connection", "Upgrade, x-secret"), ("upgrade", "websocket"), ("x-secret", "1")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!((h["connection"].to_str().unwrap(), h["upgrade"].to_str().unwrap()), ("upgrade", "websocket"));
        assert!(!h.contains_key("x-secret"));
    }

    #[test]
    fn identity_headers_go_in_either_spelling() {
        let mut h = map(&[("x-auth-subject", "admin"), ("x_auth_roles", "admin"), ("x-auth-other", "kept")]);
        strip_forged(&mut h, &IdentitySettings::default());
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-auth-other"]);
    }

    #[test]
    fn list_claims_with_a_comma_in_an_item_are_not_forwarded() {
        let claims = serde_json::json!({"groups": ["a", "b,c"], "teams": ["x", "y"]});
        let p = Principal {
            issuer_id: "i".into(),
            subject: "s".into(),
            roles: vec!["user,admin".into()],
            scopes: vec!["read".into(), "write".into()],
            claims: std::sync::Arc::new(claims.as_object().unwrap().clone()),
            expires_at: 0,
            identity_values: Default::default(),
            key_generation: None,
        };
        assert_eq!(render_claim(&p, "roles"), None);
        assert_eq!(render_claim(&p, "groups"), None);
        assert_eq!(render_claim(&p, "scope").unwrap(), "read,write");
        assert_eq!(render_claim(&p, "teams").unwrap(), "x,y");
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn untrusted_forwarding_headers_are_replaced() {
        let sent = [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("x-request-id", "forged"),
            ("expect", "100-continue"),
            ("x-kept", "1"),
        ];
        let ip = HeaderValue::from_static("192.0.2.9");
        let fwd = Forwarding { peer: "192.0.2.9:1".parse().unwrap(), peer_ip: &ip, tls: true, from_trusted_proxy: false };
        let rid = new_request_id();
        let mut h = map(&sent);
        let add = prepare_upstream(&mut h, &fwd, None, &rid, None, &IdentitySettings::default(), false);
        // Nothing the gateway sets is left in the map: a codec writing the additions after it sends each once.
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let added: Vec<(&str, &str)> = add.fields().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(added, [("x-forwarded-for", "192.0.2.9"), ("x-forwarded-proto", "https"), ("x-request-id", rid.to_str().unwrap())]);
        add.insert_into(&mut h);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("x-real-ip") && !h.contains_key("forwarded") && !h.contains_key("x-forwarded-host"));

        let host = HeaderValue::from_static("api.example");
        let mut h = map(&sent);
        prepare_upstream(&mut h, &fwd, Some(&host), &rid, None, &IdentitySettings::default(), false).insert_into(&mut h);
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h["x-request-id"], rid);
    }
}
