//! Response header rules: the secure headers an answer gets, the names it loses, and an upstream answer's own
//! fields kept as lines of its head (for codecs that pass them on unparsed).

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::headers_request::{strip_hop_by_hop, X_REQUEST_ID};

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

/// The end-to-end fields of an upstream's answer, left as lines of its head: the HTTP/1 codec writes them out as
/// they came (no header map is built for a usual answer), and [`AnswerFields::move_into`] puts them in a map
/// where one is needed (HTTP/2 clients, CORS). Hop-by-hop fields, `Content-Length` (kept as a number) and the
/// fields the answer rules remove are never among them. Names and values are as httparse checked them: token
/// characters, and visible characters, spaces and tabs (what `HeaderName` and `HeaderValue` accept).
#[derive(Debug, Default)]
pub struct AnswerFields {
    head: Bytes,
    /// Name start, name end, value start, value end, in `head` (a head is at most 64 KiB).
    spans: Vec<[u16; 4]>,
    /// The `Content-Length` passed on (its one value; none for a chunked answer).
    pub content_length: Option<u64>,
    /// A `Date` is among the fields.
    pub dated: bool,
}

impl AnswerFields {
    /// Fields found in `head` by a codec: name start, name end, value start, value end of each (a head is at most
    /// 64 KiB), with the `Content-Length` it passes on and whether a `Date` is among them.
    pub fn new(head: Bytes, spans: Vec<[u16; 4]>, content_length: Option<u64>, dated: bool) -> AnswerFields {
        AnswerFields { head, spans, content_length, dated }
    }

    /// The fields as name and value bytes, in the upstream's order and spelling.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let at = |a: u16, b: u16| self.head.get(usize::from(a)..usize::from(b)).unwrap_or_default();
        self.spans.iter().map(move |&[ns, ne, vs, ve]| (at(ns, ne), at(vs, ve)))
    }

    /// Removes every field of this name (any case).
    pub fn remove(&mut self, name: &HeaderName) {
        let head = &self.head;
        let name = name.as_str().as_bytes();
        self.spans.retain(|&[ns, ne, ..]| !head.get(usize::from(ns)..usize::from(ne)).is_some_and(|n| n.eq_ignore_ascii_case(name)));
        self.dated &= name != b"date";
    }

    /// Fields as an upstream's head would carry them (tests of what is done with them later).
    #[cfg(test)]
    pub(crate) fn from_pairs(pairs: &[(&str, &str)]) -> AnswerFields {
        let mut head = Vec::new();
        let mut spans = Vec::new();
        for (n, v) in pairs {
            let at = |x: usize| u16::try_from(x).unwrap();
            let ns = head.len();
            head.extend_from_slice(format!("{n}: ").as_bytes());
            let vs = head.len();
            head.extend_from_slice(format!("{v}\r\n").as_bytes());
            spans.push([at(ns), at(ns + n.len()), at(vs), at(vs + v.len())]);
        }
        let dated = pairs.iter().any(|(n, _)| n.eq_ignore_ascii_case("date"));
        AnswerFields { head: head.into(), spans, content_length: None, dated }
    }

    /// Moves the fields (and the `Content-Length`) into a map, leaving none here.
    pub fn move_into(&mut self, h: &mut HeaderMap) {
        let AnswerFields { head, spans, content_length, .. } = std::mem::take(self);
        for [ns, ne, vs, ve] in spans {
            let name = head.get(usize::from(ns)..usize::from(ne)).and_then(|n| parse_name(n).ok());
            let value = HeaderValue::from_maybe_shared(head.slice(usize::from(vs)..usize::from(ve))).ok();
            // Both always parse: httparse admits exactly what they accept (tested below).
            if let (Some(n), Some(v)) = (name, value) {
                h.append(n, v);
            }
        }
        if let Some(n) = content_length {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// What an answer carries besides its map: an upstream's own fields still in the lines of its head (lean
/// answers), then the secure headers it lacks and the request id. None of them is in the map, so a codec may
/// write them straight after the map's fields instead of inserting them.
pub struct Additions<'a> {
    pub passed: AnswerFields,
    pub secure: SecureAdd<'a>,
    pub request_id: HeaderValue,
}

impl Additions<'_> {
    pub fn insert_into(mut self, h: &mut http::HeaderMap) {
        self.passed.move_into(h);
        self.secure.insert_into(h);
        h.insert(super::headers_request::request_id_header().clone(), self.request_id);
    }
}
