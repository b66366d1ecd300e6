//! Accept loops for the public listeners (https, http) and the admin listener: connection limits, the TLS
//! handshake timeout, HTTP/1.1 (`h1_server`, handing over to hyper where it must) and HTTP/2 (hyper), and
//! graceful drain.

pub mod admin;
pub mod conn_bounds;
pub mod reload;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::RequestBody;
use crate::config::ConnectionLimits;
use crate::gateway::{ConnInfo, Gateway};
use crate::h1;
use crate::h1::server::Ended;
use crate::server::conn_bounds::{ConnState, HeaderDeadline, Tracked};

/// State shared by every connection: the current Gateway (swapped whole on reload) and the drain flag.
pub struct Shared {
    pub gateway: ArcSwap<Gateway>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub draining: AtomicBool,
    pub tls: Option<Arc<crate::server::tls::CertResolver>>,
    /// Verifies client certificates with `[tls] client_ca`; its CAs and CRL are swapped on reload.
    pub client_verifier: Option<Arc<crate::server::tls::ClientVerifier>>,
    /// Held for the whole of a reload.
    pub reloading: tokio::sync::Mutex<()>,
    /// Open public connections per client address, for `max_connections_per_client`.
    pub per_client: Arc<PerClient>,
    /// HTTP/2 protocol errors not yet reported in the log, and when the last report was (Unix seconds).
    pub protocol_errors_unreported: std::sync::atomic::AtomicU64,
    pub protocol_errors_reported_at: std::sync::atomic::AtomicU64,
    /// The config the gateway started with: what is bound and sized at start, which a reload compares against
    /// (not against the last reload's config, which would warn about a pending restart only once).
    pub started: Arc<crate::config::Config>,
    /// Resolves upstream host names (kept for the gateways a reload builds).
    pub resolver: crate::upstream::Resolver,
}

/// Open connections per client address (IPv6 by its prefix), so that one client cannot hold every
/// `max_connections` place, and the counter of its requests in flight. The map is touched once per connection,
/// never per request; a request touches only its client's counter.
#[derive(Default)]
pub struct PerClient(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, ClientEntry>>);

#[derive(Default)]
struct ClientEntry {
    connections: usize,
    in_flight: Arc<AtomicUsize>,
}

/// One counted connection; dropped with it.
pub struct ClientSlot(Arc<PerClient>, std::net::IpAddr);

impl PerClient {
    /// Counts a connection from `ip` unless it holds `max` already; returns its slot and its client's
    /// requests-in-flight counter.
    fn admit(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<(ClientSlot, Arc<AtomicUsize>)> {
        let mut open = self.0.lock().ok()?;
        let entry = open.entry(ip).or_default();
        if entry.connections >= max {
            return None;
        }
        entry.connections += 1;
        Some((ClientSlot(self.clone(), ip), entry.in_flight.clone()))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.0 .0.lock() {
            if let Some(e) = open.get_mut(&self.1) {
                e.connections -= 1;
                if e.connections == 0 {
                    open.remove(&self.1);
                }
            }
        }
    }
}

/// Builds the HTTP server settings from the limits: hyper's header timeout needs a timer to work.
pub fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // hyper's header timer also runs while a keep-alive connection idles, so it bounds idle time here;
        // the real header deadline is `conn_bounds`'s.
        .header_read_timeout(limits.idle.keep_alive.max(limits.header_read_timeout))
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true)
        .half_close(false);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(limits.idle.connection))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts connections until `shutdown` flips, serving each on its own task. The semaphore bounds open
