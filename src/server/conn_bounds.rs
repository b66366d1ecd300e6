//! Time bounds on a client connection that hyper serves: the header-read deadline (kept apart from keep-alive
//! idle time), the staged close, and how long the client may take none of an answer.
//!
//! hyper starts its `header_read_timeout` as soon as a connection waits for the next request head, so alone it
//! would also close idle keep-alive connections after that (short) time. hyper's timer is therefore given
//! `idle_timeout`, and this wrapper around the connection enforces `header_read_timeout`: from accept for the
//! first request, and from the first byte of each later head, until the request reaches the service.
//! HTTP/2 and upgraded connections turn it off at their first request (they have their own framing and pings).
//!
//! The same wrapper closes an HTTP/1 connection in stages when an answer refused a request whose body was left
//! unread (401, 403, 413… before the upload ended): closing a socket with unread input makes the kernel send a
//! reset, which can reach the client before it has read the answer, so it sees "connection reset" instead of
//! the 413. As RFC 9112 §9.6 advises, the write side is shut first (the client reads the answer and an end of
//! stream), then what the client still sends is read and dropped until it closes too, for at most `LINGER`.
//!
//! The other way, it bounds how long the client may take none of an answer: a write that waits `idle_timeout`
//! fails (the connection closes), and on HTTP/2, where one stream can be stalled through flow control while the
//! connection stays writable, [`Tracked`] drops a stream's answer that hyper has not asked more of for as long.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Version;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::body::{Body, BodyError, LINGER};
use crate::h1::deadline::Stall;

/// What the service tells the connection's reader: whether a request is being served, and whether the
/// deadline applies at all any more. One per connection, never shared between connections.
#[derive(Default)]
pub struct ConnState {
    in_flight: AtomicUsize,
    /// Requests begun on the connection, ever: the idle check compares it across a period.
    begun: AtomicUsize,
    off: AtomicBool,
    linger: AtomicBool,
}

