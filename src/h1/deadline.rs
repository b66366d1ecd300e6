//! A deadline that moves on every request but costs a timer operation only when its timer fires.
//!
//! Setting a deadline only records an instant. The one timer behind it stays where it was armed; when it fires
//! before the recorded instant it is re-armed for it, and it is moved earlier only when the deadline comes before
//! it. A connection serving requests back to back therefore touches the timer wheel about once per timeout
//! period instead of twice per request.
//!
//! [`Stall`] bounds one wait instead (a body that stops coming, a client that takes none of an answer).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Returns the instant `d` from now; an absurdly long `d` (a config may say "10000000000000000000s") means about
/// thirty years rather than an overflow.
pub fn deadline_after(d: std::time::Duration) -> Instant {
    later(Instant::now(), d)
}

/// Returns `start + d`, saturating like [`deadline_after`] (for a caller that already read the clock).
pub fn later(start: Instant, d: std::time::Duration) -> Instant {
    start.checked_add(d).unwrap_or_else(|| start + std::time::Duration::from_secs(86_400 * 365 * 30))
}

#[derive(Debug)]
pub struct Deadline {
    at: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    /// Returns a deadline at `at`.
    pub fn new(at: Instant) -> Deadline {
        Deadline { at, timer: Box::pin(tokio::time::sleep_until(at)) }
    }

    /// Moves the deadline (later or earlier).
    pub fn set(&mut self, at: Instant) {
        self.at = at;
    }

    /// Returns the current deadline.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Ready once the deadline has passed; otherwise the task is woken when the timer fires.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.timer.deadline() > self.at {
            self.timer.as_mut().reset(self.at);
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(self.at);
        }
        Poll::Pending
    }
}

/// A bound on one wait (for bytes that do not come, or a peer that takes none): the timer is made at the first
/// wait, and the clock read only when a wait begins, so what never waits pays nothing.
#[derive(Debug)]
pub struct Stall {
    after: std::time::Duration,
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Stall {
    pub fn new(after: std::time::Duration) -> Stall {
        Stall { after, timer: None, waiting: false }
    }

    pub fn after(&self) -> std::time::Duration {
        self.after
    }

    /// The awaited thing happened: the next wait is timed afresh.
    pub fn moved(&mut self) {
        self.waiting = false;
    }

    /// Called when what is awaited is not ready: true once this wait has lasted `after` (until then the task is
    /// woken when it would).
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            let at = deadline_after(self.after);
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        self.timer.as_mut().is_some_and(|t| t.as_mut().poll(cx).is_ready())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn expires(d: &mut Deadline) {
        std::future::poll_fn(|cx| d.poll_expired(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_or_earlier_fires_at_its_last_instant() {
        let start = Instant::now();
        let mut d = Deadline::new(start + Duration::from_secs(1));
        d.set(start + Duration::from_secs(5));
        expires(&mut d).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(5), "the early timer was re-armed, not obeyed");

        let start = Instant::now();
        d.set(start + Duration::from_secs(60));
        d.set(start + Duration::from_secs(2));
        expires(&mut d).await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2), "a deadline moved earlier fires then");
    }
}