/// connections across the public listeners: at the limit we stop accepting (the kernel backlog holds the rest).
#[allow(clippy::too_many_arguments)] // one accept loop's whole context; a struct would only rename it
pub async fn accept_loop(
    label: &'static str,
    listener: TcpListener,
    tls: Option<(TlsAcceptor, Duration)>,
    shared: Arc<Shared>,
    limits: Arc<Semaphore>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: Arc<hyper_util::server::graceful::GracefulShutdown>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            _ = shutdown.changed() => break,
            p = limits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (client_slot, client_in_flight) = {
            let gateway = shared.gateway.load();
            let config = &gateway.config;
            if crate::edge::client_addr::is_trusted(&config.trusted_proxies, peer.ip()) {
                (None, None)
            } else {
                let ip = crate::edge::client_addr::mask(peer.ip(), config.ipv6_prefix);
                match shared.per_client.admit(ip, config.limits.max_connections_per_client) {
                    Some((slot, in_flight)) => (Some(slot), Some(in_flight)),
                    None => {
                        shared.metrics.connections_refused.inc();
                        tracing::debug!(%peer, "connection refused: its client is at max_connections_per_client");
                        continue;
                    }
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let (shared, builder, shutdown) = (shared.clone(), builder.clone(), shutdown.clone());
        let open = OpenConnection::new(shared.metrics.connections_active.with_label_values(&[label]));
        let tcp = Held { io: tcp, _places: (permit, client_slot, open) };
        let info = ConnInfo { client_in_flight, decisions_only: label == "decisions", ..ConnInfo::new(peer, tls.is_some()) };
        let conn = Connection { info, shared, builder, watcher, shutdown };
        // Each kind of connection is its own task, sized for its own path: an idle plaintext connection does not
        // hold room for a TLS handshake.
        match tls.clone() {
            None => tokio::spawn(serve(tcp, conn, false)),
            Some((acceptor, timeout)) => tokio::spawn(serve_tls(tcp, acceptor, timeout, conn)),
        };
    }
}

/// What serving one accepted connection needs besides its I/O.
struct Connection {
    info: ConnInfo,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Keeps the drain waiting for this connection.
    watcher: Watcher,
    shutdown: watch::Receiver<bool>,
}

/// Completes a TLS handshake within `timeout`, then serves the connection.
async fn serve_tls<I>(io: I, acceptor: TlsAcceptor, timeout: Duration, conn: Connection)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.info.peer;
    // Both boxed: the handshake's state is held only while it runs, and nothing of it stays in the task after.
    let serving = match Box::pin(tokio::time::timeout(timeout, acceptor.accept(io))).await {
        Ok(Ok(stream)) => {
            let session = stream.get_ref().1;
            let h2 = session.alpn_protocol() == Some(b"h2");
            // rustls verified it against [tls] client_ca (and the CRL) during the handshake.
            let client_cert = session
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| crate::edge::client_cert::ClientCert::from_der(der))
                .map(Arc::new);
            let info = ConnInfo { client_cert, ..conn.info };
            Box::pin(serve(stream, Connection { info, ..conn }, h2))
        }
        Ok(Err(e)) => {
            conn.shared.metrics.tls_handshake_failures.inc();
            return tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => {
            conn.shared.metrics.tls_handshake_failures.inc();
            return tracing::debug!(%peer, "TLS handshake timed out");
        }
    };
    serving.await
}

/// Serves one connection: HTTP/1.1 through `h1_server`, until it hands the connection to hyper; HTTP/2 (ALPN
/// `h2`) through hyper from the start. The watcher keeps the drain waiting either way.
async fn serve<I>(io: I, conn: Connection, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Connection { info, shared, builder, watcher, shutdown } = conn;
    let bounds = {
        let limits = &shared.gateway.load().config.limits;
        h1::server::Bounds {
            header_read_timeout: limits.header_read_timeout,
            keep_alive: limits.idle.keep_alive,
            send_stall: limits.idle.send_stall,
            max_header_bytes: limits.max_header_bytes,
        }
    };
    let (io, read, deadline, from_h1, served) = match h2 {
        false => match serve_h1(io, &info, &shared, bounds, shutdown.clone()).await {
            Ended::Closed => return,
            Ended::HandOver { io, read, deadline, served } => (io, read, deadline, true, served),
        },
        true => {
            let by = crate::h1::deadline::deadline_after(bounds.header_read_timeout);
            match read_h2_preface(io, by).await {
                Some((io, read)) => (io, read, by, false, false),
                None => {
                    shared.metrics.http2_protocol_errors.with_label_values(&["PROTOCOL_ERROR"]).inc();
                    return;
                }
            }
        }
    };
    // Boxed: hyper's connection state is only paid for by connections that reach it. Its limits are read again
    // (not held through the idle phase): the current config's, as every connection's are at accept.
    let limits = shared.gateway.load().config.limits;
    if from_h1 && shared.is_draining() {
        // hyper-util's graceful watch would cancel its protocol detection and drop the request already read:
        // HTTP/1 only, this request served, then closed. The watcher is held so the drain still waits for it.
        Box::pin(serve_last_http1(io, read, info, shared, limits, deadline)).await;
        drop(watcher);
        return;
    }
    // HTTP/2 only where it may start: ALPN `h2` on TLS (RFC 9113 §3.2), or prior knowledge as a plaintext
    // connection's first bytes (§3.3). A TLS connection that chose HTTP/1.1, or one that has served HTTP/1
    // requests, stays HTTP/1.
    let http1_only = from_h1 && (info.tls || served);
    Box::pin(serve_hyper(io, read, info, shared, &builder, (watcher, shutdown), limits, deadline, http1_only)).await
}

/// Serves HTTP/1.1 requests with the own codec until the connection closes or needs hyper.
async fn serve_h1<I>(io: I, info: &ConnInfo, shared: &Shared, bounds: h1::server::Bounds, mut shutdown: watch::Receiver<bool>) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = h1::server::Conn::new(io, bounds);
    // Unconstrained: a first poll with the task's budget spent would return Pending without registering.
    let changed = std::pin::pin!(tokio::task::unconstrained(shutdown.changed()));
    let mut shutdown = h1::server::Shutdown::new(changed, &shared.draining);
    let mut first = true;
    loop {
        let (req, meta) = match conn.read_head(&mut shutdown, first).await {
            Some(Ok(parsed)) => parsed,
            Some(Err(())) => return conn.hand_over(!first),
            None => return Ended::Closed,
        };
        first = false;
        // Boxed: a request's state (the gateway's future, the answer) takes memory only while it is served, so
        // an idle connection costs a few hundred bytes.
        if !Box::pin(exchange(&mut conn, req.map(|()| RequestBody::Empty), meta, info, shared)).await {
            return Ended::Closed;
        }
        conn.await_next_head();
    }
}

