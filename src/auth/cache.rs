//! The verified-token cache: sharded, bounded in entries, never serving an expired token.

use std::collections::HashMap;
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
/// evict good entries.
pub(super) struct TokenCache {
    shards: Box<[Shard]>,
    per_shard: usize,
}

impl TokenCache {
    pub(super) fn new(shards: usize, per_shard: usize) -> TokenCache {
        TokenCache { shards: (0..shards).map(|_| RwLock::new(ShardMap::default())).collect(), per_shard }
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
    pub(super) fn insert(&self, key: [u8; 32], p: Arc<Principal>) {
        let Ok(mut shard) = self.shard(&key).write() else {
            return;
        };
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
        for i in 0..5 {
            cache.insert(TokenCache::key(&format!("t{i}")), principal(&format!("s{i}"), 100));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&TokenCache::key("t0"), 10).is_none() && cache.get(&TokenCache::key("t1"), 10).is_none());
        assert_eq!(cache.get(&TokenCache::key("t4"), 10).unwrap().subject, "s4");
        assert!(cache.get(&TokenCache::key("t4"), 100).is_none(), "not at or after exp");
        // Inserting a token that is already there does not grow the eviction queue.
        cache.insert(TokenCache::key("t4"), principal("s4", 100));
        assert_eq!(cache.shards[0].read().unwrap().order.len(), 3);
    }
}
