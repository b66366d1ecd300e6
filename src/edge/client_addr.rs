//! Who the client is, for limits and forwarding headers: the socket peer, unless that peer is a trusted proxy.
//!
//! Threat model: any client can send `X-Forwarded-For`. It is read only when the socket peer is in
//! `trusted_proxies`, and then from the right (the entries our own proxies appended) leftwards, stopping at the first
//! address that is not a trusted proxy. Garbage entries are never trusted and never fatal.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;

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
