//! The client side of an HTTP/1.1 connection, served without hyper for the common case.
//!
//! A request without a body and without an upgrade (most API traffic) is parsed here with httparse, its header
//! values sharing the bytes read, answered by the Gateway, and its response written with a single write when it
//! fits. Anything else is handed to hyper together with the bytes already read, and hyper keeps the connection
//! from then on: HTTP/1.0, `Content-Length`, `Transfer-Encoding`, `Expect`, `Upgrade`, CONNECT, a target that is
//! not origin-form, and any head that is malformed, too large or has too many fields. hyper's answers to hostile
//! heads (400, 431, the smuggling refusals) therefore stay the only ones; this path only ever sees heads that
//! httparse accepted whole and that carry no framing of their own.
//!
//! Time limits match the hyper path: the first head must be complete within `header_read_timeout` of accept, a
//! later one within `header_read_timeout` of its first byte, and an idle keep-alive connection is closed after
//! `idle_timeout`, on one `Deadline` per connection, so a request touches no timer. A client that
//! closes its side while its request is being served cancels the request (hyper's rule with half-close off).
//! An idle connection holds no buffer: reads land on the stack, only a request's bytes are kept, and both buffers
//! are let go once its answer is written.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::edge::headers_response::Additions;
use crate::h1::deadline::{deadline_after, Deadline};

/// More header fields than this go to hyper (which allows 100, then answers 431).
const MAX_HEADERS: usize = 64;
/// One read's worth, taken on the stack.
const READ_CHUNK: usize = 4096;
/// Response bytes gathered before a write; a larger body frame is written on its own.
const WRITE_BATCH: usize = 16 * 1024;
/// Room taken for an answer's head (and a small body) at once, rather than grown field by field.
const RESPONSE_HEAD: usize = 2048;

/// The connection's time and size bounds, read once at accept (they are restart-only settings).
#[derive(Clone, Copy)]
pub struct Bounds {
    /// A head must be complete this long after its first byte (the first head: after accept).
    pub header_read_timeout: Duration,
    /// A connection waiting for its next head is closed after this.
    pub keep_alive: Duration,
    /// A write the client takes none of for this long closes the connection.
    pub send_stall: Duration,
    pub max_header_bytes: usize,
}

/// How a connection left this module.
pub enum Ended<I> {
    Closed,
    /// hyper takes over: `read` holds the bytes read and not yet served, `deadline` is when the pending head
    /// must be complete, `served` whether a request was served here first (then the connection is HTTP/1 for
    /// good: an HTTP/2 preface is only a connection's first bytes, RFC 9113 §3.3).
    HandOver {
        io: I,
        read: Bytes,
        deadline: Instant,
        served: bool,
    },
}

/// What a request asked of its connection.
#[derive(Clone, Copy, Default)]
pub struct Meta {
    pub(crate) head: bool,
    /// `Connection: close`: the connection ends after this answer.
    pub close: bool,
    pub(crate) trailers: bool,
}

#[allow(clippy::large_enum_variant)] // returned once per request and taken apart at once, never stored
pub(crate) enum Parsed {
    Request(Request<()>, Meta),
    Partial,
    HandOver,
}

/// One HTTP/1.1 connection served by this codec: reads heads, writes answers, hands over to hyper.
pub struct Conn<I> {
    io: I,
    /// Bytes read and not yet parsed; empty and unallocated while the connection idles.
    buf: BytesMut,
    out: Vec<u8>,
    limits: Bounds,
    /// When waiting for the next head ends the connection.
    deadline: Deadline,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    /// Starts serving a new connection: its first head is due within `header_read_timeout`.
    pub fn new(io: I, limits: Bounds) -> Conn<I> {
        let deadline = Deadline::new(deadline_after(limits.header_read_timeout));
        Conn { io, buf: BytesMut::new(), out: Vec::new(), limits, deadline }
    }

