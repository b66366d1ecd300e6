//! The verified-token cache: sharded, bounded in entries, never serving an expired token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::Principal;

/// One shard: the verified principals by token digest, and the digests in insertion order for eviction.
#[derive(Default)]
struct ShardMap {
    by_key: HashMap<[u8; 32], Arc<Principal>>,
    order: std::collections::VecDeque<[u8; 32]>,
}

type Shard = RwLock<ShardMap>;

/// Verified tokens, keyed by the SHA-256 of the token, kept until their `exp` and never longer. Sharded so no lock
/// is shared by every request; bounded per shard. Only verified tokens are inserted, so invalid tokens cannot
/// evict good entries; and a full shard admits a token on its second use only, so a stream of tokens used once
/// (a flood, or clients that fetch a token per call) cannot flush the tokens clients reuse. Refusing those saves
/// the insert and the eviction of a cold entry, most of what a miss costs beyond the signature check.
pub(super) struct TokenCache {
    shards: Box<[Shard]>,
    per_shard: usize,
    /// The doorkeeper: fingerprints of tokens a full shard did not admit yet, one per slot, overwritten freely.
    seen: Box<[AtomicU64]>,
}

/// How a verified principal enters a full shard.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// On the token's second use (a local signature check is cheap to repeat once).
    SecondUse,
    /// At once (an introspection answer: a network call to repeat).
    Always,
}

/// Doorkeeper slots: 512 KiB, about as many as the cache's default entries.
const SEEN_SLOTS: usize = 1 << 16;

impl TokenCache {
    pub(super) fn new(shards: usize, per_shard: usize) -> TokenCache {
        let seen = (0..SEEN_SLOTS).map(|_| AtomicU64::new(0)).collect();
        TokenCache { shards: (0..shards).map(|_| RwLock::new(ShardMap::default())).collect(), per_shard, seen }
    }

    pub(super) fn key(token: &str) -> [u8; 32] {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut k = [0u8; 32];
        k.copy_from_slice(d.as_ref());
        k
    }

    fn shard(&self, key: &[u8; 32]) -> &Shard {
        &self.shards[usize::from(key[0]) % self.shards.len()]
    }

    pub(super) fn get(&self, key: &[u8; 32], now: u64) -> Option<Arc<Principal>> {
        let shard = self.shard(key).read().ok()?;
        shard.by_key.get(key).filter(|p| now < p.expires_at).cloned()
    }

    /// Inserts a verified principal. A full shard drops its oldest entry: O(1), so a stream of distinct valid
    /// tokens (every request a cache miss) costs the same per request however full the cache is.
    pub(super) fn insert(&self, key: [u8; 32], p: Arc<Principal>, admission: Admission) {
        let Ok(mut shard) = self.shard(&key).write() else {
            return;
        };
        if shard.by_key.len() >= self.per_shard && admission == Admission::SecondUse && !self.seen_before(&key) {
            return;
        }
        if shard.by_key.insert(key, p).is_some() {
            return; // a concurrent miss on the same token got here first
        }
        shard.order.push_back(key);
        while shard.by_key.len() > self.per_shard {
            match shard.order.pop_front() {
                Some(old) => {
                    shard.by_key.remove(&old);
                }
                None => break,
            }
        }
    }

    /// Whether this digest was the last one recorded in its doorkeeper slot; records it either way. The digest is
    /// uniform, so its bytes serve as slot and fingerprint (a collision only admits or delays one token).
    fn seen_before(&self, key: &[u8; 32]) -> bool {
        let word = |at: usize| key[at..at + 8].iter().fold(0u64, |w, b| w << 8 | u64::from(*b));
        let slot = usize::try_from(word(8)).unwrap_or_default() % self.seen.len();
        let fingerprint = word(16) | 1; // never 0, the empty slot
        self.seen[slot].swap(fingerprint, Ordering::Relaxed) == fingerprint
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().map_or(0, |m| m.by_key.len())).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Map;

    fn principal(sub: &str, expires_at: u64) -> Arc<Principal> {
        Arc::new(Principal {
            issuer_id: "i".into(),
            subject: sub.into(),
            roles: vec![],
            scopes: vec![],
            claims: Arc::new(Map::new()),
            expires_at,
            identity_values: Default::default(),
            key_generation: None,
        })
    }

    #[test]
    fn the_token_cache_is_bounded_drops_its_oldest_and_never_serves_expired() {
        let cache = TokenCache::new(1, 3);
        let insert = |i: usize| cache.insert(TokenCache::key(&format!("t{i}")), principal(&format!("s{i}"), 100), Admission::SecondUse);
        for i in 0..3 {
            insert(i);
        }
        assert_eq!(cache.len(), 3, "a shard with room admits at once");
        // Full: a token used once is not admitted (nothing is evicted for it); its second use is, and the oldest
        // goes.
        insert(3);
        assert!(cache.get(&TokenCache::key("t3"), 10).is_none() && cache.get(&TokenCache::key("t0"), 10).is_some());
        insert(3);
        insert(4);
        insert(4);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&TokenCache::key("t0"), 10).is_none() && cache.get(&TokenCache::key("t1"), 10).is_none());
        assert_eq!(cache.get(&TokenCache::key("t4"), 10).unwrap().subject, "s4");
        assert!(cache.get(&TokenCache::key("t4"), 100).is_none(), "not at or after exp");
        // Inserting a token that is already there does not grow the eviction queue.
        insert(4);
        assert_eq!(cache.shards[0].read().unwrap().order.len(), 3);
        // An introspected token is admitted at once, evicting the oldest.
        cache.insert(TokenCache::key("t5"), principal("s5", 100), Admission::Always);
        assert!(cache.get(&TokenCache::key("t5"), 10).is_some() && cache.get(&TokenCache::key("t2"), 10).is_none());
    }
}