/// Serves one request on the own codec and writes its answer; false when the connection is done.
async fn exchange<I>(
    conn: &mut h1::server::Conn<I>,
    req: http::Request<RequestBody>,
    meta: h1::server::Meta,
    info: &ConnInfo,
    shared: &Shared,
) -> bool
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let gateway = shared.gateway.load_full();
    let Some((rsp, additions)) = conn.serve_request(std::pin::pin!(gateway.serve(req, info))).await else {
        return false;
    };
    let keep_alive = !meta.close && !shared.is_draining();
    if !matches!(conn.write_response(rsp, &additions, meta, keep_alive).await, Ok(true)) {
        conn.close().await;
        return false;
    }
    true
}

/// A connection's I/O with its places in the connection limits: they go when the connection goes, also when an
/// upgrade's byte pipe (WebSocket) outlives hyper's connection, which hands the I/O to it.
struct Held<I, P> {
    io: I,
    _places: P,
}

impl<I: AsyncRead + Unpin, P: Unpin> AsyncRead for Held<I, P> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin, P: Unpin> AsyncWrite for Held<I, P> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// hyper's HTTP/1 server with the settings of `http_builder`'s HTTP/1 half, for connections that must stay HTTP/1.
fn http1_builder(limits: &ConnectionLimits, keep_alive: bool) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).max_buf_size(limits.max_header_bytes.max(8192)).keep_alive(keep_alive).half_close(false);
    if keep_alive {
        // As in `http_builder`: hyper's header timer also bounds keep-alive idling.
        b.header_read_timeout(limits.idle.keep_alive.max(limits.header_read_timeout));
    }
    b
}

/// Serves a handed-over HTTP/1 connection during a drain: the request it carries, without keep-alive.
async fn serve_last_http1<I>(
    io: I,
    read: Bytes,
    info: ConnInfo,
    shared: Arc<Shared>,
    limits: ConnectionLimits,
    first_head_by: tokio::time::Instant,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::default());
    let io = HeaderDeadline::new(io, read, state.clone(), limits.header_read_timeout, first_head_by, limits.idle.send_stall);
    let peer = info.peer;
    let b = http1_builder(&limits, false);
    if let Err(e) = b.serve_connection(TokioIo::new(io), gateway_service(info, shared, state)).with_upgrades().await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The hyper service over the current Gateway, tracking each request for the connection's header deadline.