    /// Readies the connection for its next head once an answer is written: a pipelined head already begun is
    /// timed from now, otherwise the connection idles. (From after the write: a streamed answer may take longer
    /// than either wait.)
    pub fn await_next_head(&mut self) {
        // An idle connection holds no buffer: a client that keeps its connection open for minutes (mobile, IoT)
        // costs the task and the socket, not a request's worth of bytes. The next request allocates afresh.
        self.out = Vec::new();
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        let wait = if self.buf.is_empty() { self.limits.keep_alive } else { self.limits.header_read_timeout };
        self.deadline.set(deadline_after(wait));
    }

    /// Closes the write side (after an answer that ends the connection).
    pub async fn close(&mut self) {
        let _ = self.io.shutdown().await;
    }
}

/// The drain signal as a connection waiting for its next head watches it: polled until it has registered the
/// task's waker, so a shutdown wakes the task and `draining` says why.
pub struct Shutdown<'a, F> {
    changed: Pin<&'a mut F>,
    draining: &'a AtomicBool,
    registered: bool,
}

impl<'a, F: Future> Shutdown<'a, F> {
    /// Watches `changed` (a future that completes when the drain is signalled) and the `draining` flag.
    pub fn new(changed: Pin<&'a mut F>, draining: &'a AtomicBool) -> Shutdown<'a, F> {
        Shutdown { changed, draining, registered: false }
    }

    fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn poll_signalled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.is_draining() {
            return true;
        }
        if !self.registered && self.changed.as_mut().poll(cx).is_ready() {
            self.registered = true;
            return self.is_draining();
        }
        self.registered = true;
        false
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    /// Reads until a whole head is buffered. None: the connection ends (closed by the client, timed out, or
    /// idle during a shutdown); Some(Err): hyper must take it (with the head's own deadline set).
    pub async fn read_head<F: Future>(&mut self, shutdown: &mut Shutdown<'_, F>, first: bool) -> Option<Result<(Request<()>, Meta), ()>> {
        let mut timed = first || !self.buf.is_empty();
        // A head can only have completed if a line ended in what was just read: a client dribbling its head a
        // byte at a time costs one parse per line, not one per byte.
        let mut line_ended = !self.buf.is_empty();
        loop {
            if !self.buf.is_empty() && !timed {
                // The head's first bytes are here: from now on its own deadline applies (here or in hyper).
                self.deadline.set(deadline_after(self.limits.header_read_timeout));
                timed = true;
            }
            if line_ended {
                match parse(&mut self.buf, self.limits.max_header_bytes) {
                    Parsed::Request(req, meta) => return Some(Ok((req, meta))),
                    Parsed::HandOver => return Some(Err(())),
                    Parsed::Partial => {}
                }
            }
            if self.buf.len() > self.limits.max_header_bytes {
                return Some(Err(()));
            }
            let idle = self.buf.is_empty();
            let before = self.buf.len();
            let read = std::future::poll_fn(|cx| {
                // Bytes already sent are read first: a request that arrived before the drain is served.
                if let Poll::Ready(r) = self.poll_fill(cx) {
                    return Poll::Ready(r);
                }
                if idle && shutdown.poll_signalled(cx) {
                    return Poll::Ready(Ok(0));
                }
                if self.deadline.poll_expired(cx).is_ready() {
                    return Poll::Ready(Ok(0));
                }
                Poll::Pending
            })
            .await;
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => line_ended = self.buf[before..].contains(&b'\n'),
            }
        }
    }

    /// Runs the request while watching the client: a close cancels it. Once bytes of a next request are
    /// buffered the client is no longer read (hyper's rule: a half-close after pipelined requests still gets
    /// every answer).
    pub async fn serve_request<T>(&mut self, mut handling: Pin<&mut impl Future<Output = T>>) -> Option<T> {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(rsp) = handling.as_mut().poll(cx) {
                return Poll::Ready(Some(rsp));
            }
            if self.client_left(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await
    }

    /// True once the client has closed (or broken) its side while nothing of a next request is buffered.
    /// Otherwise the task is woken when the client sends or closes, or more is buffered.
    fn client_left(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        matches!(self.poll_fill(cx), Poll::Ready(Ok(0) | Err(_)))
    }

    /// One read into the stack, appended to the buffer. Ok(0) is the client's close.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut rb = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        self.buf.extend_from_slice(rb.filled());
        Poll::Ready(Ok(rb.filled().len()))
    }

    /// Gives the connection to hyper with the bytes read and not yet served; `served`: a request was served here.
    pub fn hand_over(self, served: bool) -> Ended<I> {
        Ended::HandOver { io: self.io, read: self.buf.freeze(), deadline: self.deadline.at(), served }
    }

    /// Writes the response; Ok(true) when the connection can carry another request.
    pub async fn write_response<B>(&mut self, rsp: Response<B>, additions: &Additions<'_>, meta: Meta, keep_alive: bool) -> io::Result<bool>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let (parts, mut body) = rsp.into_parts();
        let fields = Fields { map: &parts.headers, additions: Some(additions) };
        self.out.reserve(RESPONSE_HEAD);
        let (framing, close_asked) = encode_head(&mut self.out, parts.status, fields, &body, meta, keep_alive);
        let keep_alive = keep_alive && !close_asked;
        let mut last_chunk_written = false;
        let mut remaining = match framing {
            Framing::None => {
                drop(body);
                self.flush().await?;
                return Ok(keep_alive);
            }
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        };
        loop {
            // Write what is gathered only when the body has nothing more ready.
            let next = match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    self.flush().await?;
                    // A long poll or an event stream: a client that leaves meanwhile ends it (and the upstream's).
                    let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(next) => Poll::Ready(Some(next)),
                        Poll::Pending if self.client_left(cx) => Poll::Ready(None),
                        Poll::Pending => Poll::Pending,
                    })
                    .await;
                    match next {
                        Some(next) => next,
                        None => return Ok(false),
                    }
                }
            };
            let frame = match next {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    // The client sees a cut response: a short body or a missing last chunk.
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    self.flush().await?;
                    return Ok(false);
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    match remaining.as_mut() {
                        Some(left) => {
                            if data.len() as u64 > *left {
                                tracing::debug!("response body longer than its Content-Length; closing the connection");
                                let fits = usize::try_from(*left).unwrap_or(usize::MAX);
                                self.write_data(&data[..fits]).await?;
                                self.flush().await?;
                                return Ok(false);
                            }
                            *left -= data.len() as u64;
                            self.write_data(&data).await?;
                        }
                        None => {
                            push_chunk_size(&mut self.out, data.len());
                            self.write_data(&data).await?;
                            self.out.extend_from_slice(b"\r\n");
                        }
                    }
                }
                Err(frame) => {
                    // Trailers only where the client said it takes them, and only chunked can carry them.
                    if let (None, true, Ok(trailers)) = (remaining, meta.trailers, frame.into_trailers()) {
                        self.out.extend_from_slice(b"0\r\n");
                        push_fields(&mut self.out, &trailers);
                        self.out.extend_from_slice(b"\r\n");
                        last_chunk_written = true;
                        break;
                    }
                }
            }
        }
        match remaining {
            // A body that ended before its declared length: only a close tells the client.
            Some(left) if left > 0 => {
                self.flush().await?;
                return Ok(false);
            }
            Some(_) => {}
            None if last_chunk_written => {}
            None => self.out.extend_from_slice(b"0\r\n\r\n"),
        }
        self.flush().await?;
        Ok(keep_alive)
    }

    async fn write_data(&mut self, data: &[u8]) -> io::Result<()> {
        if self.out.len() + data.len() <= WRITE_BATCH {
            self.out.extend_from_slice(data);
            return Ok(());
        }
        self.flush().await?;
        write_bounded(&mut self.io, &mut self.deadline, self.limits.send_stall, Some(data)).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            write_bounded(&mut self.io, &mut self.deadline, self.limits.send_stall, Some(&self.out)).await?;
            self.out.clear();
        }
        write_bounded(&mut self.io, &mut self.deadline, self.limits.send_stall, None).await
    }
}

