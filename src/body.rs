//! The one body type used in both directions, and small constructors for gateway-made answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;

use crate::edge::headers_request::IdentitySettings;
use crate::h1::deadline::Stall;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("body exceeds the configured limit")]
    TooLarge,
    #[error(transparent)]
    Upstream(#[from] crate::h1::client::H1Error),
    #[error("the upstream's response body stalled: no bytes for {0:?}")]
    Stalled(std::time::Duration),
    #[error("the HTTP/2 client took none of the stream for {0:?}")]
    ClientStalled(std::time::Duration),
}

/// A client's request body: hyper's stream, or none (a bodiless request read by `h1_server`).
#[derive(Debug)]
pub enum RequestBody {
    Hyper(Incoming),
    /// An HTTP/2 stream's body, read out to its end if dropped unread (see `Drop`). Always `Some` until dropped.
    Http2 {
        body: Option<Incoming>,
        read_out_up_to: u64,
    },
    Empty,
}

impl RequestBody {
    /// An HTTP/2 request body that, if refused unread, is read out (up to `read_out_up_to` bytes, for at most
    /// `LINGER`) rather than reset.
    pub fn http2(body: Incoming, read_out_up_to: u64) -> RequestBody {
        RequestBody::Http2 { body: Some(body), read_out_up_to }
    }

    /// Past the size limit: when dropped, reset rather than read out (reading on is only a cost).
    fn abandon(&mut self) {
        if let RequestBody::Http2 { read_out_up_to, .. } = self {
            *read_out_up_to = 0;
        }
    }
}

/// Why: an HTTP/2 stream whose body is dropped unread is reset (RST_STREAM after the answer, as RFC 9113 §8.1
/// allows), and widespread clients (curl before 8) then report a stream error instead of the 401 or 403 they
/// were sent. Read to its end, the stream closes normally, as nginx does by discarding a refused body. A body
/// declared larger than the bound, or still coming after it or after `LINGER`, is reset as before.
impl Drop for RequestBody {
    fn drop(&mut self) {
        let RequestBody::Http2 { body, read_out_up_to } = self else { return };
        let Some(body) = body.take() else { return };
        if body.is_end_stream() || *read_out_up_to == 0 || body.size_hint().lower() > *read_out_up_to {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(read_out(body, *read_out_up_to));
        }
    }
}

/// How long a staged close reads out what a refused client still sends (nginx's `lingering_timeout` default).
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

async fn read_out(mut body: Incoming, up_to: u64) {
    use http_body_util::BodyExt;
    let reading = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > up_to {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, reading).await;
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Hyper(inner) | RequestBody::Http2 { body: Some(inner), .. } => Pin::new(inner).poll_frame(cx),
            RequestBody::Http2 { body: None, .. } | RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(inner) | RequestBody::Http2 { body: Some(inner), .. } => inner.is_end_stream(),
            RequestBody::Http2 { body: None, .. } | RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(inner) | RequestBody::Http2 { body: Some(inner), .. } => inner.size_hint(),
            RequestBody::Http2 { body: None, .. } | RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// A body that is empty, fixed bytes, or a stream from a peer (optionally capped in size).
#[derive(Debug)]
pub enum Body {
    Empty,
    Full(Option<Bytes>),
    /// An upstream response read by hyper's client, cut if a wait for more of it exceeds its [`Stall`] bound. The
    /// permit is the exchange's place in the upstream's `max_connections`, held until the body ends.
    Stream(Incoming, Stall, Place),
    /// An upstream response read by the lean HTTP/1.1 client, with its place in `max_connections`.
    Upstream(crate::h1::answer::ResponseBody, Place),
    /// A client's request body with the bytes it may still send; the stream fails (and the upstream request
    /// is aborted) once it grows past the limit. Its trailers lose what `identity` and the gateway own.
    Limited {
        inner: RequestBody,
        remaining: u64,
        identity: Arc<IdentitySettings>,
        /// Set when the exchange's deadline follows the body (see [`Progress`]).
        progress: Option<Arc<Progress>>,
    },
}

impl Body {
    /// Returns an empty body.
    pub fn empty() -> Body {
        Body::Empty
    }

    /// Returns a body of fixed bytes.
    pub fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }

    /// Returns a client's request body for the upstream: it fails after `limit` bytes, and its trailers are
    /// stripped of identity and gateway fields.
    pub fn limited(inner: RequestBody, limit: u64, identity: Arc<IdentitySettings>) -> Body {
        Body::Limited { inner, remaining: limit, identity, progress: None }
    }

    /// Like [`Body::limited`], reporting how far the body has got to `progress`.
    pub fn limited_with_progress(inner: RequestBody, limit: u64, identity: Arc<IdentitySettings>, progress: Arc<Progress>) -> Body {
        Body::Limited { inner, remaining: limit, identity, progress: Some(progress) }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            // An answer from hyper's client: its trailers lose what the lean client's lose too.
            Body::Stream(inner, stall, _) => match Pin::new(inner).poll_frame(cx) {
                Poll::Pending if stall.expired(cx) => {
                    tracing::warn!(after = ?stall.after(), "an upstream's response body stalled; the stream is cut");
                    Poll::Ready(Some(Err(BodyError::Stalled(stall.after()))))
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(frame) => {
                    stall.moved();
                    Poll::Ready(frame).map_err(BodyError::from).map_ok(upstream_frame)
                }
            },
            Body::Upstream(inner, _) => Pin::new(inner).poll_frame(cx).map_err(BodyError::from),
            Body::Limited { inner, remaining, identity, progress } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                if let Some(p) = progress {
                    p.note(matches!(polled, Poll::Pending));
                }
                match polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            let n = data.len() as u64;
                            if n > *remaining {
                                inner.abandon();
                                return Poll::Ready(Some(Err(BodyError::TooLarge)));
                            }
                            *remaining -= n;
                            return Poll::Ready(Some(Ok(frame)));
                        }
                        match frame.into_trailers() {
                            Ok(mut trailers) => {
                                crate::edge::headers_request::strip_request_trailers(&mut trailers, identity);
                                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                            }
                            Err(frame) => Poll::Ready(Some(Ok(frame))),
                        }
                    }
                    other => other.map_err(BodyError::from),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Stream(inner, _, _) => inner.is_end_stream(),
            Body::Limited { inner, .. } => inner.is_end_stream(),
            Body::Upstream(inner, _) => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Stream(inner, _, _) => inner.size_hint(),
            Body::Limited { inner, .. } => inner.size_hint(),
            Body::Upstream(inner, _) => inner.size_hint(),
        }
    }
}

