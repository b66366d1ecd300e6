//! The request target as routing reads it: the path in its one canonical form, and the `Host` it names.

use std::borrow::Cow;

use http::HeaderValue;

use super::RouteError;

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
pub fn request_host(headers: &http::HeaderMap, target: &http::Uri, version: http::Version) -> Result<Option<HeaderValue>, RouteError> {
    // HTTP/2's `:scheme` (or an absolute-form target's): only what this gateway serves, so an upstream that builds
    // URLs or decides on it never reads another one the client chose.
    if target.scheme().is_some_and(|s| s != &http::uri::Scheme::HTTP && s != &http::uri::Scheme::HTTPS) {
        return Err(RouteError::BadScheme);
    }
    let authority = target.authority();
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

pub(super) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The delimiters a path segment may carry raw (RFC 3986 `pchar`), which frameworks decode before routing: their
/// escapes are decoded too, so a route literal `items:purge` is `items%3Apurge`. `;` is not among them: it is
/// refused raw (Tomcat path parameters), and its escape is data.
pub(super) fn is_segment_delimiter(b: u8) -> bool {
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

/// True when a normalised path holds what a second decoding would resolve into another route: an escaped `%`
/// that decodes (once or more) to the escape of a dot, slash, backslash or `;` (`%252e`, `%25252F`, `%255c`), or
/// a dot segment followed by an encoded `;` (`..%3B`, which Tomcat-style servers read as `..` once decoded).
/// Spring's StrictHttpFirewall and Envoy refuse these outright; so does a route unless it allows them.
pub fn decodes_again(path: &str) -> bool {
    if !path.contains('%') {
        return false;
    }
    let b = path.as_bytes();
    let upper = |i: usize| b.get(i).map(u8::to_ascii_uppercase);
    for (i, _) in path.match_indices('%') {
        // `%25` repeated, then the escape it becomes: `%` and two hex digits of a delimiter.
        let mut j = i + 1;
        let mut escaped_percent = false;
        while upper(j) == Some(b'2') && upper(j + 1) == Some(b'5') {
            escaped_percent = true;
            j += 2;
        }
        if escaped_percent
            && matches!((upper(j), upper(j + 1)), (Some(b'2'), Some(b'E' | b'F')) | (Some(b'5'), Some(b'C')) | (Some(b'3'), Some(b'B')))
        {
            return true;
        }
    }
    path.split('/').any(|seg| {
        let rest = seg.trim_start_matches('.');
        let dots = seg.len() - rest.len();
        (1..=2).contains(&dots) && rest.get(..3).is_some_and(|e| e.eq_ignore_ascii_case("%3B"))
    })
}
