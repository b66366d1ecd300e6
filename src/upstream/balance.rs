//! Choosing a target: weighted round robin, least request (power of two choices), or consistent hashing of a
//! header, a claim or the client address (weighted rendezvous hashing: removing a target moves only its keys).
//!
//! Targets that failed their checks or were ejected are passed over; when none is left every target is tried
//! anyway (panic mode, as Envoy does), since refusing everything is worse than trying a target that may be back.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};

use super::{Target, Upstream};
use crate::auth::Principal;

/// How an upstream's requests are spread over its targets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Balance {
    /// Each target in turn, as often as its weight.
    #[default]
    RoundRobin,
    /// Of two targets drawn at random, the one with fewer requests in flight per unit of weight.
    LeastRequest,
    /// The same key always reaches the same target while the set is stable.
    Hash(HashKey),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    /// A claim of the verified token (dotted names reach into objects).
    Claim(String),
    /// The client's address (after trusted proxies).
    Ip,
}

impl Balance {
    /// Parses `round_robin`, `least_request`, `hash:header:NAME`, `hash:claim:NAME` or `hash:ip`.
    pub fn parse(s: &str) -> Result<Balance, String> {
        match s {
            "round_robin" => return Ok(Balance::RoundRobin),
            "least_request" => return Ok(Balance::LeastRequest),
            "hash:ip" => return Ok(Balance::Hash(HashKey::Ip)),
            _ => {}
        }
        if let Some(name) = s.strip_prefix("hash:header:") {
            return HeaderName::from_bytes(name.as_bytes())
                .map(|h| Balance::Hash(HashKey::Header(h)))
                .map_err(|_| format!("balance {s:?}: {name:?} is not a header name"));
        }
        if let Some(name) = s.strip_prefix("hash:claim:") {
            if name.is_empty() || name.split('.').any(str::is_empty) {
                return Err(format!("balance {s:?}: the claim name is empty"));
            }
            return Ok(Balance::Hash(HashKey::Claim(name.to_string())));
        }
        Err(format!("unknown balance {s:?}: expected round_robin, least_request, hash:header:NAME, hash:claim:NAME or hash:ip"))
    }

    /// The key of a request under `hash:*` (None: round robin for this request, e.g. the header is absent).
    pub fn key(&self, headers: &HeaderMap, principal: Option<&Principal>, client: IpAddr) -> Option<u64> {
        let Balance::Hash(key) = self else { return None };
        match key {
            HashKey::Header(name) => headers.get(name).map(|v| stable_hash(v.as_bytes())),
            HashKey::Claim(name) => {
                let value = crate::auth::lookup_claim(&principal?.claims, name)?;
                Some(match value {
                    serde_json::Value::String(s) => stable_hash(s.as_bytes()),
                    other => stable_hash(other.to_string().as_bytes()),
                })
            }
            HashKey::Ip => Some(match client {
                IpAddr::V4(a) => stable_hash(&a.octets()),
                IpAddr::V6(a) => stable_hash(&a.octets()),
            }),
        }
    }
}

impl std::fmt::Display for Balance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Balance::RoundRobin => f.write_str("round_robin"),
            Balance::LeastRequest => f.write_str("least_request"),
            Balance::Hash(HashKey::Header(h)) => write!(f, "hash:header:{h}"),
            Balance::Hash(HashKey::Claim(c)) => write!(f, "hash:claim:{c}"),
            Balance::Hash(HashKey::Ip) => f.write_str("hash:ip"),
        }
    }
}

/// FNV-1a, finished with a SplitMix64 step: the same on every replica and every build, unlike std's hasher.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The smooth weighted round-robin order (nginx's): each index as often as its weight, spread out rather than
/// in runs. Weights are reduced by their common divisor first, so `[2, 4]` makes a schedule of 3.
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |a, &w| gcd(a, w)).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(u32::try_from(best).unwrap_or(0));
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Upstream {
    /// Picks the target for one attempt, passing over those in `tried` (earlier attempts of the same request)
    /// unless no other is left. None only for an upstream without targets.
    pub fn pick(&self, key: Option<u64>, tried: &[Arc<Target>]) -> Option<Arc<Target>> {
        let set = self.targets.load();
        let targets = &set.targets;
        if targets.len() == 1 {
            return targets.first().cloned();
        }
        let now = self.now_ms();
        let untried = |t: &Arc<Target>| !tried.iter().any(|x| Arc::ptr_eq(x, t));
        let usable = |t: &Arc<Target>| t.health.available(now) && untried(t);
        let chosen = match (&self.settings.balance, key) {
            (Balance::Hash(_), Some(key)) => rendezvous(targets, key, usable).or_else(|| rendezvous(targets, key, untried)),
            (Balance::LeastRequest, _) => two_choices(targets, usable).or_else(|| two_choices(targets, untried)),
            _ => self.round_robin(&set, usable).or_else(|| self.round_robin(&set, untried)),
        };
        chosen.or_else(|| targets.first()).cloned()
    }

    fn round_robin<'s>(&self, set: &'s super::TargetSet, ok: impl Fn(&Arc<Target>) -> bool) -> Option<&'s Arc<Target>> {
        let n = set.schedule.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).map(|i| &set.targets[set.schedule[(start + i) % n] as usize]).find(|t| ok(t))
    }
}

/// The target with the highest weighted rendezvous score for `key` among those `ok` accepts.
fn rendezvous(targets: &[Arc<Target>], key: u64, ok: impl Fn(&Arc<Target>) -> bool) -> Option<&Arc<Target>> {
    let score = |t: &Target| {
        // A uniform draw in (0, 1) from key and target; -weight / ln(u) is the weighted rendezvous score.
        let u = ((mix(key ^ t.hash) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        f64::from(t.weight) / -u.ln()
    };
    targets.iter().filter(|t| ok(t)).max_by(|a, b| score(a).total_cmp(&score(b)))
}

/// Power of two choices: of two distinct targets drawn at random, the one with less in flight per weight.
fn two_choices(targets: &[Arc<Target>], ok: impl Fn(&Arc<Target>) -> bool) -> Option<&Arc<Target>> {
    let candidates: Vec<&Arc<Target>> = targets.iter().filter(|t| ok(t)).collect();
    let n = candidates.len();
    if n <= 1 {
        return candidates.first().copied();
    }
    let r = crate::edge::headers_request::next_random();
    let a = (r % n as u64) as usize;
    let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
    let load = |t: &Target| t.in_flight.load(Ordering::Relaxed) as f64 / f64::from(t.weight.max(1));
    Some(if load(candidates[b]) < load(candidates[a]) { candidates[b] } else { candidates[a] })
}
