//! Keyed limiters (GCRA, governor): a global one before authentication, per-route ones after it.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

use super::client_addr::mask;

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

/// A checked limit: key, rate and burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub key: LimitKey,
    pub per: Duration,
    pub burst: NonZeroU32,
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
/// is sharded).
pub struct Limiter {
    pub settings: LimitSettings,
    inner: Keyed,
    hasher: std::collections::hash_map::RandomState,
    ipv6_prefix: u8,
}

/// Why a request was limited, for the answer's headers.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub retry_after_secs: u64,
    pub limit: u32,
}

impl Limiter {
    /// Builds a limiter for the settings.
    pub fn new(settings: LimitSettings, ipv6_prefix: u8) -> Limiter {
        let quota = governor::Quota::with_period(settings.per.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| governor::Quota::per_second(NonZeroU32::MIN))
            .allow_burst(settings.burst);
        Limiter { inner: governor::RateLimiter::keyed(quota), settings, hasher: Default::default(), ipv6_prefix }
    }

    /// Builds the bucket key for a request. `who` is the verified token's issuer id and subject: a subject (or
    /// claim value) is only the same caller under the same issuer, so `bob` of one issuer never spends `bob` of
    /// another's bucket.
    pub fn key(&self, ip: IpAddr, who: Option<(&str, &str)>, claim: impl FnOnce(&str) -> Option<String>) -> BucketKey {
        let by_ip = || BucketKey::Ip(mask(ip, self.ipv6_prefix));
        match &self.settings.key {
            LimitKey::Ip => by_ip(),
            LimitKey::Route => BucketKey::Shared,
            LimitKey::Subject => who.map_or_else(by_ip, |w| BucketKey::Hashed(self.hasher.hash_one(w))),
            LimitKey::Claim(c) => match (who, claim(c)) {
                (Some((issuer, _)), Some(v)) => BucketKey::Hashed(self.hasher.hash_one((issuer, v))),
                // A token without a usable value: counted by its subject, never by address (spreading over
                // addresses must not multiply anyone's limit).
                (Some((issuer, subject)), None) => BucketKey::Hashed(self.hasher.hash_one((issuer, subject, "no claim value"))),
                (None, _) => by_ip(),
            },
        }
    }

    /// Takes one cell from the bucket, or says how long until one is free.
    pub fn check(&self, key: &BucketKey) -> Result<(), Limited> {
        self.inner.check_key(key).map_err(|not_until| {
            // The limiter's own clock: building a new one calibrates it, which costs microseconds.
            let wait = not_until.wait_time_from(self.inner.clock().now());
            Limited { retry_after_secs: wait.as_millis().div_ceil(1000).max(1) as u64, limit: self.settings.burst.get() }
        })
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

/// Shares limiters across reloads: the state of a limit that did not change is kept.
pub fn reuse_or_new(previous: Option<&Arc<Limiter>>, settings: &LimitSettings, ipv6_prefix: u8) -> Arc<Limiter> {
    match previous {
        Some(p) if p.settings == *settings && p.ipv6_prefix == ipv6_prefix => p.clone(),
        _ => Arc::new(Limiter::new(settings.clone(), ipv6_prefix)),
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
        let l = Limiter::new(LimitSettings { key: LimitKey::Ip, per: Duration::from_secs(10), burst: NonZeroU32::new(3).unwrap() }, 64);
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
        let l = Limiter::new(LimitSettings { key: LimitKey::Subject, per: Duration::from_secs(1), burst: NonZeroU32::MIN }, 64);
        let ip = "192.0.2.1".parse().unwrap();
        assert_eq!(l.key(ip, Some(("a", "bob")), |_| None), l.key(ip, Some(("a", "bob")), |_| None));
        assert_ne!(l.key(ip, Some(("a", "bob")), |_| None), l.key(ip, Some(("b", "bob")), |_| None));
    }

    #[test]
    fn ipv6_keyed_by_prefix() {
        let l = Limiter::new(LimitSettings { key: LimitKey::Ip, per: Duration::from_secs(1), burst: NonZeroU32::MIN }, 64);
        let a = l.key("2001:db8:1:2::1".parse().unwrap(), None, |_| None);
        let b = l.key("2001:db8:1:2:ffff::9".parse().unwrap(), None, |_| None);
        assert_eq!(a, b);
    }

    #[test]
    fn pruning_bounds_memory_after_a_key_flood() {
        let l = Limiter::new(LimitSettings { key: LimitKey::Subject, per: Duration::from_nanos(1), burst: NonZeroU32::MIN }, 64);
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
