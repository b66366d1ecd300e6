//! The token endpoint's guard against password guessing: failed attempts per account and client, counted from
//! the moment an attempt starts (so a batch sent at once cannot all pass before the first failure is recorded),
//! and a bound on the password hashes each client, and all clients together, may have waiting.
//!
//! Clients are keyed like the rate limits: IPv6 by its prefix (/64 by default), so rotating addresses inside one
//! allocation buys nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{Op, Store};

/// Hashes one client may have running or queued at once; more get 429 at once instead of a place in the queue.
pub const PER_CLIENT: u32 = 8;
/// Hashes all clients together may have running or queued; past that the endpoint answers 503.
pub const PENDING: u32 = 256;
/// Past this many tracked keys, expired ones are dropped before a new one is added.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This account and client used up their failures (or have attempts in flight that may do so).
    TooMany { retry_after_secs: u64 },
    /// Every hashing place is taken.
    Busy,
}

/// Failed attempts as a GCRA: each failure pushes `charged_until` one `rate` further; `burst` may be charged at
/// once, and one is forgiven per `rate`.
#[derive(Default)]
struct Key {
    charged_until: Option<Instant>,
    in_flight: u32,
}

#[derive(Default)]
struct State {
    keys: HashMap<(String, IpAddr), Key>,
    clients: HashMap<IpAddr, u32>,
    pending: u32,
}

pub struct Attempts {
    rate: Duration,
    burst: u32,
    ipv6_prefix: u8,
    state: Mutex<State>,
}

/// One attempt in progress: dropped, it frees its places; [`Attempt::failed`] first charges a failure.
pub struct Attempt {
    attempts: Arc<Attempts>,
    key: (String, IpAddr),
    failed: bool,
    shared: Option<SharedCharge>,
}

/// A failure charged in the shared store when the attempt began (so attempts in flight on every replica count),
/// given back if the attempt succeeds.
struct SharedCharge {
    store: Arc<Store>,
    key: String,
    rate: Duration,
    burst: u32,
    runtime: tokio::runtime::Handle,
}

impl Attempt {
    /// Charges this attempt as a failure when it ends.
    pub fn failed(mut self) {
        self.failed = true;
    }

    /// Charges the attempt in the shared store too, before any hashing: refused there (the account and client used
    /// up their failures across all replicas), it is `TooMany`. A store that does not answer leaves the local
    /// count alone in charge.
    pub async fn charge_shared(mut self, store: &Arc<Store>) -> Result<Attempt, Refusal> {
        let (rate, burst) = (self.attempts.rate, self.attempts.burst);
        let key = shared_key(&self.key);
        match store.gcra(Op::Login, &key, rate, burst, 1).await {
            Ok(g) if !g.allowed => Err(Refusal::TooMany { retry_after_secs: (g.wait.as_millis().div_ceil(1000) as u64).max(1) }),
            Ok(_) => {
                let runtime = tokio::runtime::Handle::current();
                self.shared = Some(SharedCharge { store: store.clone(), key, rate, burst, runtime });
                Ok(self)
            }
            Err(e) => {
                tracing::debug!(error = %e, "token endpoint: failed attempts counted on this replica only");
                Ok(self)
            }
        }
    }
}

/// The store key of an account and client: hashed, so a made-up name of any length or content is a fixed-size key.
fn shared_key((account, ip): &(String, IpAddr)) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(&(account.len() as u64).to_be_bytes());
    ctx.update(account.as_bytes());
    ctx.update(ip.to_string().as_bytes());
    let d = ctx.finish();
    format!("portcullis:login:{}", d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(c) = self.shared.take().filter(|_| !self.failed) {
            // A success gives its charge back (in the background: the answer does not wait for it).
            c.runtime.spawn(async move {
                let _ = c.store.gcra(Op::Login, &c.key, c.rate, c.burst, -1).await;
            });
        }
        let Ok(mut s) = self.attempts.state.lock() else { return };
        let now = Instant::now();
        s.pending = s.pending.saturating_sub(1);
        if let Some(n) = s.clients.get_mut(&self.key.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.clients.remove(&self.key.1);
            }
        }
        let rate = self.attempts.rate;
        if let Some(k) = s.keys.get_mut(&self.key) {
            k.in_flight = k.in_flight.saturating_sub(1);
            if self.failed {
                k.charged_until = Some(k.charged_until.filter(|t| *t > now).unwrap_or(now) + rate);
            }
            if k.in_flight == 0 && k.charged_until.is_none_or(|t| t <= now) {
                s.keys.remove(&self.key);
            }
        }
    }
}

impl Attempts {
    pub fn new(rate: Duration, burst: u32, ipv6_prefix: u8) -> Attempts {
        Attempts { rate: rate.max(Duration::from_millis(1)), burst: burst.max(1), ipv6_prefix, state: Mutex::default() }
    }

    /// True if the limits are those of `rate`, `burst` and `ipv6_prefix` (a reload keeps the counters then).
    pub fn same_limits(&self, rate: Duration, burst: u32, ipv6_prefix: u8) -> bool {
        *self == Attempts::new(rate, burst, ipv6_prefix)
    }

