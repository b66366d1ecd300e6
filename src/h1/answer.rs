//! An upstream's HTTP/1.1 answer as the lean client reads it: the head parsed strictly into status, framing and
//! end-to-end fields, and the body read from the upstream socket only as the client's connection asks for it.
//!
//! Framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; `Transfer-Encoding` wins over
//! `Content-Length` (which is then dropped, and the connection not reused); differing `Content-Length` values are
//! an error; otherwise the body runs to the close. The answer's end-to-end fields stay lines of the upstream's head
//! ([`AnswerFields`]): no header map is built for them, and the client's HTTP/1 codec writes them out as they
//! came. Hop-by-hop ones (RFC 9110 §7.6.1, and whatever `Connection` names) are left out as the head is parsed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use http_body::{Frame, SizeHint};

use crate::edge::headers_request;
use crate::edge::headers_response::{self, AnswerFields};
use crate::h1::client::H1Error;
use crate::h1::pool::{Conn, Pool, READ_CHUNK};

/// A response head bigger than this is refused (502).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Header fields of a usual answer, located without a heap allocation.
const FEW_HEADERS: usize = 24;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// True for a field an answer's trailer section may pass on (see `HEAD_ONLY`; `Access-Control-*` neither).
pub fn passes_as_trailer(name: &HeaderName) -> bool {
    !HEAD_ONLY.contains(&name.as_str()) && !name.as_str().starts_with("access-control-")
}

