//! The lean HTTP/1.1 exchange with a plain-http upstream, for requests without a body (most API reads).
//!
//! The request head is encoded straight from the routed path and the prepared headers; the answer is parsed and
//! its body read on demand by `h1_answer`: no connection task, no channels, no pool-wide lock. A connection is
//! reused only after a complete, cleanly framed HTTP/1.1 exchange that left no stray bytes. Requests with a body,
//! upgrades, HTTP/2 and https upstreams go through hyper's client (`upstream::forward`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, Version};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::edge::headers_request;
use crate::edge::headers_response;
use crate::edge::headers_response::AnswerFields;
use crate::h1::answer::{parse_head, Parsed, ResponseBody, MAX_HEAD_BYTES};
use crate::h1::pool::{Conn, Pool, READ_CHUNK};

/// 1xx answers skipped before the real one; more is a broken or hostile upstream.
const MAX_INTERIM: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect failed: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed before the response was complete")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("response head over {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("upstream switched protocols without being asked to")]
    UnexpectedUpgrade,
    #[error("no response head before the deadline")]
    Timeout,
    #[error("the response body stalled: no bytes for {0:?}")]
    Stalled(Duration),
}

/// The lean client of one upstream: where to connect, and its idle connections.
pub struct Client {
    pool: Arc<Pool>,
    connect_to: String,
    authority: HeaderValue,
    connect_timeout: Duration,
}

/// What is sent: the method, the routed path, the query as forwarded, the prepared headers, and the `Host`
/// (None: the upstream's authority).
pub struct Head<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Written after `headers` (none of their names is in it).
    pub additions: &'a headers_request::UpstreamFields<'a>,
    pub host: Option<&'a HeaderValue>,
    /// The route's answer rules: fields they remove are left out of the answer as it is parsed.
    pub answer_rules: &'a headers_response::SecureHeaders,
}

/// True when path and query can go into a request line as they are (they always can after routing: this only
/// guards the encoder against ever writing a space or a line break into the head).
pub fn is_safe_target(path: &str, query: Option<&str>) -> bool {
    let ok = |s: &str| s.bytes().all(|b| b > b' ' && b != 0x7f);
    path.starts_with('/') && ok(path) && query.is_none_or(ok)
}

/// An upstream's answer: its status and body, and its end-to-end fields as lines of its head (the map is empty
/// unless the answer's `Connection` named fields to remove).
pub type Answer = (Response<ResponseBody>, AnswerFields);

enum Attempt {
    /// The reused connection was found closed before any response byte: safe to retry an idempotent request.
    Stale(H1Error),
    Failed(H1Error),
}

impl Client {
    /// Returns the client of a plain-http target: connections go to `connect`, requests name `host` (the same
    /// authority, or the name `connect` is one address of). None if `host` makes no `Host` value.
    pub fn new(connect: &http::uri::Authority, host: &http::uri::Authority, connect_timeout: Duration) -> Option<Client> {
        let bracket = |h: &str| if h.contains(':') && !h.starts_with('[') { format!("[{h}]") } else { h.to_string() };
        let connect_to = format!("{}:{}", bracket(connect.host()), connect.port_u16().unwrap_or(80));
        // Host and port only: userinfo in the configured URL never goes into a header.
        let name = bracket(host.host());
        let authority = match host.port_u16() {
            Some(p) => HeaderValue::from_str(&format!("{name}:{p}")),
            None => HeaderValue::from_str(&name),
        };
        Some(Client { pool: Pool::new(Duration::from_secs(90), 1024), connect_to, authority: authority.ok()?, connect_timeout })
    }

