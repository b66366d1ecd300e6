//! Request header rules: hop-by-hop removal (RFC 9110 §7.6.1, also applied to answers), X-Forwarded-*, the
//! request id, and the identity headers the upstream trusts.
//!
//! Identity headers are removed from every incoming request before anything else, so a client can never forge its
//! identity to the upstream, on public routes included.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use crate::auth::{invalid, lookup_claim, AuthError, FailReason, Principal};

/// Which claims the upstream receives, in which headers, and whether the bearer token goes along; and which other
/// identity headers no client may send.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub headers: Vec<(HeaderName, String)>,
    pub forward_authorization: bool,
    /// The names of `headers`, and of the identity headers of other gateways (and `strip_also`), removed from every
    /// request (upstreams migrated from those gateways trust them), by length (63: 63 or more): a request's field is compared only with the
    /// few of its own length.
    forged_by_length: Vec<Vec<HeaderName>>,
    /// Where the upstream gets a verified client certificate (these names are forged by anyone else too).
    pub cert_headers: crate::edge::client_cert::CertHeaders,
}

/// The identity headers other auth gateways set for their upstreams (oauth2-proxy, Authelia, Apache and nginx
/// `REMOTE_USER`, Grafana's auth proxy, Google IAP, Azure App Service, AWS ALB, Cloudflare Access).
pub const WELL_KNOWN_IDENTITY_HEADERS: [&str; 27] = [
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-remote-user",
    "remote-user",
    "remote-email",
    "remote-groups",
    "remote-name",
    "x-authenticated-user",
    "x-auth-user",
    "x-webauth-user",
    "x-goog-authenticated-user-email",
    "x-goog-authenticated-user-id",
    "x-ms-client-principal",
    "x-ms-client-principal-name",
    "x-ms-client-principal-id",
    "x-amzn-oidc-identity",
    "x-amzn-oidc-data",
    "x-amzn-oidc-accesstoken",
    "cf-access-authenticated-user-email",
];

impl IdentitySettings {
    /// Settings from `[identity]`: `strip` is the well-known list (unless turned off) and `strip_also`.
    pub fn new(
        headers: Vec<(HeaderName, String)>,
        forward_authorization: bool,
        strip: Vec<HeaderName>,
        cert_headers: crate::edge::client_cert::CertHeaders,
    ) -> IdentitySettings {
        let mut forged_by_length = vec![Vec::new(); 64];
        let cert_names = [&cert_headers.subject, &cert_headers.sans, &cert_headers.thumbprint];
        for n in headers.iter().map(|(n, _)| n).chain(&strip).chain(cert_names) {
            forged_by_length[n.as_str().len().min(63)].push(n.clone());
        }
        IdentitySettings { headers, forward_authorization, forged_by_length, cert_headers }
    }

    /// The well-known identity headers of other gateways, as header names.
    pub fn well_known() -> Vec<HeaderName> {
        WELL_KNOWN_IDENTITY_HEADERS.iter().map(|n| HeaderName::from_static(n)).collect()
    }

    /// True for a name a client might forge identity with (in any separator spelling a server maps alike).
    fn is_forged(&self, k: &str) -> bool {
        self.forged_by_length.get(k.len().min(63)).is_some_and(|names| names.iter().any(|n| loose_eq(k, n.as_str())))
    }
}

impl Default for IdentitySettings {
    fn default() -> Self {
        let h = |n: &'static str, c: &str| (HeaderName::from_static(n), c.to_string());
        IdentitySettings::new(
            vec![h("x-auth-subject", "sub"), h("x-auth-roles", "roles"), h("x-auth-scopes", "scope"), h("x-auth-issuer", "iss")],
            true,
            IdentitySettings::well_known(),
            Default::default(),
        )
    }
}

pub(super) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
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