/// Fields never passed on from an answer's trailer section: RFC 9110 §6.5.1 framing, routing and
/// authentication fields, and those a client acts on in the head (the gateway's `[headers]` rules see only the head).
const HEAD_ONLY: [&str; 22] = [
    "content-length",
    "content-type",
    "content-encoding",
    "content-range",
    "host",
    "trailer",
    "authorization",
    "www-authenticate",
    "proxy-authenticate",
    "set-cookie",
    "location",
    "cache-control",
    "expires",
    "age",
    "vary",
    "strict-transport-security",
    "content-security-policy",
    "x-frame-options",
    "x-content-type-options",
    "referrer-policy",
    "permissions-policy",
    "cross-origin-opener-policy",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

pub enum Parsed {
    Partial,
    /// A 1xx answer was read and discarded; the real one follows.
    Interim,
    Complete {
        status: StatusCode,
        headers: HeaderMap,
        fields: AnswerFields,
        framing: Framing,
        reusable: bool,
    },
}

/// Bit n: some field that parsing must look at by name (framing, hop-by-hop, `Date`) is n bytes long.
const LOOKED_AT_LENGTHS: u64 =
    headers_request::lengths_of(&headers_request::HOP_BY_HOP) | headers_request::lengths_of(&["content-length", "date"]);

/// Parses a response head from the front of `buf`, consuming it when complete. Header values share the head's
/// bytes (no copy).
pub fn parse_head(buf: &mut BytesMut, head_request: bool, rules: &headers_response::SecureHeaders) -> Result<Parsed, H1Error> {
    let mut slots = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut rsp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut rsp, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return Err(H1Error::HeadTooLarge),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(H1Error::Malformed("too many header fields")),
        Err(_) => return Err(H1Error::Malformed("unparsable head")),
    };
    let code = rsp.code.ok_or(H1Error::Malformed("no status"))?;
    // Classes 1xx-5xx only (RFC 9110 §15): "799" means nothing to a client.
    let status = StatusCode::from_u16(code).ok().filter(|_| code < 600).ok_or(H1Error::Malformed("bad status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(H1Error::UnexpectedUpgrade);
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let http11 = rsp.version == Some(1);
    // Where each name and value sits in the head, so they can share its bytes once it is split off.
    let base = buf.as_ptr() as usize;
    // A small array covers usual answers (zeroing one sized for MAX_HEADERS cost more than the rest of the parse).
    let mut few = [(0usize, 0usize, 0usize, 0usize); FEW_HEADERS];
    let mut many = Vec::new();
    let count = rsp.headers.len();
    let spans = if count <= FEW_HEADERS {
        &mut few[..count]
    } else {
        many.resize(count, (0, 0, 0, 0));
        &mut many[..]
    };
    for (span, h) in spans.iter_mut().zip(rsp.headers.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (n, n + h.name.len(), v, v + h.value.len());
    }
    let head = buf.split_to(len).freeze();
    let mut kept = Vec::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = !http11;
    let mut dated = false;
    // Values of `Connection` fields that name other fields (rare): those go too, through a map.
    let mut listing = Vec::new();
    // Only names of a length that some rule is about are looked at; the rest pass on as they are.
    let looked_at = LOOKED_AT_LENGTHS | rules.remove_lengths();
    for &(ns, ne, vs, ve) in spans.iter() {
        let raw_name = &head[ns..ne];
        if looked_at & (1 << raw_name.len().min(63)) != 0 {
            let name = headers_response::parse_name(raw_name).map_err(|_| H1Error::Malformed("bad header name"))?;
            let value = &head[vs..ve];
            if name == header::CONTENT_LENGTH {
                for item in value.split(|&b| b == b',') {
                    let n = parse_length(item.trim_ascii()).ok_or(H1Error::Malformed("bad content-length"))?;
                    if length.is_some_and(|l| l != n) {
                        return Err(H1Error::Malformed("differing content-length values"));
                    }
                    length = Some(n);
                }
                continue;
            } else if name == header::TRANSFER_ENCODING {
                // Only `chunked`, once: another coding would reach the client unlabelled once the hop-by-hop
                // Transfer-Encoding is removed, and a repeated `chunked` is invalid (RFC 9112 §7).
                if chunked || !value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(H1Error::Malformed("unsupported transfer-coding"));
                }
                chunked = true;
                continue;
            } else if name == header::CONNECTION {
                let mut others = false;
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        others = true;
                    }
                }
                if others {
                    listing.push(HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| H1Error::Malformed("bad header value"))?);
                }
                continue;
            }
            // The fields are end-to-end only (RFC 9110 §7.6.1): hop-by-hop ones are left out, and so are those
            // the answer rules would remove.
            if headers_request::is_hop_by_hop(&name) || headers_response::dropped_from_answer(&name, rules) {
                continue;
            }
            dated |= name == header::DATE;
        }
        let at = |i: usize| u16::try_from(i).map_err(|_| H1Error::HeadTooLarge);
        kept.push([at(ns)?, at(ne)?, at(vs)?, at(ve)?]);
    }
    let bodiless = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = match (bodiless, chunked, length) {
        (true, _, _) => Framing::Length(0),
        (false, true, _) => Framing::Chunked,
        (false, false, Some(n)) => Framing::Length(n),
        (false, false, None) => Framing::UntilClose,
    };
    // Both framings at once is a smuggling smell: never pass it on, never reuse the connection.
    let both = chunked && length.is_some();
    // `5, 5` or a repeated field is passed on as the one value it means; with chunking, not at all.
    let content_length = if chunked { None } else { length };
    let mut fields = AnswerFields::new(head, kept, content_length, dated);
    let mut headers = HeaderMap::new();
    if !listing.is_empty() {
        fields.move_into(&mut headers);
        for v in listing {
            headers.append(header::CONNECTION, v);
        }
        headers_request::strip_hop_by_hop(&mut headers, false);
    }
    // An answer that has no body by definition (HEAD, 204, 304) but declares one: a server that got HEAD or
    // 204 wrong may well send that body after all, late, and the next request on the connection would read it
    // as its answer. Not reused (HEAD answers with a length mostly; they are rare in APIs).
    let declares_body = chunked || length.is_some_and(|n| n > 0);
    let reusable = !(close || both || framing == Framing::UntilClose || bodiless && declares_body);
    Ok(Parsed::Complete { status, headers, fields, framing, reusable })
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0')))
}