    /// Starts an attempt on `account` from `ip`, or refuses it before any hashing.
    pub fn begin(self: &Arc<Self>, account: String, ip: IpAddr) -> Result<Attempt, Refusal> {
        let ip = crate::edge::client_addr::mask(ip, self.ipv6_prefix);
        let mut s = self.state.lock().map_err(|_| Refusal::Busy)?;
        let now = Instant::now();
        if s.pending >= PENDING {
            return Err(Refusal::Busy);
        }
        if s.clients.get(&ip).is_some_and(|n| *n >= PER_CLIENT) {
            return Err(Refusal::TooMany { retry_after_secs: 1 });
        }
        if s.keys.len() >= MAX_KEYS {
            s.keys.retain(|_, k| k.in_flight > 0 || k.charged_until.is_some_and(|t| t > now));
        }
        let key = (account, ip);
        let k = s.keys.entry(key.clone()).or_default();
        let debt = k.charged_until.map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
        // Failures still charged, rounded up: after `burst` of them the next attempt waits for one to be forgiven.
        let charged = debt.as_nanos().div_ceil(self.rate.as_nanos()) as u64;
        if charged + u64::from(k.in_flight) >= u64::from(self.burst) {
            let wait = debt.saturating_sub(self.rate * (self.burst.saturating_sub(1).saturating_sub(k.in_flight)));
            return Err(Refusal::TooMany { retry_after_secs: (wait.as_millis().div_ceil(1000) as u64).max(1) });
        }
        k.in_flight += 1;
        *s.clients.entry(ip).or_default() += 1;
        s.pending += 1;
        Ok(Attempt { attempts: self.clone(), key, failed: false, shared: None })
    }

    /// Drops the state of keys with nothing charged and nothing in flight (a flood of made-up names).
    pub fn prune(&self) {
        if let Ok(mut s) = self.state.lock() {
            let now = Instant::now();
            s.keys.retain(|_, k| k.in_flight > 0 || k.charged_until.is_some_and(|t| t > now));
            s.keys.shrink_to_fit();
        }
    }

    /// Counts the keys held now.
    pub fn len(&self) -> usize {
        self.state.lock().map_or(0, |s| s.keys.len())
    }

    /// Returns true if no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for Attempts {
    fn eq(&self, other: &Attempts) -> bool {
        (self.rate, self.burst, self.ipv6_prefix) == (other.rate, other.burst, other.ipv6_prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn attempts_in_flight_count_before_they_fail() {
        let a = Arc::new(Attempts::new(Duration::from_secs(60), 3, 64));
        // Three at once are let in; the fourth is refused before any hashing, though none has failed yet.
        let batch: Vec<Attempt> = (0..3).map(|_| a.begin("u".into(), ip("192.0.2.1")).unwrap()).collect();
        assert!(matches!(a.begin("u".into(), ip("192.0.2.1")), Err(Refusal::TooMany { .. })));
        batch.into_iter().for_each(Attempt::failed);
        let Err(Refusal::TooMany { retry_after_secs }) = a.begin("u".into(), ip("192.0.2.1")) else { panic!("not blocked") };
        assert!((59..=60).contains(&retry_after_secs), "{retry_after_secs}");
        // Another account from the same client, and the same account from another client, are unaffected.
        drop(a.begin("v".into(), ip("192.0.2.1")).unwrap());
        drop(a.begin("u".into(), ip("192.0.2.2")).unwrap());
    }

    #[test]
    fn successes_cost_nothing_and_a_failure_is_forgiven_after_rate() {
        let a = Arc::new(Attempts::new(Duration::from_millis(50), 2, 64));
        for _ in 0..10 {
            drop(a.begin("u".into(), ip("192.0.2.1")).unwrap());
        }
        a.begin("u".into(), ip("192.0.2.1")).unwrap().failed();
        a.begin("u".into(), ip("192.0.2.1")).unwrap().failed();
        assert!(a.begin("u".into(), ip("192.0.2.1")).is_err());
        std::thread::sleep(Duration::from_millis(60));
        a.begin("u".into(), ip("192.0.2.1")).expect("one failure forgiven").failed();
        assert!(a.begin("u".into(), ip("192.0.2.1")).is_err());
    }

    #[test]
    fn a_client_is_its_ipv6_prefix_and_may_queue_only_a_few_hashes() {
        let a = Arc::new(Attempts::new(Duration::from_secs(60), 2, 64));
        // Rotating inside one /64: the same key.
        a.begin("u".into(), ip("2001:db8:1:2::1")).unwrap().failed();
        a.begin("u".into(), ip("2001:db8:1:2::2")).unwrap().failed();
        assert!(a.begin("u".into(), ip("2001:db8:1:2:ffff::3")).is_err());
        // Made-up names from one client: only PER_CLIENT wait at once.
        let held: Vec<Attempt> = (0..PER_CLIENT).map(|i| a.begin(format!("n{i}"), ip("192.0.2.9")).unwrap()).collect();
        assert_eq!(a.begin("other".into(), ip("192.0.2.9")).err(), Some(Refusal::TooMany { retry_after_secs: 1 }));
        drop(held);
        drop(a.begin("other".into(), ip("192.0.2.9")).unwrap());
        // Success and made-up names leave nothing behind once done.
        a.prune();
        assert_eq!(a.len(), 1, "only the charged key remains");
    }

    #[test]
    fn all_clients_together_may_queue_only_so_many() {
        let a = Arc::new(Attempts::new(Duration::from_secs(60), 5, 64));
        let held: Vec<Attempt> =
            (0..PENDING).map(|i| a.begin("u".into(), IpAddr::from([10, 0, (i >> 8) as u8, i as u8])).unwrap()).collect();
        assert_eq!(a.begin("u".into(), ip("192.0.2.1")).err(), Some(Refusal::Busy));
        drop(held);
        assert!(a.begin("u".into(), ip("192.0.2.1")).is_ok());
    }
}