/// An answer's frame from hyper's client: its trailers lose what the lean client's lose too.
fn upstream_frame(frame: Frame<Bytes>) -> Frame<Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            crate::edge::headers_request::strip_hop_by_hop(&mut trailers, false);
            let mut kept = http::HeaderMap::with_capacity(trailers.len());
            for (name, value) in &trailers {
                if crate::h1::answer::passes_as_trailer(name) {
                    kept.append(name.clone(), value.clone());
                }
            }
            Frame::trailers(kept)
        }
        Err(frame) => frame,
    }
}

/// How far a client's request body has got on its way to the upstream. The wait for the upstream's answer is
/// bounded from when the body has been sent (an upload that takes longer than `timeout` is not cut for it), and
/// until then by the time since the body last moved; when it has not moved for that long, `waiting_on_client`
/// says whose fault it is.
#[derive(Debug)]
pub struct Progress {
    start: std::time::Instant,
    /// Microseconds from `start` to the last time the body moved (or ended).
    moved: std::sync::atomic::AtomicU64,
    /// The body's last poll found the client had sent nothing more.
    waiting_on_client: std::sync::atomic::AtomicBool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { start: std::time::Instant::now(), moved: 0.into(), waiting_on_client: false.into() }
    }

    fn note(&self, pending: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.waiting_on_client.store(pending, Relaxed);
        if !pending {
            let micros = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.moved.store(micros, Relaxed);
        }
    }

    /// When the exchange times out unless the body moves (or the answer comes) first: `after` past the last move.
    pub fn deadline(&self, after: std::time::Duration) -> tokio::time::Instant {
        let moved = std::time::Duration::from_micros(self.moved.load(std::sync::atomic::Ordering::Relaxed));
        crate::h1::deadline::later((self.start + moved).into(), after)
    }

    /// True when the body was last found waiting for the client.
    pub fn waiting_on_client(&self) -> bool {
        self.waiting_on_client.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// An upstream's places for exchanges in flight: a counter taken and given back with one atomic operation each
/// (tokio's semaphore takes a lock on every release), and a wake-up for waiters only when there are any.
#[derive(Debug)]
pub struct Places {
    in_use: AtomicUsize,
    max: usize,
    waiting: AtomicUsize,
    freed: tokio::sync::Notify,
}

/// One exchange's place, given back when dropped (with the answer's body); with it, optionally, the count of
/// exchanges in flight to the one target it went to (what `least_request` balancing compares).
#[derive(Debug)]
pub struct Place(Arc<Places>, Option<Arc<AtomicUsize>>);

impl Places {
    /// `max` places, all free.
    pub fn new(max: usize) -> Places {
        Places { in_use: AtomicUsize::new(0), max, waiting: AtomicUsize::new(0), freed: tokio::sync::Notify::new() }
    }

    fn try_take(self: &Arc<Self>) -> Option<Place> {
        if self.in_use.fetch_add(1, Ordering::AcqRel) < self.max {
            return Some(Place(self.clone(), None));
        }
        self.in_use.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Takes a place, waiting up to `wait` for one to be given back.
    pub async fn take(self: &Arc<Self>, wait: Duration) -> Option<Place> {
        if let Some(p) = self.try_take() {
            return Some(p);
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let taken = tokio::time::timeout(wait, async {
            loop {
                let freed = self.freed.notified();
                tokio::pin!(freed);
                // Registered before the second look: a place given back in between wakes this waiter.
                freed.as_mut().enable();
                if let Some(p) = self.try_take() {
                    return p;
                }
                freed.await;
            }
        })
        .await
        .ok();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        taken
    }
}

impl Place {
    /// Counts this exchange in `target` (one more now, one less when the place is given back).
    pub fn count_in(&mut self, target: &Arc<AtomicUsize>) {
        target.fetch_add(1, Ordering::Relaxed);
        if let Some(old) = self.1.replace(target.clone()) {
            old.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(t) = &self.1 {
            t.fetch_sub(1, Ordering::Relaxed);
        }
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
        if self.0.waiting.load(Ordering::Acquire) > 0 {
            self.0.freed.notify_one();
        }
    }
}