/// A random 64-bit number from a per-thread generator (ids, not secrets).
pub fn next_random() -> u64 {
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

/// Removes what no client may tell the upstream, trusted proxies included: the identity headers (ours and other
/// gateways'), the routing and method overrides, and underscore spellings of the fields the gateway sets or frames
/// by.
pub fn strip_forged(headers: &mut HeaderMap, identity: &IdentitySettings) {
    remove_present(headers, |k| {
        let k = k.as_str();
        identity.is_forged(k)
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

/// Removes every cookie named `name` (read as leniently as the token cookie is) from the Cookie fields, keeping
/// the others in order.
pub fn remove_cookie(headers: &mut HeaderMap, name: &str) {
    if !crate::auth::extract::has_cookie(headers, name) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.split(';').filter(|c| !crate::auth::extract::cookie_named(c, name)).map(str::trim).collect::<Vec<_>>().join("; "))
        .filter(|v| !v.is_empty())
        .collect();
    headers.remove(header::COOKIE);
    for v in kept {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.append(header::COOKIE, v);
        }
    }
}

/// Removes the headers a `Connection` value lists (a token that is no valid header name names nothing).
fn remove_listed(headers: &mut HeaderMap, connection: &HeaderValue, upgrading: bool) {
    // Read as bytes: a value with obs-text in it still names the fields it names.
    for token in connection.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let kept_upgrade = upgrading && token.eq_ignore_ascii_case(b"upgrade");
        if !token.is_empty() && !kept_upgrade {
            if let Ok(name) = HeaderName::from_bytes(token) {
                headers.remove(name);
            }
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
    identity_values: Option<&[Option<HeaderValue>]>,
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
    if let Some(values) = identity_values {
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

/// The identity header values of a verified principal, rendered once per cached token: Err (401
/// `claim_unforwardable`) when a claim the upstream is to receive cannot be put in a header as the policy saw it.
pub fn identity_values<'p>(p: &'p Principal, identity: &IdentitySettings) -> Result<&'p [Option<HeaderValue>], AuthError> {
    let values = p.identity_values.get_or_init(|| identity.headers.iter().map(|(_, claim)| render_claim(p, claim)).collect());
    values.as_deref().map_err(|detail| invalid(FailReason::ClaimUnforwardable, detail.clone()))
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
/// A claim's header value: Ok(None) when the token does not carry it (or carries an empty list), Err when it does
/// but no header could say exactly what the policy saw.
pub(super) fn render_claim(p: &Principal, claim: &str) -> Result<Option<HeaderValue>, String> {
    let text = match claim {
        "roles" => join_list(claim, &p.roles)?,
        "scope" | "scopes" => join_list(claim, &p.scopes)?,
        "sub" => p.subject.clone(),
        other => match lookup_claim(&p.claims, other) {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(Value::Array(a)) => {
                let parts: Option<Vec<String>> = a
                    .iter()
                    .map(|v| match v {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect();
                let parts = parts.ok_or_else(|| format!("claim {claim:?} is a list holding something other than strings and numbers"))?;
                join_list(claim, &parts)?
            }
            Some(_) => return Err(format!("claim {claim:?} is an object or null")),
        },
    };
    if text.is_empty() {
        return Ok(None);
    }
    if !text.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(format!("claim {claim:?} has bytes that are unsafe in a header (control characters or non-ASCII)"));
    }
    // HTTP parsers drop a field value's outer spaces: "admin " would reach the upstream as "admin", which is
    // not what the policy compared.
    if text.starts_with(' ') || text.ends_with(' ') {
        return Err(format!("claim {claim:?} starts or ends with a space, which a header would lose"));
    }
    HeaderValue::from_str(&text).map(Some).map_err(|_| format!("claim {claim:?} is no header value"))
}

/// A list claim joined with commas; empty for an empty list.
fn join_list(claim: &str, v: &[String]) -> Result<String, String> {
    // A reader of the joined list splits at commas and trims: " admin" would read as "admin", which the
    // policy did not see.
    if v.iter().any(|item| item.contains(',') || item.is_empty() || item.trim() != item) {
        return Err(format!(
            "list claim {claim:?} has an empty item, or one with a comma or outer spaces, which a header would make ambiguous"
        ));
    }
    Ok(v.join(","))
}