/// The body of an upstream response, read from the upstream socket on demand. The connection goes back to the
/// pool the moment the last byte is read (if the exchange allows reuse); a body dropped early closes it. A wait
/// for more of it longer than `stall` cuts it: a stalled upstream must not hold a client forever.
pub struct ResponseBody {
    /// Boxed, like every pooled connection: it moves through the request's async layers and the pool, where a
    /// pointer moves cheaper than the connection's 112 bytes.
    conn: Option<Box<Conn>>,
    state: State,
    reusable: bool,
    pool: Arc<Pool>,
    stall: Duration,
    /// The current wait has its deadline set (the clock is read only when a read has to wait).
    waiting: bool,
}

enum State {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody").field("open", &self.conn.is_some()).finish()
    }
}

impl ResponseBody {
    pub fn new(conn: Box<Conn>, framing: Framing, reusable: bool, pool: &Arc<Pool>, stall: Duration) -> ResponseBody {
        let state = match framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => State::UntilClose,
        };
        let mut body = ResponseBody { conn: Some(conn), state, reusable, pool: pool.clone(), stall, waiting: false };
        if matches!(body.state, State::Length(0)) {
            body.finish();
        }
        body
    }

    /// The exchange is complete: pool the connection if it may be reused, else close it.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.reusable {
                self.pool.put(conn);
            }
        }
    }

    /// Takes the next frame out of what has been read, if there is one.
    fn next_frame(&mut self) -> Result<Option<Frame<Bytes>>, H1Error> {
        let Some(conn) = self.conn.as_mut() else { return Ok(None) };
        let buf = &mut conn.buf;
        match &mut self.state {
            State::Length(remaining) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buf.len());
                *remaining -= n as u64;
                let data = buf.split_to(n).freeze();
                if *remaining == 0 {
                    self.finish();
                }
                Ok(Some(Frame::data(data)))
            }
            State::UntilClose => Ok((!buf.is_empty()).then(|| Frame::data(buf.split().freeze()))),
            State::Chunked(dec) => match dec.decode(buf)? {
                Step::NeedMore => Ok(None),
                Step::Data(d) => Ok(Some(Frame::data(d))),
                Step::Trailers(t) => {
                    self.finish();
                    Ok(Some(Frame::trailers(t)))
                }
                Step::End => {
                    self.finish();
                    Ok(None)
                }
            },
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            match this.next_frame() {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            let read = match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Ready(read) => {
                    this.waiting = false;
                    read
                }
                Poll::Pending => {
                    if !this.waiting {
                        this.waiting = true;
                        conn.deadline.set(crate::h1::deadline::deadline_after(this.stall));
                    }
                    ready!(conn.deadline.poll_expired(cx));
                    tracing::warn!(after = ?this.stall, "an upstream's response body stalled; the stream is cut");
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Stalled(this.stall))));
                }
            };
            match read {
                Ok(0) if matches!(this.state, State::UntilClose) => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Closed)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.state) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), State::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}