    /// Sends a bodiless request and returns the response once its head has arrived, within `timeout` of `now`
    /// (the caller's clock reading, taken just before). An idempotent request whose pooled connection turns out
    /// to be closed is retried once on a new connection.
    pub async fn send(&self, head: &Head<'_>, timeout: Duration, now: std::time::Instant) -> Result<Answer, H1Error> {
        let deadline = crate::h1::deadline::later(now.into(), timeout);
        if let Some(conn) = self.pool.take(now) {
            match self.exchange(conn, head, deadline, timeout).await {
                Ok(rsp) => return Ok(rsp),
                Err(Attempt::Stale(e)) if !is_idempotent(head.method) => return Err(e),
                Err(Attempt::Stale(e)) => tracing::debug!(error = %e, "pooled upstream connection was closed; retrying on a new one"),
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        let conn = tokio::time::timeout_at(deadline, self.connect()).await.map_err(|_| H1Error::Timeout)??;
        self.exchange(conn, head, deadline, timeout).await.map_err(|a| match a {
            Attempt::Stale(e) | Attempt::Failed(e) => e,
        })
    }

    async fn connect(&self) -> Result<Box<Conn>, H1Error> {
        let io = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.connect_to.as_str())).await {
            Err(_) => return Err(H1Error::ConnectTimeout(self.connect_timeout)),
            Ok(Err(e)) => return Err(H1Error::Connect(e)),
            Ok(Ok(io)) => io,
        };
        let _ = io.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&keepalive);
        Ok(Box::new(Conn::new(io)))
    }

    /// `stall` bounds each wait for more of the body once the head is in.
    async fn exchange(
        &self,
        mut conn: Box<Conn>,
        head: &Head<'_>,
        deadline: tokio::time::Instant,
        stall: Duration,
    ) -> Result<Answer, Attempt> {
        encode_head(&mut conn.head, head, &self.authority);
        conn.deadline.set(deadline);
        match write_head(&mut conn).await {
            Ok(()) => {}
            Err(e @ H1Error::Timeout) => return Err(Attempt::Failed(e)),
            Err(e) => return Err(Attempt::Stale(e)),
        }
        let mut received = false;
        let mut interim = 0;
        // A head can only have completed if a line ended in what was just read: an upstream dribbling its head a
        // byte at a time costs one parse per line, not one per byte.
        let mut line_ended = true;
        loop {
            received |= !conn.buf.is_empty();
            if !conn.buf.is_empty() && line_ended {
                match parse_head(&mut conn.buf, head.method == Method::HEAD, head.answer_rules).map_err(Attempt::Failed)? {
                    Parsed::Interim if interim >= MAX_INTERIM => return Err(Attempt::Failed(H1Error::Malformed("too many 1xx answers"))),
                    Parsed::Interim => {
                        interim += 1;
                        continue;
                    }
                    Parsed::Partial if conn.buf.len() > MAX_HEAD_BYTES => return Err(Attempt::Failed(H1Error::HeadTooLarge)),
                    Parsed::Partial => {}
                    Parsed::Complete { status, headers, fields, framing, reusable } => {
                        let body = ResponseBody::new(conn, framing, reusable, &self.pool, stall);
                        let mut rsp = Response::new(body);
                        *rsp.status_mut() = status;
                        *rsp.headers_mut() = headers;
                        *rsp.version_mut() = Version::HTTP_11;
                        return Ok((rsp, fields));
                    }
                }
            }
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(Attempt::Failed(H1Error::HeadTooLarge));
            }
            let before = conn.buf.len();
            match read_some(&mut conn).await {
                Ok(0) if received => return Err(Attempt::Failed(H1Error::Closed)),
                Ok(0) => return Err(Attempt::Stale(H1Error::Closed)),
                Ok(_) => line_ended = conn.buf[before..].contains(&b'\n'),
                Err(e @ H1Error::Timeout) => return Err(Attempt::Failed(e)),
                Err(e) if received => return Err(Attempt::Failed(e)),
                Err(e) => return Err(Attempt::Stale(e)),
            }
        }
    }
}

/// Writes the encoded request head, unless the deadline passes first.
async fn write_head(conn: &mut Conn) -> Result<(), H1Error> {
    let mut written = 0;
    std::future::poll_fn(|cx| {
        while written < conn.head.len() {
            match Pin::new(&mut conn.io).poll_write(cx, &conn.head[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(H1Error::Io(std::io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Pending => {
                    ready!(conn.deadline.poll_expired(cx));
                    return Poll::Ready(Err(H1Error::Timeout));
                }
            }
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Reads what the upstream has sent into the connection's buffer, unless the deadline passes first.
async fn read_some(conn: &mut Conn) -> Result<usize, H1Error> {
    std::future::poll_fn(|cx| match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
        Poll::Ready(r) => Poll::Ready(r.map_err(H1Error::from)),
        Poll::Pending => {
            ready!(conn.deadline.poll_expired(cx));
            Poll::Ready(Err(H1Error::Timeout))
        }
    })
    .await
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

fn encode_head(out: &mut Vec<u8>, head: &Head<'_>, authority: &HeaderValue) {
    out.clear();
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.path.as_bytes());
    if let Some(q) = head.query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(head.host.unwrap_or(authority).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers.iter().filter(|(n, _)| *n != header::HOST).chain(head.additions.fields()) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn userinfo_in_the_upstream_url_never_reaches_the_host_header() {
        let c = {
            let a = "user:secret@up.internal:8080".parse().unwrap();
            Client::new(&a, &a, Duration::from_secs(1))
        }
        .unwrap();
        assert_eq!((c.authority.to_str().unwrap(), c.connect_to.as_str()), ("up.internal:8080", "up.internal:8080"));
    }

    #[test]
    fn the_head_is_encoded_from_the_routed_target() {
        let mut h = HeaderMap::new();
        h.insert("host", "ignored".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        let mut out = Vec::new();
        let ip = HeaderValue::from_static("192.0.2.9");
        let fwd = headers_request::Forwarding { peer: "192.0.2.9:1".parse().unwrap(), peer_ip: &ip, tls: false, from_trusted_proxy: false };
        let rid = HeaderValue::from_static("r1");
        let additions = headers_request::prepare_upstream(&mut h, &fwd, None, &rid, None, &Default::default(), false);
        let head = Head {
            method: &Method::GET,
            path: "/a/b",
            query: Some("x=1"),
            headers: &h,
            additions: &additions,
            host: None,
            answer_rules: &headers_response::SecureHeaders::defaults(),
        };
        encode_head(&mut out, &head, &HeaderValue::from_static("up:3000"));
        let expected = "GET /a/b?x=1 HTTP/1.1\r\nhost: up:3000\r\nx-a: 1\r\n\
                        x-forwarded-for: 192.0.2.9\r\nx-forwarded-proto: http\r\nx-request-id: r1\r\n\r\n";
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert!(!is_safe_target("/a b", None));
        assert!(!is_safe_target("/a", Some("x\r\n")));
        assert!(is_safe_target("/a", Some("x=%20")));
    }
}
