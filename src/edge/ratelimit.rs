//! Who the client is, for limits and forwarding headers: the socket peer, unless that peer is a trusted proxy.
//!
//! Threat model: any client can send `X-Forwarded-For`. It is read only when the socket peer is in
//! `trusted_proxies`, and then from the right (the entries our own proxies appended) leftwards, stopping at the first
//! address that is not a trusted proxy. Garbage entries are never trusted and never fatal.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;

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

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("invalid network {s:?}: expected an address or CIDR like \"10.0.0.0/8\"");
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip.parse::<IpAddr>().map_err(|_| bad())?, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr: ip, prefix })
    }
}

impl Cidr {
    /// Returns true if `ip` lies in this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix)) };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(self.prefix)) };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Returns true if the peer is one of the trusted proxies.
pub fn is_trusted(trusted: &[Cidr], ip: IpAddr) -> bool {
    trusted.iter().any(|c| c.contains(ip))
}

/// Finds the client address: the peer, or for a trusted peer the right-most untrusted address in
/// `X-Forwarded-For` (every line, in order), falling back to `Forwarded: for=`.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr], from: ForwardedFrom) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    if !is_trusted(trusted, peer_ip) {
        return peer_ip;
    }
    // Only the field the trusted proxies write: the other one is the client's, passed through, to forge.
    let hops: Vec<Option<&str>> = match from {
        ForwardedFrom::XForwardedFor => headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(Some)
            .collect(),
        // RFC 7239: parameter names are case-insensitive; an element without `for` is a hop that did not say
        // whom it heard from (None: nothing left of it can be trusted).
        ForwardedFrom::Forwarded => headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|el| !el.trim().is_empty())
            .map(|el| {
                el.split(';').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| v.trim().trim_matches('"'))
                })
            })
            .collect(),
    };
    for hop in hops.iter().rev() {
        match hop.and_then(parse_hop) {
            Some(ip) if is_trusted(trusted, ip) => continue,
            Some(ip) => return ip,
            // Garbage is not an address we can key on, and nothing left of it can be trusted either.
            None => return peer_ip,
        }
    }
    peer_ip
}

/// Which field trusted proxies name the client in (`[rate_limit] forwarded_header`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardedFrom {
    #[default]
    XForwardedFor,
    Forwarded,
}

fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(canonical(sa.ip()));
    }
    // Forwarded: for="[2001:db8::1]:4711"
    let inner = s.strip_prefix('[')?.split(']').next()?;
    inner.parse::<IpAddr>().ok().map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn xff_is_read_only_from_trusted_peers() {
        let trusted = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.2.3.4, 5.6.7.8".parse().unwrap());
        h.append("x-forwarded-for", "10.0.0.2".parse().unwrap());
        let untrusted: SocketAddr = "192.0.2.1:5".parse().unwrap();
        let xff = ForwardedFrom::XForwardedFor;
        assert_eq!(client_ip(untrusted, &h, &trusted, xff), "192.0.2.1".parse::<IpAddr>().unwrap());
        let proxy: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(client_ip(proxy, &h, &trusted, xff), "5.6.7.8".parse::<IpAddr>().unwrap());
        let mut g = HeaderMap::new();
        g.insert("x-forwarded-for", "oh, hi,,127.0.0.1,,,".parse().unwrap());
        assert_eq!(client_ip(proxy, &g, &trusted, xff), "127.0.0.1".parse::<IpAddr>().unwrap());
        // An empty entry (a load balancer's trailing comma) is not a hop.
        let mut e = HeaderMap::new();
        e.insert("x-forwarded-for", "5.6.7.8, ".parse().unwrap());
        assert_eq!(client_ip(proxy, &e, &trusted, xff), "5.6.7.8".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn forwarded_is_read_only_where_configured_and_by_its_own_grammar() {
        let trusted = vec!["127.0.0.1".parse().unwrap()];
        let proxy: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let fwd = ForwardedFrom::Forwarded;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut f = HeaderMap::new();
        f.insert("forwarded", "for=\"[2001:db8::1]:4711\";proto=https".parse().unwrap());
        assert_eq!(client_ip(proxy, &f, &trusted, fwd), ip("2001:db8::1"));
        // The field the proxies do not write is the client's: it is never read.
        assert_eq!(client_ip(proxy, &f, &trusted, ForwardedFrom::XForwardedFor), ip("127.0.0.1"));
        let mut both = f.clone();
        both.insert("x-forwarded-for", "7.7.7.7".parse().unwrap());
        assert_eq!(client_ip(proxy, &both, &trusted, fwd), ip("2001:db8::1"), "a client's X-Forwarded-For chose the key");
        // Parameter names in any case; the right-most element counts.
        let mut c = HeaderMap::new();
        c.insert("forwarded", "for=8.8.9.1, FOR=5.5.5.5".parse().unwrap());
        assert_eq!(client_ip(proxy, &c, &trusted, fwd), ip("5.5.5.5"));
        // A proxy's element without `for`: whom it heard from is unknown, so nothing left of it is taken.
        let mut n = HeaderMap::new();
        n.insert("forwarded", "for=8.8.8.8, proto=https;by=127.0.0.1".parse().unwrap());
        assert_eq!(client_ip(proxy, &n, &trusted, fwd), ip("127.0.0.1"));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Keyed limiters (GCRA, governor): a global one before authentication, per-route ones after it.

use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;

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

/// Keys an address: IPv4 as is, IPv6 by its first `prefix` bits, so rotating inside one allocation buys nothing.
pub(crate) fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) if prefix < 128 => {
            let bits = u128::from(v6);
            let m = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            IpAddr::V6((bits & m).into())
        }
        other => other,
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