/// Decodes `Transfer-Encoding: chunked` (RFC 9112 §7.1) strictly: CRLF line ends, bounded lines, no size
/// overflow.
#[derive(Debug, Default)]
pub(crate) enum ChunkedDecoder {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug)]
pub(crate) enum Step {
    NeedMore,
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

impl ChunkedDecoder {
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, H1Error> {
        loop {
            match self {
                ChunkedDecoder::Size => {
                    let Some(end) = line_end(buf)? else { return Ok(Step::NeedMore) };
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    *self = if size == 0 { ChunkedDecoder::Trailers } else { ChunkedDecoder::Data(size) };
                }
                ChunkedDecoder::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buf.len());
                    let left = *remaining - n as u64;
                    *self = if left == 0 { ChunkedDecoder::DataEnd } else { ChunkedDecoder::Data(left) };
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                ChunkedDecoder::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Malformed("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = ChunkedDecoder::Size;
                }
                ChunkedDecoder::Trailers => {
                    let mut slots = [httparse::EMPTY_HEADER; 32];
                    match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((n, fields))) => {
                            let mut trailers = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                let name =
                                    headers_response::parse_name(f.name.as_bytes()).map_err(|_| H1Error::Malformed("bad trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value).map_err(|_| H1Error::Malformed("bad trailer value"))?;
                                if !passes_as_trailer(&name) {
                                    continue;
                                }
                                trailers.append(name, value);
                            }
                            buf.advance(n);
                            // Framing and connection fields mean nothing in trailers (an HTTP/2 client resets
                            // the stream on them), and fields a client acts on in the head (cookies, security
                            // policy, redirects, challenges) must not slip past the answer rules as trailers.
                            crate::edge::headers_request::strip_hop_by_hop(&mut trailers, false);
                            *self = ChunkedDecoder::Done;
                            return Ok(if trailers.is_empty() { Step::End } else { Step::Trailers(trailers) });
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILER_BYTES => {
                            return Err(H1Error::Malformed("trailer section too large"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Step::NeedMore),
                        Err(_) => return Err(H1Error::Malformed("bad trailer section")),
                    }
                }
                ChunkedDecoder::Done => return Ok(Step::End),
            }
        }
    }
}

/// Finds the CRLF ending the line at the front of `buf`; a bare LF or an over-long line is an error.
fn line_end(buf: &[u8]) -> Result<Option<usize>, H1Error> {
    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(H1Error::Malformed("bare LF in chunk line")),
        None if buf.len() >= MAX_CHUNK_LINE => Err(H1Error::Malformed("chunk line too long")),
        None => Ok(None),
    }
}

/// `chunk-size [ chunk-ext ]`: hex digits, then nothing or (optional whitespace and) `;` extensions, ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(H1Error::Malformed("chunk size missing"));
    }
    let mut size: u64 = 0;
    for &d in &line[..digits] {
        let v = (d as char).to_digit(16).map_or(0, u64::from);
        size = size.checked_mul(16).and_then(|s| s.checked_add(v)).ok_or(H1Error::Malformed("chunk size overflows"))?;
    }
    let rest = &line[digits..];
    let ws = rest.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    let ext = &rest[ws..];
    let visible = |b: &u8| *b == b'\t' || (*b >= b' ' && *b != 0x7f);
    let ext_ok = rest.is_empty() || (ext.first() == Some(&b';') && ext.iter().all(visible));
    if !ext_ok {
        return Err(H1Error::Malformed("bad chunk extension"));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split_every: usize) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = None;
        for piece in input.chunks(split_every) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf)? {
                    Step::NeedMore => break,
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::Trailers(t) => trailers = Some(t),
                    Step::End => return Ok((out, trailers)),
                }
            }
        }
        Err(H1Error::Closed)
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let input = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nx-checksum: abc\r\nContent-Length: 9\r\nSet-Cookie: s=1\r\nStrict-Transport-Security: max-age=0\r\nAccess-Control-Allow-Origin: *\r\n\r\n";
        for split in [1, 2, 3, 7, input.len()] {
            let (body, trailers) = decode_all(input, split).unwrap();
            assert_eq!(body, b"hello world");
            let trailers = trailers.unwrap();
            assert_eq!(trailers["x-checksum"], "abc");
            assert!(!trailers.contains_key("content-length"), "framing fields are not passed on in trailers");
            assert_eq!(trailers.len(), 1, "fields a client acts on in the head are not passed on as trailers: {trailers:?}");
        }
        let (body, trailers) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap();
        assert_eq!(body, b"0123456789");
        assert!(trailers.is_none());
    }

    #[test]
    fn malformed_chunking_is_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..], // bare LF
            b"5\r\nhelloXY0\r\n\r\n",      // data not followed by CRLF
            b"fffffffffffffffff\r\n",      // 17 digits: overflow
            b"\r\n",                       // no size
            b"5 x\r\nhello\r\n",           // junk after the size
            b"-5\r\nhello\r\n",
            b"0x5\r\nhello\r\n",
        ] {
            assert!(decode_all(bad, 64).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE]].concat();
        assert!(decode_all(&long, 64).is_err());
    }

    fn head(raw: &[u8], head_request: bool) -> Result<Parsed, H1Error> {
        parse_head(&mut BytesMut::from(raw), head_request, &headers_response::SecureHeaders::defaults())
    }

    /// A complete answer, with its passed fields moved into its map.
    fn complete(raw: &[u8]) -> (StatusCode, HeaderMap, Framing, bool) {
        match head(raw, false).unwrap() {
            Parsed::Complete { status, mut headers, mut fields, framing, reusable } => {
                fields.move_into(&mut headers);
                (status, headers, framing, reusable)
            }
            _ => panic!("not complete"),
        }
    }

    fn passed(raw: &[u8], head_request: bool) -> (HeaderMap, AnswerFields) {
        match head(raw, head_request).unwrap() {
            Parsed::Complete { headers, fields, .. } => (headers, fields),
            _ => panic!("not complete"),
        }
    }

    fn lines(f: &AnswerFields) -> Vec<String> {
        f.iter().map(|(n, v)| format!("{}: {}", String::from_utf8_lossy(n), String::from_utf8_lossy(v))).collect()
    }

    #[test]
    fn end_to_end_fields_stay_lines_of_the_head_as_the_upstream_spelt_them() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Type: text/plain\r\n\
                    Content-Length: 5\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Custom:  v  1 \r\n\
                    ETag: \"x\"\r\nUpgrade: h2c\r\nProxy-Authenticate: Basic\r\nX-Request-Id: theirs\r\n\r\n";
        let (map, f) = passed(raw, false);
        assert!(map.is_empty(), "no map is built for a usual answer");
        assert_eq!(lines(&f), ["Date: Sun, 29 Nov 2026 10:00:00 GMT", "Content-Type: text/plain", "X-Custom: v  1", "ETag: \"x\""]);
        assert_eq!((f.content_length, f.dated), (Some(5), true));
        // A HEAD answer's length is the resource's, passed on though no body follows; chunked answers have none.
        assert_eq!(passed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).1.content_length, Some(9));
        let (_, f) = passed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n", false);
        assert_eq!((lines(&f), f.content_length, f.dated), (vec!["X-A: 1".to_string()], None, false));
        // Removing works in any case, and a removed Date is no longer counted.
        let (_, mut f) = passed(raw, false);
        f.remove(&header::DATE);
        f.remove(&header::ETAG);
        assert_eq!((lines(&f), f.dated), (vec!["Content-Type: text/plain".to_string(), "X-Custom: v  1".to_string()], false));
    }

    #[test]
    fn fields_a_connection_header_names_go_through_the_map() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: x-secret, close\r\nX-Secret: s\r\nX-Kept: k\r\nDate: d\r\nContent-Length: 0\r\n\r\n";
        let (map, f) = passed(raw, false);
        assert_eq!(f.iter().count(), 0);
        assert!(!f.dated && f.content_length.is_none(), "all in the map now");
        let mut names = map.keys().map(|k| k.as_str()).collect::<Vec<_>>();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "date", "x-kept"]);
    }

    #[test]
    fn what_httparse_admits_in_a_field_a_header_map_accepts() {
        // Passed fields are written out as httparse checked them, or moved into a map: both must agree on every
        // byte. Five-byte names are looked at by no rule (so only httparse checks them); values run past 32
        // bytes (httparse's vector path).
        let (mut names, mut values) = (0, 0);
        for b in 0..=255u8 {
            let name = [b'X', b'-', b, b'a', b'b'];
            // A colon ends the name there: a different field, not this byte in a name.
            let raw = [&b"HTTP/1.1 200 OK\r\n"[..], &name, b": v\r\n\r\n"].concat();
            if let (false, Ok(Parsed::Complete { mut headers, mut fields, .. })) = (b == b':', head(&raw, false)) {
                assert!(HeaderName::from_bytes(&name).is_ok(), "httparse admitted name byte {b:#x}");
                names += 1;
                assert_eq!(fields.iter().count(), 1, "name byte {b:#x}");
                fields.move_into(&mut headers);
                assert_eq!(headers.len(), 1, "name byte {b:#x}");
            }
            let value = [&[b'a'; 40][..], &[b, b'z']].concat();
            let raw = [&b"HTTP/1.1 200 OK\r\nX-A: "[..], &value, b"\r\n\r\n"].concat();
            if let Ok(Parsed::Complete { mut headers, mut fields, .. }) = head(&raw, false) {
                assert!(HeaderValue::from_bytes(&value).is_ok(), "httparse admitted value byte {b:#x}");
                values += 1;
                assert_eq!(fields.iter().next().map(|(_, v)| v.len()), Some(42), "value byte {b:#x}");
                fields.move_into(&mut headers);
                assert_eq!(headers.len(), 1, "value byte {b:#x}");
            }
        }
        // Token characters (RFC 9110 §5.6.2); tab, visible ASCII, space and obs-text.
        assert_eq!((names, values), (77, 1 + 95 + 128));
        assert_eq!(LOOKED_AT_LENGTHS & (1 << 5), 0, "five-byte names must stay unlooked-at for this test");
    }

    #[test]
    fn fields_named_by_a_connection_value_with_obs_text_are_left_out() {
        // Found by fuzzing (fuzz target h1_answer): `X-Secret` reached the client.
        let raw = b"HTTP/1.1 200 OK\r\nConnection: x-secret, cl\xff\xffose\r\nX-Secret: s\r\nX-Kept: k\r\nContent-Length: 0\r\n\r\n";
        let (_, h, _, _) = complete(raw);
        let mut names = h.keys().map(|k| k.as_str()).collect::<Vec<_>>();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (s, h, f, r) = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\n");
        assert_eq!((s, f, r), (StatusCode::OK, Framing::Length(5), true));
        assert_eq!(h["x-a"], "b");
        assert_eq!(complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").2, Framing::Chunked);
        assert_eq!(complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n").2, Framing::Chunked);
        let (_, _, f, r) = complete(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((f, r), (Framing::UntilClose, false));
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").3);
        assert!(!complete(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").3);
        assert_eq!(complete(b"HTTP/1.1 204 No Content\r\n\r\n").2, Framing::Length(0));
        let (_, h, f, _) = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!((f, h.get_all("content-length").iter().count()), (Framing::Length(5), 1));
        assert_eq!(h["content-length"], "5");
        match head(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).unwrap() {
            Parsed::Complete { framing, fields, .. } => {
                assert_eq!(framing, Framing::Length(0));
                assert_eq!(fields.content_length, Some(9));
            }
            _ => panic!("HEAD answer not complete"),
        }
    }

    #[test]
    fn fields_the_answer_rules_remove_are_left_out_as_the_head_is_parsed() {
        let raw = b"HTTP/1.1 200 OK\r\nServer: up/1.0\r\nX-Request-Id: upstream\r\nX-Powered-By: php\r\nDate: d\r\n\
                    X-Keep: k\r\nContent-Length: 0\r\n\r\n";
        let (_, h, _, _) = complete(raw);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["date", "x-keep", "content-length"]);
        // With the rules' `remove` emptied, only the upstream's request id still goes.
        let d = headers_response::SecureHeaders::defaults();
        let keep_all = headers_response::SecureHeaders::new(d.set().to_vec(), d.hsts().cloned(), Vec::new(), false);
        match parse_head(&mut BytesMut::from(&raw[..]), false, &keep_all).unwrap() {
            Parsed::Complete { mut headers, mut fields, .. } => {
                fields.move_into(&mut headers);
                assert_eq!(headers["server"], "up/1.0");
                assert_eq!(headers["x-powered-by"], "php");
                assert!(!headers.contains_key("x-request-id"));
            }
            _ => panic!("not complete"),
        }
    }

    #[test]
    fn both_framings_are_not_passed_on_and_the_connection_not_reused() {
        let (_, h, f, r) = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((f, r), (Framing::Chunked, false));
        assert!(!h.contains_key("content-length"));
    }

    #[test]
    fn bad_heads_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(head(bad, false).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn interim_answers_are_skipped() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[..]);
        let rules = headers_response::SecureHeaders::defaults();
        assert!(matches!(parse_head(&mut buf, false, &rules).unwrap(), Parsed::Interim));
        assert!(matches!(parse_head(&mut buf, false, &rules).unwrap(), Parsed::Complete { status: StatusCode::OK, .. }));
        assert!(buf.is_empty());
    }
}
