//! Keyed limiters (GCRA, governor): a global one before authentication, per-route ones after it.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

use super::client_addr::mask;
use crate::store::{Op, Store};

/// Parses a rate like `"10/s"`, `"5/min"`, `"100/h"` into the interval between two allowed events.
pub fn parse_rate(s: &str) -> Result<(u32, std::time::Duration), String> {
    let bad = || format!("invalid rate {s:?}: expected N/s, N/min or N/h, like \"10/s\"");
    let (n, unit) = s.split_once('/').ok_or_else(bad)?;
    let n: u32 = n.trim().parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(bad());
    }
    let window = match unit.trim() {
        "s" | "sec" | "second" => 1u64,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        _ => return Err(bad()),
    };
    Ok((n, std::time::Duration::from_secs(window) / n))
}

/// What a limit is keyed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitKey {
    /// The client address (IPv6 by its /64 or the configured prefix).
    Ip,
    /// The verified `sub` (anonymous requests fall back to the address).
    Subject,
    /// One bucket shared by everyone on the route.
    Route,
    /// A claim's value, like `claim:tenant_id` (absent: the address).
    Claim(String),
}

impl LimitKey {
    /// Parses `ip`, `subject`, `route` or `claim:NAME`.
    pub fn parse(s: &str) -> Result<LimitKey, String> {
        match s {
            "ip" => Ok(LimitKey::Ip),
            "subject" => Ok(LimitKey::Subject),
            "route" => Ok(LimitKey::Route),
            _ => match s.strip_prefix("claim:") {
                Some(c) if !c.is_empty() => Ok(LimitKey::Claim(c.to_string())),
                _ => Err(format!("invalid rate limit key {s:?}: expected \"ip\", \"subject\", \"route\" or \"claim:NAME\"")),
            },
        }
    }

    /// Returns the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            LimitKey::Ip => "ip",
            LimitKey::Subject => "subject",
            LimitKey::Route => "route",
            LimitKey::Claim(_) => "claim",
        }
    }
}

/// A checked limit: key, rate and burst, and where it is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub key: LimitKey,
    pub per: Duration,
    pub burst: NonZeroU32,
    pub store: LimitStore,
}

/// Where a limit is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitStore {
    /// In this replica (governor).
    Local,
    /// In the shared store, across replicas; `replicas` is `[store] expected_replicas`, by which the local
    /// fallback divides the rate.
    Shared { on_error: OnStoreError, replicas: u32 },
}

/// What a shared limit does while its store is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// This replica's share of the limit: `rate / expected_replicas`.
    Local,
    Allow,
    /// Refuse (503): for limits that must never be exceeded.
    Deny,
}

impl OnStoreError {
    pub fn label(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

/// The key of one bucket. Strings are hashed (with a per-process random key) so checking allocates nothing
/// and a bucket's state stays a few dozen bytes whatever the subject's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BucketKey {
    Ip(IpAddr),
    Hashed(u64),
    Shared,
}

type Keyed = governor::DefaultKeyedRateLimiter<BucketKey>;

/// A keyed limiter: checks that never await and take no lock shared by every request (governor's keyed state
/// is sharded). A shared limit asks the store instead, and keeps the governor state as its fallback.
pub struct Limiter {
    pub settings: LimitSettings,
    inner: Keyed,
    hasher: std::collections::hash_map::RandomState,
    ipv6_prefix: u8,
    shared: Option<Shared>,
}

/// Where a shared limit's buckets are: the store and the prefix of this limit's keys.
struct Shared {
    store: Arc<Store>,
    namespace: String,
    on_error: OnStoreError,
}

/// Why a request was limited, for the answer's headers.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub retry_after_secs: u64,
    pub limit: u32,
    /// Refused because the store is down (`on_store_error = "deny"`), not because the limit was reached.
    pub store_down: bool,
}