/// Writes all of `data` (None: flushes), unless the client takes none of it for `stall`: a client that stops
/// reading must not hold its connection, and the upstream's, for ever (nginx's `send_timeout`). The connection's
/// deadline is free while an answer is written; the wait for the next head sets it anew.
async fn write_bounded<I: AsyncWrite + Unpin>(io: &mut I, deadline: &mut Deadline, stall: Duration, data: Option<&[u8]>) -> io::Result<()> {
    let mut written = 0;
    let mut waiting = false;
    std::future::poll_fn(|cx| {
        let polled = loop {
            match data {
                Some(data) if written < data.len() => match Pin::new(&mut *io).poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) => break Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        waiting = false;
                    }
                    Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                    Poll::Pending => break Poll::Pending,
                },
                Some(_) => break Poll::Ready(Ok(())),
                None => break Pin::new(&mut *io).poll_flush(cx),
            }
        };
        if polled.is_ready() {
            return polled;
        }
        if !waiting {
            waiting = true;
            deadline.set(deadline_after(stall));
        }
        ready!(deadline.poll_expired(cx));
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client took none of the answer within idle_timeout")))
    })
    .await
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Encodes the status line and fields (adding `Date`, the framing and `Connection: close` as needed) and says
/// how the body is framed. As hyper does: no body for HEAD, 1xx, 204 and 304; a declared `Content-Length` is
/// kept; otherwise an exact size becomes one, and an unknown size is chunked.
/// An answer's header fields: its map, then what the gateway adds without inserting it there.
#[derive(Clone, Copy)]
struct Fields<'a> {
    map: &'a HeaderMap,
    additions: Option<&'a Additions<'a>>,
}

