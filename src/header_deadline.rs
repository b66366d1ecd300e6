//! The HTTP/1 header-read deadline, kept apart from keep-alive idle time.
//!
//! hyper starts its `header_read_timeout` as soon as a connection waits for the next request head, so alone it
//! would also close idle keep-alive connections after that (short) time. hyper's timer is therefore given
//! `idle_timeout`, and this wrapper around the connection enforces `header_read_timeout`: from accept for the
//! first request, and from the first byte of each later head, until the request reaches the service.
//! HTTP/2 and upgraded connections turn it off at their first request (they have their own framing and pings).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Version;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the service tells the connection's reader: whether a request is being served, and whether the
/// deadline applies at all any more. One per connection, never shared between connections.
#[derive(Default)]
pub struct ConnState {
    in_flight: AtomicUsize,
    off: AtomicBool,
}

impl ConnState {
    /// Marks a request as being served until the returned guard (carried by its response body) drops.
    pub fn begin(self: &Arc<Self>, version: Version) -> InFlight {
        if version >= Version::HTTP_2 {
            self.off.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request in flight on its connection; dropped when its response has been written (or abandoned).
pub struct InFlight(Arc<ConnState>);

impl InFlight {
    /// The connection now carries another protocol (WebSocket…): no more HTTP heads to time.
    pub fn upgraded(&self) {
        self.0.off.store(true, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until hyper has finished with it.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub fn new(body: B, in_flight: InFlight) -> Tracked<B> {
        Tracked { body, _in_flight: in_flight }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
}

impl<I> HeaderDeadline<I> {
    /// Wraps a connection whose next head must be complete by `first_head_by`, later ones within `timeout` of
    /// their first byte. `read` holds bytes already taken from it, which its reader gets first.
    pub fn new(io: I, read: Bytes, state: Arc<ConnState>, timeout: Duration, first_head_by: Instant) -> HeaderDeadline<I> {
        HeaderDeadline { io, read, state, timeout, sleep: Box::pin(tokio::time::sleep_until(first_head_by)), armed: true }
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
                    this.sleep.as_mut().reset(crate::deadline::deadline_after(this.timeout));
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

impl<I: AsyncWrite + Unpin> AsyncWrite for HeaderDeadline<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
