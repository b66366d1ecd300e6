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
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = canonical(peer.ip());
    if !is_trusted(trusted, peer_ip) {
        return peer_ip;
    }
    let xff: Vec<&str> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).collect();
    let forwarded: Vec<&str> = if xff.is_empty() {
        headers
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|el| el.split(';').map(str::trim).find_map(|kv| kv.strip_prefix("for=").or_else(|| kv.strip_prefix("For="))))
            .map(|v| v.trim_matches('"'))
            .collect()
    } else {
        Vec::new()
    };
    let hops = if xff.is_empty() { forwarded } else { xff };
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(ip) if is_trusted(trusted, ip) => continue,
            Some(ip) => return ip,
            // Garbage is not an address we can key on, and nothing left of it can be trusted either.
            None => return peer_ip,
        }
    }
    peer_ip
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
        assert_eq!(client_ip(untrusted, &h, &trusted), "192.0.2.1".parse::<IpAddr>().unwrap());
        let proxy: SocketAddr = "127.0.0.1:5".parse().unwrap();
        assert_eq!(client_ip(proxy, &h, &trusted), "5.6.7.8".parse::<IpAddr>().unwrap());
        let mut g = HeaderMap::new();
        g.insert("x-forwarded-for", "oh, hi,,127.0.0.1,,,".parse().unwrap());
        assert_eq!(client_ip(proxy, &g, &trusted), "127.0.0.1".parse::<IpAddr>().unwrap());
        let mut f = HeaderMap::new();
        f.insert("forwarded", "for=\"[2001:db8::1]:4711\";proto=https".parse().unwrap());
        assert_eq!(client_ip(proxy, &f, &trusted), "2001:db8::1".parse::<IpAddr>().unwrap());
    }
}