fn gateway_service(
    info: ConnInfo,
    shared: Arc<Shared>,
    state: Arc<ConnState>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<Tracked>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let gateway = shared.gateway.load_full();
        let version = req.version();
        let in_flight = state.begin(version);
        let info = info.clone();
        // Boxed: hyper keeps the future inside each HTTP/2 stream's task, and tokio moves a task's whole stage
        // (future, then output) on every transition; inline, the gateway's large state was copied each time.
        Box::pin(async move {
            let req = if version >= hyper::Version::HTTP_2 {
                req.map(|b| RequestBody::http2(b, gateway.config.limits.max_body_bytes))
            } else {
                req.map(RequestBody::Hyper)
            };
            let rsp = gateway.handle(req, &info).await;
            if rsp.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
                in_flight.upgraded();
            } else if version < hyper::Version::HTTP_2 && rsp.headers().contains_key(hyper::header::CONNECTION) {
                // Only the gateway's own refusals carry Connection (an upstream's is hop-by-hop, removed): one
                // that left the body unread.
                in_flight.linger_on_close();
            }
            let h2_idle = (version >= hyper::Version::HTTP_2).then_some(gateway.config.limits.idle.send_stall);
            Ok::<_, Infallible>(rsp.map(|body| Tracked::new(body, in_flight, h2_idle)))
        })
    })
}

/// Serves a connection through hyper until it ends: HTTP/1 only, or HTTP/1 and HTTP/2 by what the first bytes
/// say.
#[allow(clippy::too_many_arguments)] // one connection's whole context; a struct would only rename it
async fn serve_hyper<I>(
    io: I,
    read: Bytes,
    info: ConnInfo,
    shared: Arc<Shared>,
    builder: &auto::Builder<TokioExecutor>,
    (watcher, shutdown): (Watcher, watch::Receiver<bool>),
    limits: ConnectionLimits,
    first_head_by: tokio::time::Instant,
    http1_only: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = Arc::new(ConnState::default());
    let io = TokioIo::new(HeaderDeadline::new(io, read, state.clone(), limits.header_read_timeout, first_head_by, limits.idle.send_stall));
    let peer = info.peer;
    let service = gateway_service(info, shared.clone(), state.clone());
    // hyper-util's `http1_only` does nothing for a connection served with upgrades: hyper's own HTTP/1 server.
    let result = if http1_only {
        let conn = http1_builder(&limits, true).serve_connection(io, service).with_upgrades();
        until_closed(conn, |c| c.graceful_shutdown(), &state, (watcher, shutdown), limits.idle.connection).await.map_err(|e| e.to_string())
    } else {
        let conn = builder.serve_connection_with_upgrades(io, service);
        let result = until_closed(conn, |c| c.graceful_shutdown(), &state, (watcher, shutdown), limits.idle.connection).await;
        if let Some(reason) = result.as_ref().err().and_then(|e| h2_reason(e.as_ref())).filter(|r| *r != h2::Reason::NO_ERROR) {
            shared.protocol_error(reason);
        }
        result.map_err(|e| e.to_string())
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the preface of a connection that chose `h2` by ALPN. A wrong one is a connection error of type
/// PROTOCOL_ERROR (§3.4): answered with the server's preface and GOAWAY(PROTOCOL_ERROR), then closed (h2spec
/// 3.5). Returns the bytes read, for hyper, when the preface is right; None when the connection is done.
async fn read_h2_preface<I: AsyncRead + AsyncWrite + Unpin>(mut io: I, by: tokio::time::Instant) -> Option<(I, Bytes)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut read = Vec::with_capacity(H2_PREFACE.len());
    let mut chunk = [0u8; 64];
    while read.len() < H2_PREFACE.len() {
        let n = match tokio::time::timeout_at(by, io.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return None,
        };
        read.extend_from_slice(&chunk[..n]);
        let seen = read.len().min(H2_PREFACE.len());
        if read[..seen] != H2_PREFACE[..seen] {
            // SETTINGS (empty), then GOAWAY: last stream 0, error code PROTOCOL_ERROR (1).
            let frames =
                [[0u8, 0, 0, 4, 0, 0, 0, 0, 0].as_slice(), [0u8, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1].as_slice()].concat();
            let _ = tokio::time::timeout_at(by, async {
                let _ = io.write_all(&frames).await;
                let _ = io.shutdown().await;
            })
            .await;
            return None;
        }
    }
    Some((io, Bytes::from(read)))
}

/// The HTTP/2 error a connection ended with, if it was one of the protocol's (a flood, a protocol violation).
fn h2_reason(e: &(dyn std::error::Error + 'static)) -> Option<h2::Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason();
        }
        cur = err.source();
    }
    None
}