/// Who a request is counted as, before it is turned into a bucket key.
pub enum Caller<'a> {
    Ip(IpAddr),
    Route,
    /// The issuer and subject, or the issuer and a claim's value (tagged, so a value never equals a subject).
    Hashed(&'a str, &'a str, &'static str),
    Claim(&'a str, String),
}

impl Limiter {
    /// Builds a limiter for the settings; a shared one counts in `store` under the route's name (None: the global
    /// limit). Without a store (which validation does not allow for a shared limit) it counts locally.
    pub fn new(settings: LimitSettings, ipv6_prefix: u8, store: Option<(&Arc<Store>, Option<&str>)>) -> Limiter {
        let (per, burst) = match settings.store {
            LimitStore::Local => (settings.per, settings.burst),
            // The fallback: this replica's share of the limit.
            LimitStore::Shared { replicas, .. } => (
                settings.per.saturating_mul(replicas.max(1)),
                NonZeroU32::new(settings.burst.get() / replicas.max(1)).unwrap_or(NonZeroU32::MIN),
            ),
        };
        let quota = governor::Quota::with_period(per.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let shared = match (settings.store, store) {
            (LimitStore::Shared { on_error, .. }, Some((store, route))) => {
                let namespace = match route {
                    Some(name) => format!("portcullis:rl:route:{}:", key_part(name)),
                    None => "portcullis:rl:global:".to_string(),
                };
                Some(Shared { store: store.clone(), namespace, on_error })
            }
            _ => None,
        };
        Limiter { inner: governor::RateLimiter::keyed(quota), settings, hasher: Default::default(), ipv6_prefix, shared }
    }

    /// Who the request counts as. `who` is the verified token's issuer id and subject: a subject (or claim value)
    /// is only the same caller under the same issuer, so `bob` of one issuer never spends `bob` of another's bucket.
    pub fn caller<'a>(&self, ip: IpAddr, who: Option<(&'a str, &'a str)>, claim: impl FnOnce(&str) -> Option<String>) -> Caller<'a> {
        let by_ip = || Caller::Ip(mask(ip, self.ipv6_prefix));
        match &self.settings.key {
            LimitKey::Ip => by_ip(),
            LimitKey::Route => Caller::Route,
            LimitKey::Subject => who.map_or_else(by_ip, |(issuer, subject)| Caller::Hashed(issuer, subject, "subject")),
            LimitKey::Claim(c) => match (who, claim(c)) {
                (Some((issuer, _)), Some(v)) => Caller::Claim(issuer, v),
                // A token without a usable value: counted by its subject, never by address (spreading over
                // addresses must not multiply anyone's limit).
                (Some((issuer, subject)), None) => Caller::Hashed(issuer, subject, "no claim value"),
                (None, _) => by_ip(),
            },
        }
    }

    /// Builds the local bucket key for a request (see [`Limiter::caller`]).
    pub fn key(&self, ip: IpAddr, who: Option<(&str, &str)>, claim: impl FnOnce(&str) -> Option<String>) -> BucketKey {
        self.bucket(&self.caller(ip, who, claim))
    }

    /// The local bucket key of a caller.
    pub fn key_of(&self, caller: &Caller<'_>) -> BucketKey {
        self.bucket(caller)
    }

    fn bucket(&self, caller: &Caller<'_>) -> BucketKey {
        match caller {
            Caller::Ip(ip) => BucketKey::Ip(*ip),
            Caller::Route => BucketKey::Shared,
            Caller::Hashed(issuer, subject, "subject") => BucketKey::Hashed(self.hasher.hash_one((issuer, subject))),
            Caller::Hashed(issuer, subject, tag) => BucketKey::Hashed(self.hasher.hash_one((issuer, subject, tag))),
            Caller::Claim(issuer, v) => BucketKey::Hashed(self.hasher.hash_one((issuer, v))),
        }
    }

    /// Takes one cell from the bucket, or says how long until one is free.
    pub fn check(&self, key: &BucketKey) -> Result<(), Limited> {
        self.inner.check_key(key).map_err(|not_until| {
            // The limiter's own clock: building a new one calibrates it, which costs microseconds.
            let wait = not_until.wait_time_from(self.inner.clock().now());
            Limited { retry_after_secs: wait.as_millis().div_ceil(1000).max(1) as u64, limit: self.settings.burst.get(), store_down: false }
        })
    }

    /// True for a limit counted in the store (its check awaits).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Checks a shared limit in the store: one round trip, bounded by the store's timeout. While the store is
    /// down, its `on_store_error` decides; the second value says so (for `portcullis_rate_limit_fallback_total`).
    pub async fn check_shared(&self, caller: &Caller<'_>) -> (Result<(), Limited>, bool) {
        let Some(shared) = &self.shared else { return (self.check(&self.bucket(caller)), false) };
        let key = shared_key(&shared.namespace, caller);
        let s = &self.settings;
        match shared.store.gcra(Op::RateLimit, &key, s.per, s.burst.get(), 1).await {
            Ok(g) if g.allowed => (Ok(()), false),
            Ok(g) => {
                let retry_after_secs = (g.wait.as_millis().div_ceil(1000) as u64).max(1);
                (Err(Limited { retry_after_secs, limit: s.burst.get(), store_down: false }), false)
            }
            Err(e) => {
                tracing::debug!(error = %e, on_store_error = shared.on_error.label(), "shared limit decided without the store");
                let result = match shared.on_error {
                    OnStoreError::Local => self.check(&self.bucket(caller)),
                    OnStoreError::Allow => Ok(()),
                    OnStoreError::Deny => Err(Limited { retry_after_secs: 1, limit: s.burst.get(), store_down: true }),
                };
                (result, true)
            }
        }
    }

    /// True if `store` is the store this limiter counts in (a reload keeps the limiter only then).
    fn counts_in(&self, store: Option<&Arc<Store>>) -> bool {
        match (&self.shared, store) {
            (None, _) => self.settings.store == LimitStore::Local || store.is_none(),
            (Some(s), Some(store)) => Arc::ptr_eq(&s.store, store),
            (Some(_), None) => false,
        }
    }

    /// Drops buckets that are full again (idle keys), so memory follows the active key count.
    pub fn prune(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// Counts the keys held now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Returns true if no key is held.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// Shares limiters across reloads: the state of a limit that did not change is kept. `store` is the store and
/// the route whose keys it counts under (None: the global limit).
pub fn reuse_or_new(
    previous: Option<&Arc<Limiter>>,
    settings: &LimitSettings,
    ipv6_prefix: u8,
    store: Option<(&Arc<Store>, Option<&str>)>,
) -> Arc<Limiter> {
    match previous {
        Some(p) if p.settings == *settings && p.ipv6_prefix == ipv6_prefix && p.counts_in(store.map(|s| s.0)) => p.clone(),
        _ => Arc::new(Limiter::new(settings.clone(), ipv6_prefix, store)),
    }
}

/// A name as a part of a store key: percent-encoded, so no name can make another's key (`:` separates).
fn key_part(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The store key of a caller's bucket: the limit's namespace, then the address, or a SHA-256 of the issuer and
/// subject or claim value (fixed length whatever the token holds, the same on every replica, and nothing a token
/// sends reaches Redis as key text).
pub fn shared_key(namespace: &str, caller: &Caller<'_>) -> String {
    let digest = |parts: &[&[u8]]| {
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for p in parts {
            // Length-prefixed: ("ab", "c") and ("a", "bc") differ.
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let d = ctx.finish();
        d.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    match caller {
        Caller::Ip(ip) => format!("{namespace}ip:{ip}"),
        Caller::Route => format!("{namespace}all"),
        Caller::Hashed(issuer, subject, tag) => {
            format!("{namespace}s:{}", digest(&[tag.as_bytes(), issuer.as_bytes(), subject.as_bytes()]))
        }
        Caller::Claim(issuer, value) => format!("{namespace}c:{}", digest(&[b"claim", issuer.as_bytes(), value.as_bytes()])),
    }
}

#[cfg(test)]
mod limiter_tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("10/s").unwrap(), (10, Duration::from_millis(100)));
        assert_eq!(parse_rate("5/min").unwrap(), (5, Duration::from_secs(12)));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("10/fortnight").is_err());
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let l = Limiter::new(
            LimitSettings { key: LimitKey::Ip, per: Duration::from_secs(10), burst: NonZeroU32::new(3).unwrap(), store: LimitStore::Local },
            64,
            None,
        );
        let k = l.key("192.0.2.1".parse().unwrap(), None, |_| None);
        for _ in 0..3 {
            assert!(l.check(&k).is_ok());
        }
        let e = l.check(&k).unwrap_err();
        assert!(e.retry_after_secs >= 1 && e.retry_after_secs <= 10);
        let other = l.key("192.0.2.2".parse().unwrap(), None, |_| None);
        assert!(l.check(&other).is_ok());
    }

    #[test]
    fn a_subject_is_keyed_with_its_issuer() {
        let l = Limiter::new(
            LimitSettings { key: LimitKey::Subject, per: Duration::from_secs(1), burst: NonZeroU32::MIN, store: LimitStore::Local },
            64,
            None,
        );
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(l.key(ip, Some(("a", "bob")), |_| None), l.key(ip, Some(("a", "bob")), |_| None));
        assert_ne!(l.key(ip, Some(("a", "bob")), |_| None), l.key(ip, Some(("b", "bob")), |_| None));
    }

    #[test]
    fn ipv6_keyed_by_prefix() {
        let l = Limiter::new(
            LimitSettings { key: LimitKey::Ip, per: Duration::from_secs(1), burst: NonZeroU32::MIN, store: LimitStore::Local },
            64,
            None,
        );
        let a = l.key("2001:db8:1:2::1".parse().unwrap(), None, |_| None);
        let b = l.key("2001:db8:1:2:ffff::9".parse().unwrap(), None, |_| None);
        assert_eq!(a, b);
    }

    #[test]
    fn shared_keys_are_fixed_shape_and_never_carry_token_text() {
        let hostile = "bob\r\n*3\r\n$3\r\nDEL\r\n:x {y}";
        let a = shared_key("portcullis:rl:r:", &Caller::Hashed("iss", hostile, "subject"));
        assert!(a.starts_with("portcullis:rl:r:s:") && a.len() == "portcullis:rl:r:s:".len() + 32, "{a}");
        assert!(a.bytes().all(|b| b.is_ascii_graphic()));
        assert_ne!(a, shared_key("portcullis:rl:r:", &Caller::Hashed("is", &format!("s{hostile}"), "subject")));
        assert_ne!(a, shared_key("portcullis:rl:r:", &Caller::Claim("iss", hostile.into())));
        assert_eq!(key_part("a:b c"), "a%3Ab%20c");
    }

    #[test]
    fn a_shared_limit_falls_back_to_its_share() {
        let s = LimitSettings {
            key: LimitKey::Ip,
            per: Duration::from_secs(10),
            burst: NonZeroU32::new(9).unwrap(),
            store: LimitStore::Shared { on_error: OnStoreError::Local, replicas: 3 },
        };
        let l = Limiter::new(s, 64, None);
        let k = l.key("192.0.2.1".parse().unwrap(), None, |_| None);
        for _ in 0..3 {
            assert!(l.check(&k).is_ok());
        }
        assert!(l.check(&k).is_err(), "a third of the burst");
    }

    #[test]
    fn pruning_bounds_memory_after_a_key_flood() {
        let l = Limiter::new(
            LimitSettings { key: LimitKey::Subject, per: Duration::from_nanos(1), burst: NonZeroU32::MIN, store: LimitStore::Local },
            64,
            None,
        );
        for i in 0..100_000u32 {
            let k = l.key("192.0.2.1".parse().unwrap(), Some(("iss", &i.to_string())), |_| None);
            let _ = l.check(&k);
        }
        assert!(l.len() > 50_000);
        std::thread::sleep(Duration::from_millis(5));
        l.prune();
        assert!(l.len() < 1000, "{} keys left", l.len());
    }
}