impl ConnState {
    /// Marks a request as being served until the returned guard (carried by its response body) drops.
    pub fn begin(self: &Arc<Self>, version: Version) -> InFlight {
        if version >= Version::HTTP_2 {
            self.off.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.begun.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Requests begun so far, and whether none is being served now.
    pub fn activity(&self) -> (usize, bool) {
        (self.begun.load(Ordering::Relaxed), self.in_flight.load(Ordering::Acquire) == 0)
    }
}

/// A request in flight on its connection; dropped when its response has been written (or abandoned).
pub struct InFlight(Arc<ConnState>);

impl InFlight {
    /// The connection now carries another protocol (WebSocket…): no more HTTP heads to time.
    pub fn upgraded(&self) {
        self.0.off.store(true, Ordering::Relaxed);
    }

    /// The answer closes the connection with the request's body unread: read it out when closing.
    pub fn linger_on_close(&self) {
        self.0.linger.store(true, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until hyper has finished with it.
pub struct Tracked {
    body: Watched,
    _in_flight: InFlight,
}

impl Tracked {
    /// On HTTP/2 (`idle`: the connection's `idle_timeout`) the body is watched (see `Watch`).
    pub fn new(body: Body, in_flight: InFlight, h2_idle: Option<Duration>) -> Tracked {
        let body = match h2_idle {
            Some(idle) => Watched::H2 { watch: Arc::new(Watch::new(body)), idle, spawned: false },
            None => Watched::Direct(body),
        };
        Tracked { body, _in_flight: in_flight }
    }
}

enum Watched {
    Direct(Body),
    H2 { watch: Arc<Watch>, idle: Duration, spawned: bool },
}

/// An HTTP/2 answer's body. A client can stop taking one stream through flow control while its connection stays
/// writable (so the write bound of [`HeaderDeadline`] never fires), and the body would then hold its upstream
/// connection for ever. Once hyper has not asked for more of it for `idle` after taking a frame, a watchdog task
/// (started at the first frame that leaves the body unfinished) drops it, which releases the upstream
/// connection; the stream then ends with an error if hyper asks again.
struct Watch {
    body: std::sync::Mutex<Option<Body>>,
    start: Instant,
    /// Milliseconds from `start` to when hyper last took a frame; `WAITING` while hyper waits on the body (an
    /// upstream's delay, bounded by its own timeout), `DONE` once it ended.
    took_at: std::sync::atomic::AtomicU64,
}

const WAITING: u64 = u64::MAX;
const DONE: u64 = u64::MAX - 1;

impl Watch {
    fn new(body: Body) -> Watch {
        Watch { body: std::sync::Mutex::new(Some(body)), start: Instant::now(), took_at: WAITING.into() }
    }
}

/// Drops the body once hyper has taken none of it for `idle` since its last frame; ends with the body.
async fn watchdog(watch: std::sync::Weak<Watch>, idle: Duration) {
    loop {
        let (due, seen) = {
            let Some(w) = watch.upgrade() else { return };
            let seen = w.took_at.load(Ordering::Relaxed);
            let due = match seen {
                DONE => return,
                WAITING => crate::h1::deadline::deadline_after(idle),
                at => crate::h1::deadline::later(w.start + Duration::from_millis(at), idle),
            };
            (due, seen)
        };
        tokio::time::sleep_until(due).await;
        let Some(w) = watch.upgrade() else { return };
        if seen != WAITING && w.took_at.load(Ordering::Relaxed) == seen {
            tracing::debug!(?idle, "an HTTP/2 client took none of a stream for idle_timeout; its answer is dropped");
            let body = w.body.lock().map(|mut b| b.take()).unwrap_or(None);
            drop(body);
            return;
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().body {
            Watched::Direct(body) => Pin::new(body).poll_frame(cx),
            Watched::H2 { watch, idle, spawned } => {
                let mut guard = watch.body.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(body) = guard.as_mut() else { return Poll::Ready(Some(Err(BodyError::ClientStalled(*idle)))) };
                let polled = Pin::new(&mut *body).poll_frame(cx);
                let took_at = match &polled {
                    Poll::Pending => WAITING,
                    Poll::Ready(Some(Ok(_))) if !body.is_end_stream() => {
                        if !*spawned {
                            *spawned = true;
                            tokio::spawn(watchdog(Arc::downgrade(watch), *idle));
                        }
                        u64::try_from(watch.start.elapsed().as_millis()).unwrap_or(DONE - 1).min(DONE - 1)
                    }
                    Poll::Ready(_) => DONE,
                };
                watch.took_at.store(took_at, Ordering::Relaxed);
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Watched::Direct(body) => body.is_end_stream(),
            Watched::H2 { watch, .. } => watch.body.lock().map_or(true, |b| b.as_ref().is_none_or(Body::is_end_stream)),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Watched::Direct(body) => body.size_hint(),
            Watched::H2 { watch, .. } => watch.body.lock().ok().and_then(|b| b.as_ref().map(Body::size_hint)).unwrap_or_default(),
        }
    }
}

/// A connection whose reads fail with `TimedOut` once a request head has taken longer than the timeout.
pub struct HeaderDeadline<I> {
    io: I,
    /// Bytes already read from the connection (by `h1_server`), served before anything from `io`.
    read: Bytes,
    state: Arc<ConnState>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    /// The staged close: the write side is shut, input is being read out until `sleep`.
    lingering: bool,
    /// How long a write may wait for the client to take any of it (`idle_timeout`).
    write_stall: Stall,
}

/// Reads per poll while lingering, so a client sending at full speed cannot hold the worker.
const LINGER_READS: usize = 16;

impl<I> HeaderDeadline<I> {
    /// Wraps a connection whose next head must be complete by `first_head_by`, later ones within `timeout` of
    /// their first byte. `read` holds bytes already taken from it, which its reader gets first.
    /// Its writes fail with `TimedOut` once one has waited `write_stall` for the client to take any of it.
    pub fn new(
        io: I,
        read: Bytes,
        state: Arc<ConnState>,
        timeout: Duration,
        first_head_by: Instant,
        write_stall: Duration,
    ) -> HeaderDeadline<I> {
        HeaderDeadline {
            io,
            read,
            state,
            timeout,
            sleep: Box::pin(tokio::time::sleep_until(first_head_by)),
            armed: true,
            lingering: false,
            write_stall: Stall::new(write_stall),
        }
    }

    /// Passes a write's (or flush's) outcome on; one that has waited `write_stall` becomes `TimedOut`: a client
    /// that stops reading must not hold its connection, and the upstream's, for ever (nginx's `send_timeout`).
    fn bounded<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.write_stall.moved();
            return polled;
        }
        if self.write_stall.expired(cx) {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client took none of the answer within idle_timeout")));
        }
        Poll::Pending
    }

    fn timed_out() -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, "request head not received within header_read_timeout")
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for HeaderDeadline<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.read.is_empty() {
            // Part of the head the deadline is already armed for.
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        if this.state.off.load(Ordering::Relaxed) {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        // Bytes read while a request is served are its body (or a pipelined head, timed once it is awaited).
        let busy = this.state.in_flight.load(Ordering::Acquire) > 0;
        if busy {
            this.armed = false;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.armed && this.sleep.is_elapsed() {
                    return Poll::Ready(Err(Self::timed_out()));
                }
                if !busy && !this.armed && buf.filled().len() > before {
                    // The first byte of a new head: the clock starts now, and more bytes do not extend it.
                    this.sleep.as_mut().reset(crate::h1::deadline::deadline_after(this.timeout));
                    this.armed = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if this.armed && this.sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(Self::timed_out()));
                }
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.bounded(cx, polled)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.bounded(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.lingering {
            ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            if !this.state.linger.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            this.lingering = true;
            this.sleep.as_mut().reset(crate::h1::deadline::deadline_after(LINGER));
        }
        let mut chunk = [MaybeUninit::<u8>::uninit(); 4096];
        for _ in 0..LINGER_READS {
            if this.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut rb = ReadBuf::uninit(&mut chunk);
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {}
                // The client closed (or broke) its side: nothing is left to cause a reset.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        // The client is still sending at full speed: let other tasks run, then read on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn wrapped(linger: bool) -> (HeaderDeadline<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (ours, client) = tokio::io::duplex(64 * 1024);
        let state = Arc::new(ConnState::default());
        if linger {
            state.begin(Version::HTTP_11).linger_on_close();
        }
        (HeaderDeadline::new(ours, Bytes::new(), state, Duration::from_secs(10), Instant::now(), Duration::from_secs(60)), client)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_close_ends_at_the_clients_close_or_after_linger() {
        // The client closes: the staged close ends then, having read out what it sent.
        let (mut conn, mut client) = wrapped(true);
        client.write_all(&[1u8; 50_000]).await.unwrap();
        let closing = tokio::spawn(async move { conn.shutdown().await });
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "the write side is shut first: the client sees the end of stream at once");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!closing.is_finished(), "closed while the client had not closed");
        drop(client);
        tokio::time::timeout(Duration::from_millis(1), closing).await.expect("the client's close ends it").unwrap().unwrap();

        // The client never closes and keeps sending: the close happens after LINGER all the same.
        let (mut conn, mut client) = wrapped(true);
        let start = Instant::now();
        let sender = tokio::spawn(async move {
            while client.write_all(&[2u8; 1024]).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        tokio::time::timeout(LINGER * 2, conn.shutdown()).await.expect("the linger is bounded").unwrap();
        assert_eq!(start.elapsed(), LINGER);
        drop(conn);
        sender.await.unwrap();

        // No refusal with an unread body: no linger at all.
        let (mut conn, _client) = wrapped(false);
        let start = Instant::now();
        conn.shutdown().await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
