//! Re-resolving target host names (`resolve_every`): every address a name has becomes a target (a headless
//! Kubernetes service), requests keep the name as `Host` and TLS server name, and targets that left drain.
//! A failed or empty answer keeps the targets there were: a DNS outage does not empty a pool.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use http::uri::Authority;

use super::{Target, Upstream};

type Lookup = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>>;

/// Resolves a host and port to addresses: the system resolver, or another given to `portcullis::start_with`
/// (tests use one whose answers they change).
pub type Resolver = Arc<dyn Fn(&str, u16) -> Lookup + Send + Sync>;

/// The system resolver (getaddrinfo, on tokio's blocking pool).
pub fn system() -> Resolver {
    Arc::new(|host: &str, port: u16| {
        let host = host.to_string();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    })
}

/// True when the authority's host is a name (not an IP literal), so resolving it can change the targets.
pub fn is_name(a: &Authority) -> bool {
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>().is_err()
}

/// Resolves every named target again and swaps in the new set when it differs.
pub async fn refresh(up: &Arc<Upstream>) {
    let s = &up.settings;
    let current = up.targets.load().targets.clone();
    let mut next: Vec<Arc<Target>> = Vec::new();
    for spec in &s.targets {
        let of_spec = || current.iter().filter(|t| t.host == spec.authority && t.weight == spec.weight).cloned();
        if !is_name(&spec.authority) {
            next.extend(of_spec());
            continue;
        }
        let port = spec.authority.port_u16().unwrap_or(if s.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 });
        let lookup = (up.resolver)(spec.authority.host(), port);
        let addrs = match tokio::time::timeout(std::time::Duration::from_secs(5), lookup).await {
            Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
            Ok(Ok(_)) => {
                tracing::warn!(upstream = %s.name, host = %spec.authority, "name resolved to no address; keeping its targets");
                next.extend(of_spec());
                continue;
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %s.name, host = %spec.authority, error = %e, "name did not resolve; keeping its targets");
                next.extend(of_spec());
                continue;
            }
            Err(_) => {
                tracing::warn!(upstream = %s.name, host = %spec.authority, "name resolution timed out; keeping its targets");
                next.extend(of_spec());
                continue;
            }
        };
        let mut addrs: Vec<SocketAddr> = addrs;
        addrs.sort();
        addrs.dedup();
        for addr in addrs {
            let Ok(connect) = Authority::try_from(addr.to_string()) else { continue };
            match current.iter().find(|t| t.same_as(&connect, &spec.authority, spec.weight)) {
                Some(t) => next.push(t.clone()),
                None => next.push(Arc::new(Target::new(s, &spec.authority, connect, spec.weight, &up.tls, &up.metrics))),
            }
        }
    }
    let unchanged = next.len() == current.len() && next.iter().zip(current.iter()).all(|(a, b)| Arc::ptr_eq(a, b));
    if !unchanged && !next.is_empty() {
        let labels: Vec<&str> = next.iter().map(|t| &*t.label).collect();
        tracing::info!(upstream = %s.name, targets = ?labels, "targets changed after resolution");
        up.replace_targets(next);
    }
}
