//! Retries: which failures a route retries on another target, and the budget that keeps retries a bounded share
//! of its requests, so a sick backend is not buried under a retry storm.
//!
//! A request is retried only when repeating it is safe: it has no body (nothing of it is lost with the first
//! attempt), and it is idempotent, or the first attempt never reached the upstream (a connect failure).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::Method;

/// Retries never exceed `budget_percent` of a route's requests over this window, beyond a small floor.
const WINDOW_SECS: u64 = 10;
/// Retries allowed in a window whatever the request count, so a quiet route still retries its first failures.
pub const MIN_RETRIES_PER_WINDOW: u64 = 3;

/// What a retry may follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Reset,
    Timeout,
    Status(u16),
}

impl Failure {
    /// The `reason` label of `portcullis_upstream_retries_total`.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::Status(502) => "502",
            Failure::Status(503) => "503",
            Failure::Status(504) => "504",
            Failure::Status(_) => "status",
        }
    }
}

/// A route's `retries`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub on_connect: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    /// Answer statuses (5xx) that are retried.
    pub on_status: Vec<u16>,
    pub budget_percent: u32,
}

impl RetryPolicy {
    /// Parses one `on` entry: `connect`, `reset`, `timeout` or a 5xx status.
    pub fn add_on(&mut self, s: &str) -> Result<(), String> {
        match s {
            "connect" => self.on_connect = true,
            "reset" => self.on_reset = true,
            "timeout" => self.on_timeout = true,
            _ => match s.parse::<u16>() {
                Ok(code @ 500..=599) => self.on_status.push(code),
                _ => return Err(format!("retries: {s:?} is not connect, reset, timeout or a 5xx status")),
            },
        }
        Ok(())
    }

    /// Whether this failure of this request may be retried (before the budget is asked).
    pub fn allows(&self, failure: Failure, method: &Method) -> bool {
        let idempotent = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE);
        match failure {
            // Nothing reached the upstream: any bodiless request may go elsewhere.
            Failure::Connect => self.on_connect,
            Failure::Reset => self.on_reset && idempotent,
            Failure::Timeout => self.on_timeout && idempotent,
            Failure::Status(s) => idempotent && self.on_status.contains(&s),
        }
    }
}

/// A route's retry budget: requests and retries counted per second over the last `WINDOW_SECS` seconds, in
/// atomics (no lock shared by the route's requests).
#[derive(Debug)]
pub struct Budget {
    percent: u64,
    born: Instant,
    buckets: [Bucket; WINDOW_SECS as usize],
}

#[derive(Debug, Default)]
struct Bucket {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Budget {
    pub fn new(percent: u32) -> Budget {
        Budget { percent: u64::from(percent), born: Instant::now(), buckets: Default::default() }
    }

    fn now(&self) -> u64 {
        // Seconds from 1, so a bucket's 0 never reads as current.
        self.born.elapsed().as_secs() + 1
    }

    fn bucket(&self, now: u64) -> &Bucket {
        let b = &self.buckets[(now % WINDOW_SECS) as usize];
        let seen = b.second.load(Ordering::Acquire);
        if seen != now && b.second.compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    /// Counts a request (every request of the route, retried or not).
    pub fn deposit(&self) {
        self.bucket(self.now()).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is room: retries in the window stay within `percent` of the
    /// requests in it, or `MIN_RETRIES_PER_WINDOW`, whichever is more.
    pub fn withdraw(&self) -> bool {
        let now = self.now();
        // Taken first, then checked, and given back if over: concurrent failures cannot all see the same room.
        let mine = self.bucket(now);
        mine.retries.fetch_add(1, Ordering::AcqRel);
        let (mut requests, mut retries) = (0, 0);
        for b in &self.buckets {
            let s = b.second.load(Ordering::Acquire);
            if s + WINDOW_SECS > now && s <= now {
                requests += b.requests.load(Ordering::Relaxed);
                retries += b.retries.load(Ordering::Acquire);
            }
        }
        let allowed = (requests * self.percent / 100).max(MIN_RETRIES_PER_WINDOW);
        if retries > allowed {
            mine.retries.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}
