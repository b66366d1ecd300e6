//! Revocations in Redis: one sorted set of entries scored by the time they may be forgotten (the revoked tokens
//! have all expired by then), a version counter, and a channel that tells every replica of each new entry.
//!
//! An entry is JSON, so no subject or token id can be mistaken for another entry or a separator. A member that
//! does not parse (written by something else) is skipped with a warning, never trusted and never fatal.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use super::{Op, Store, StoreError};

const SET: &str = "portcullis:revoked";
const VERSION: &str = "portcullis:revoked:version";
/// The channel replicas hear new revocations on: `{"version":N,"entry":...,"until":T}`.
pub const REVOCATIONS_CHANNEL: &str = "portcullis:revocations";

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Revocation {
    /// One token, by its `jti`.
    Jti { jti: String },
    /// Every token of a subject issued before `before` (unix seconds): "log out everywhere". Without `issuer`,
    /// the subject of every issuer.
    Subject {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        issuer: Option<String>,
        sub: String,
        before: u64,
    },
}

/// An entry and the unix time after which it can be forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub what: Revocation,
    pub until: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    version: u64,
    until: u64,
    entry: Revocation,
}

/// KEYS: the set, the version, ARGV: member, until, the channel. Adds the entry (keeping the later `until` of a
/// repeated one), drops expired ones (by Redis's clock, not the caller's: a CLI on a machine whose clock runs
/// ahead must not delete live entries), bumps the version and tells every replica.
const REVOKE: &str = r#"
local old = redis.call('ZSCORE', KEYS[1], ARGV[1])
local untl = tonumber(ARGV[2])
if old and tonumber(old) > untl then untl = tonumber(old) end
redis.call('ZADD', KEYS[1], untl, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. redis.call('TIME')[1])
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3], '{"version":' .. v .. ',"until":' .. string.format('%.0f', untl) .. ',"entry":' .. ARGV[1] .. '}')
return v
"#;

/// KEYS: the set, the version. The version and the live entries (by Redis's clock) with their scores, read at once.
const LOAD: &str = r"
local v = tonumber(redis.call('GET', KEYS[2]) or '0')
return {v, redis.call('ZRANGEBYSCORE', KEYS[1], redis.call('TIME')[1], '+inf', 'WITHSCORES')}
";

static REVOKE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(REVOKE));
static LOAD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(LOAD));

impl Store {
    /// Records a revocation for every replica; returns the new version.
    pub async fn revoke(&self, r: &Revoked) -> Result<u64, StoreError> {
        let member = serde_json::to_string(&r.what).map_err(|e| StoreError::Unexpected(e.to_string()))?;
        let until = r.until;
        self.call(Op::Revoke, |mut c| async move {
            Ok(REVOKE_SCRIPT.key(SET).key(VERSION).arg(member).arg(until).arg(REVOCATIONS_CHANNEL).invoke_async(&mut c).await?)
        })
        .await
    }

    /// The revocation version (bumped by every new entry).
    pub async fn revocations_version(&self) -> Result<u64, StoreError> {
        let v: Option<u64> =
            self.call(Op::RevocationsLoad, |mut c| async move { Ok(redis::cmd("GET").arg(VERSION).query_async(&mut c).await?) }).await?;
        Ok(v.unwrap_or(0))
    }

    /// Every live revocation, with the version they make up.
    pub async fn revocations(&self) -> Result<(u64, Vec<Revoked>), StoreError> {
        let (version, flat): (u64, Vec<(String, f64)>) = self
            .call(Op::RevocationsLoad, |mut c| async move { Ok(LOAD_SCRIPT.key(SET).key(VERSION).invoke_async(&mut c).await?) })
            .await?;
        let mut out = Vec::with_capacity(flat.len());
        for (member, until) in flat {
            match serde_json::from_str::<Revocation>(&member) {
                Ok(what) => out.push(Revoked { what, until: until.max(0.0) as u64 }),
                Err(e) => tracing::warn!(error = %e, "store: skipped a revocation entry that does not parse"),
            }
        }
        Ok((version, out))
    }
}

impl Store {
    /// Subscribes to new revocations on a connection of its own: each message is one entry with the version it
    /// made (None: a message that is not one of ours). The stream ends when the connection does.
    pub async fn subscribe_revocations(&self) -> Result<RevocationStream, StoreError> {
        let mut ps = self.pubsub().await?;
        let bound = self.setup_bound();
        tokio::time::timeout(bound, ps.subscribe(REVOCATIONS_CHANNEL)).await.map_err(|_| StoreError::Timeout(bound))??;
        Ok(Box::pin(futures_util::StreamExt::map(ps.into_on_message(), |m| parse_message(m.get_payload_bytes()))))
    }
}

/// New revocations as they are made, see [`Store::subscribe_revocations`].
pub type RevocationStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Option<(u64, Revoked)>> + Send>>;

/// Reads a message of [`REVOCATIONS_CHANNEL`]: the version it made, and the entry (None: not one of ours).
pub fn parse_message(payload: &[u8]) -> Option<(u64, Revoked)> {
    let m: Message = serde_json::from_slice(payload).ok()?;
    Some((m.version, Revoked { what: m.entry, until: m.until }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_json_and_hostile_text_stays_inside_its_field() {
        let r = Revocation::Subject { issuer: None, sub: "a\",\"kind\":\"jti\"\n\u{1f}".into(), before: 5 };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Revocation>(&s).unwrap(), r);
        let msg = format!("{{\"version\":3,\"until\":9,\"entry\":{s}}}");
        assert_eq!(parse_message(msg.as_bytes()), Some((3, Revoked { what: r, until: 9 })));
        assert!(parse_message(b"garbage").is_none());
        assert!(parse_message(b"{\"version\":1,\"until\":2,\"entry\":{\"kind\":\"jti\",\"jti\":\"x\",\"extra\":1}}").is_none());
    }
}