/// Writes the status line and fields. Returns the body's framing and whether the answer asks to close.
fn encode_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    fields: Fields<'_>,
    body: &impl http_body::Body,
    meta: Meta,
    keep_alive: bool,
) -> (Framing, bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    // What the framing depends on is found in the one pass that writes the fields.
    let mut declared: Option<Option<u64>> = None;
    let mut dated = false;
    let mut close_asked = false;
    for (name, value) in fields.map {
        // Framing is ours to write; a stray Transfer-Encoding (never forwarded) would contradict it.
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            // Once, and only what the first value parses as (repeats of it are the same value).
            if declared.is_some() {
                continue;
            }
            let n = value.to_str().ok().and_then(|v| v.parse::<u64>().ok());
            declared = Some(n);
            if bodiless || n.is_none() {
                continue;
            }
        } else if name == header::DATE {
            dated = true;
        } else if name == header::CONNECTION {
            close_asked |= has_token(value.as_bytes(), b"close");
        }
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(a) = fields.additions {
        let passed = &a.passed;
        for (name, value) in passed.iter() {
            push_field(out, name, value);
        }
        dated |= passed.dated;
        if let (None, Some(n)) = (declared, passed.content_length) {
            declared = Some(Some(n));
            if !bodiless {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        a.secure.write_lines(out);
        push_field(out, crate::edge::headers_request::request_id_header().as_str().as_bytes(), a.request_id.as_bytes());
    }
    if !dated {
        date::push(out);
    }
    if !keep_alive && !close_asked {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let declared = declared.flatten();
    let framing = if bodiless || meta.head {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    let framing = match framing {
        Framing::Length(0) => Framing::None,
        f => f,
    };
    (framing, close_asked)
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn push_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        push_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// True when the comma-separated list `value` holds `token` (case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Parses one request head from the front of `buf`, taking its bytes out only when the request is ours. Header
/// values and the target share the bytes read (no copy).
pub(crate) fn parse(buf: &mut BytesMut, max_head: usize) -> Parsed {
    // Split off rather than taken: slices of a split buffer share it by reference count (no allocation to promote
    // it per request), and the buffer keeps its allocation for the next read.
    let read = buf.split().freeze();
    match parse_frozen(&read, max_head) {
        Ok((req, meta, len)) => {
            if len < read.len() {
                // Pipelined bytes: copied out so the next read does not grow the shared head.
                *buf = BytesMut::from(&read[len..]);
            }
            Parsed::Request(req, meta)
        }
        Err(not_ours) => {
            // Once the empty remainder lets go of the allocation nothing else refers to it: the bytes go back as
            // they were, without a copy.
            *buf = BytesMut::new();
            *buf = read.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            match not_ours {
                NotOurs::Partial => Parsed::Partial,
                NotOurs::HandOver => Parsed::HandOver,
            }
        }
    }
}

enum NotOurs {
    Partial,
    HandOver,
}

fn parse_frozen(read: &Bytes, max_head: usize) -> Result<(Request<()>, Meta, usize), NotOurs> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(read, &mut fields) {
        // Too large, though complete: hyper answers 431.
        Ok(httparse::Status::Complete(len)) if len > max_head => return Err(NotOurs::HandOver),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Err(NotOurs::Partial),
        Err(_) => return Err(NotOurs::HandOver),
    };
    let (Some(method), Some(path), Some(1)) = (req.method, req.path, req.version) else {
        return Err(NotOurs::HandOver);
    };
    if method == "CONNECT" || !path.starts_with('/') {
        return Err(NotOurs::HandOver);
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| NotOurs::HandOver)?;
    let uri = Uri::from_maybe_shared(read.slice_ref(path.as_bytes())).map_err(|_| NotOurs::HandOver)?;
    let mut meta = Meta { head: method == Method::HEAD, ..Meta::default() };
    // Room for the identity fields `prepare_upstream` inserts (X-Forwarded-* and the request id are written after
    // the map), so it never regrows.
    let mut headers = HeaderMap::with_capacity(req.headers.len() + 5);
    for field in req.headers.iter() {
        let name = crate::edge::headers_response::parse_name(field.name.as_bytes()).map_err(|_| NotOurs::HandOver)?;
        // Bodies, upgrades and expectations are hyper's to frame.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return Err(NotOurs::HandOver);
        }
        if name == header::CONNECTION && has_token(field.value, b"close") {
            meta.close = true;
        }
        if name == header::TE && has_token(field.value, b"trailers") {
            meta.trailers = true;
        }
        let value = HeaderValue::from_maybe_shared(read.slice_ref(field.value)).map_err(|_| NotOurs::HandOver)?;
        headers.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok((req, meta, len))
}

/// The `Date` field, rendered once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static RENDERED: RefCell<(u64, Vec<u8>)> = const { RefCell::new((0, Vec::new())) };
    }

    pub fn push(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        RENDERED.with_borrow_mut(|(at, line)| {
            if *at != secs || line.is_empty() {
                line.clear();
                line.extend_from_slice(b"date: ");
                line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
                line.extend_from_slice(b"\r\n");
                *at = secs;
            }
            out.extend_from_slice(line);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::{Body, RequestBody};

    fn parsed(raw: &str) -> Parsed {
        parse(&mut BytesMut::from(raw), 1 << 20)
    }

    #[test]
    fn a_plain_get_is_ours_with_fields_in_order() {
        let mut buf =
            BytesMut::from("GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nConnection: keep-alive, Close\r\n\r\nGET /next");
        let Parsed::Request(req, meta) = parse(&mut buf, 1 << 20) else { panic!("not ours") };
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/a/b");
        assert_eq!(req.uri().query(), Some("x=1"));
        assert_eq!(req.headers().get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert!(meta.close && !meta.head && !meta.trailers);
        assert_eq!(&buf[..], b"GET /next", "a pipelined head stays buffered");
        assert!(matches!(parse(&mut buf, 1 << 20), Parsed::Partial));
    }

    #[test]
    fn framing_upgrades_odd_targets_and_bad_heads_go_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nA : b\r\n\r\n",
            "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",
            "GET /a|b^` HTTP/1.1\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw);
            assert!(matches!(parse(&mut buf, 1 << 20), Parsed::HandOver), "{raw:?}");
            assert_eq!(&buf[..], raw.as_bytes(), "bytes kept whole for hyper: {raw:?}");
        }
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(MAX_HEADERS + 1));
        assert!(matches!(parsed(&many), Parsed::HandOver));
    }

    #[test]
    fn the_read_buffer_is_reused_in_place_once_a_request_is_gone() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n");
        let start = buf.as_ptr();
        let Parsed::Request(req, _) = parse(&mut buf, 1 << 20) else { panic!("not ours") };
        // The buffer still holds its allocation, just past the head the request now refers to.
        assert_eq!(buf.as_ptr(), start.wrapping_add(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n".len()));
        drop(req);
        buf.extend_from_slice(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n");
        assert_eq!(buf.as_ptr(), start, "the next head landed in the same allocation");
        let Parsed::Request(req, _) = parse(&mut buf, 1 << 20) else { panic!("not ours") };
        assert_eq!((req.uri().path(), req.headers()["host"].as_bytes()), ("/b", &b"x"[..]));
        // A partial head after a request stays whole.
        buf.extend_from_slice(b"GET /c HTTP/1.1\r\nho");
        assert!(matches!(parse(&mut buf, 1 << 20), Parsed::Partial));
        assert_eq!(&buf[..], b"GET /c HTTP/1.1\r\nho");
    }

    #[test]
    fn heads_are_framed_like_hyper_frames_them() {
        let meta = Meta::default();
        let mut out = Vec::new();
        let map = HeaderMap::new();
        let (f, _) = encode_head(&mut out, StatusCode::OK, Fields { map: &map, additions: None }, &Body::full("hi"), meta, true);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(f, Framing::Length(2));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\ndate: ") && text.ends_with("content-length: 2\r\n\r\n"), "{text}");

        let mut out = Vec::new();
        let empty = Body::limited(RequestBody::Empty, 1, Default::default());
        let mut h = HeaderMap::new();
        h.insert(header::DATE, HeaderValue::from_static("x"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        let (f, _) = encode_head(&mut out, StatusCode::NOT_FOUND, Fields { map: &h, additions: None }, &empty, meta, false);
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 404 Not Found\r\ndate: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(f, Framing::None);

        for (status, m) in [(StatusCode::NO_CONTENT, meta), (StatusCode::OK, Meta { head: true, ..meta })] {
            let mut out = Vec::new();
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
            let (f, _) = encode_head(&mut out, status, Fields { map: &h, additions: None }, &Body::empty(), m, true);
            assert_eq!(f, Framing::None);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.contains("content-length: 5"), m.head, "{text}");
        }
    }

    #[test]
    fn an_upstreams_fields_are_written_as_they_came_and_their_length_frames_the_answer() {
        let none = crate::edge::headers_response::SecureHeaders::new(Vec::new(), None, Vec::new(), false);
        for m in [Meta::default(), Meta { head: true, ..Meta::default() }] {
            let mut passed = crate::edge::headers_response::AnswerFields::from_pairs(&[("Date", "d"), ("Content-Type", "text/plain")]);
            passed.content_length = Some(3);
            let secure = crate::edge::headers_response::prepare_answer(&mut HeaderMap::new(), &mut passed, &none, false, false);
            let a = Additions { passed, secure, request_id: HeaderValue::from_static("r1") };
            let mut out = Vec::new();
            // The body's own size is not what frames it: the upstream's length is.
            let body = Body::limited(RequestBody::Empty, 1, Default::default());
            let (f, _) = encode_head(&mut out, StatusCode::OK, Fields { map: &HeaderMap::new(), additions: Some(&a) }, &body, m, true);
            let expected = "HTTP/1.1 200 OK\r\nDate: d\r\nContent-Type: text/plain\r\ncontent-length: 3\r\nx-request-id: r1\r\n\r\n";
            assert_eq!(String::from_utf8(out).unwrap(), expected);
            assert_eq!(f, if m.head { Framing::None } else { Framing::Length(3) });
        }
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, want) in [(0, "0\r\n"), (10, "a\r\n"), (4096, "1000\r\n"), (0x1f2e, "1f2e\r\n")] {
            let mut out = Vec::new();
            push_chunk_size(&mut out, n);
            assert_eq!(out, want.as_bytes());
        }
    }
}