/// Drives a hyper connection to its end, closing it gracefully (GOAWAY on HTTP/2) when the drain begins or when
/// it has served nothing for a whole `idle` period (checked once per period, so closed within twice
/// it): an HTTP/2 client answers hyper's pings, so without this an idle connection would hold its
/// `max_connections` place for ever. The watcher is held until the end, so the drain waits for it.
async fn until_closed<C: Future>(
    conn: C,
    graceful_shutdown: impl Fn(std::pin::Pin<&mut C>),
    state: &ConnState,
    (watcher, mut shutdown): (Watcher, watch::Receiver<bool>),
    idle: Duration,
) -> C::Output {
    let mut conn = std::pin::pin!(conn);
    let mut idle_check = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
    // Never two checks back to back (a late one would otherwise be followed by a catch-up one at once).
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Idle at the last check with nothing begun since, and idle now: idle for a whole period at least.
    let (mut seen, mut was_idle) = state.activity();
    let mut closing = false;
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = shutdown.wait_for(|s| *s), if !closing => {
                graceful_shutdown(conn.as_mut());
                closing = true;
            }
            _ = idle_check.tick(), if !closing => {
                let (begun, idle) = state.activity();
                if idle && was_idle && begun == seen {
                    graceful_shutdown(conn.as_mut());
                    closing = true;
                }
                (seen, was_idle) = (begun, idle);
            }
        }
    };
    drop(watcher);
    result
}

/// How long the admin connections still open when the admin listener closes may take to finish their answer.
const ADMIN_CLOSE: Duration = Duration::from_secs(2);

/// Serves the admin listener (health and metrics) until `stop`, which comes when the drain has ended, not when it
/// begins: a kubelet whose liveness probe is refused mid-drain kills the pod, and one whose readiness probe is
/// refused learns less than from `/readyz`'s 503. Admin connections are not counted in the drain.
pub async fn admin_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let open = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            // The Ref is dropped inside: it is not Send.
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => { tokio::time::sleep(Duration::from_millis(50)).await; continue } },
        };
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(crate::server::admin::handle(&shared, req, peer).await) }
        });
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(10));
        let conn = open.watch(b.serve_connection(TokioIo::new(tcp), service));
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    drop(listener);
    // The process is about to exit: idle admin connections close now, one being answered once answered.
    if tokio::time::timeout(ADMIN_CLOSE, open.shutdown()).await.is_err() {
        tracing::debug!("admin connections still open after the admin listener closed");
    }
}

/// Counts an open connection in `portcullis_connections_active` for as long as it lives.
struct OpenConnection(prometheus::IntGauge);

impl OpenConnection {
    fn new(g: prometheus::IntGauge) -> OpenConnection {
        g.inc();
        OpenConnection(g)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Connections the kernel queues while the accept loop is busy. std's default (128) overflows under a burst of
/// new connections (every overflow costs the client a 1 s SYN retry); the kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener; port 0 picks a free port.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Shared {
    /// Counts an HTTP/2 connection closed for a protocol error or a flood, and says so in the log at most once a
    /// minute (a flood of such connections must not become a flood of log lines).
    fn protocol_error(&self, reason: h2::Reason) {
        self.metrics.http2_protocol_errors.with_label_values(&[&format!("{reason:?}")]).inc();
        let unreported = self.protocol_errors_unreported.fetch_add(1, Ordering::Relaxed) + 1;
        let now = crate::unix_now_secs();
        let last = self.protocol_errors_reported_at.load(Ordering::Relaxed);
        if now >= last + 60 && self.protocol_errors_reported_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            self.protocol_errors_unreported.fetch_sub(unreported, Ordering::Relaxed);
            tracing::warn!(
                connections = unreported,
                last_reason = %reason,
                "HTTP/2 connections closed for protocol errors or floods since the last report (portcullis_http2_protocol_errors_total)"
            );
        }
    }

    /// Returns true once draining has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listen_queue_holds_a_burst_the_accept_loop_has_not_reached() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the kernel's queue (std's default of 128 would drop the rest).
        let held = tokio::task::spawn_blocking(move || {
            let mut held = Vec::new();
            while let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                held.push(c);
                if held.len() == 600 {
                    break;
                }
            }
            held
        })
        .await
        .unwrap();
        assert_eq!(held.len(), 600, "the listen queue dropped a connection");
        drop(listener);
    }
}
