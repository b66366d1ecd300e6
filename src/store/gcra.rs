//! GCRA in Redis: the algorithm governor runs in-process, run atomically by one Lua script, so `rate`, `burst`
//! and the wait mean the same for a shared limit as for a local one, and concurrent decisions cannot race (there
//! is no read-modify-write between replicas: Redis runs one script at a time).
//!
//! The state of a key is its theoretical arrival time (TAT) in microseconds of Redis's own clock (`TIME`), so
//! replicas whose clocks differ still agree. A key expires by itself once its bucket is full again.

use std::sync::LazyLock;
use std::time::Duration;

use super::{Op, Store, StoreError};

/// KEYS[1]: the bucket. ARGV: interval between cells (µs), tolerance = interval × burst (µs), cost (1 takes a
/// cell; -1 gives one back, as when a login attempt charged in advance succeeds). Returns {allowed, wait_us}.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new = tat + cost * interval
if cost > 0 and new - now > tolerance then
  return {0, new - now - tolerance}
end
if new <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1)
end
return {1, 0}
";

static GCRA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SCRIPT));

/// One decision: allowed, or how long until a cell is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub allowed: bool,
    pub wait: Duration,
}

impl Store {
    /// Takes (`cost` 1) or gives back (`cost` -1) one cell of `key`'s bucket: `burst` cells, one more each
    /// `interval`.
    pub async fn gcra(&self, op: Op, key: &str, interval: Duration, burst: u32, cost: i8) -> Result<Gcra, StoreError> {
        let interval_us = u64::try_from(interval.as_micros()).unwrap_or(u64::MAX / 2).max(1);
        let tolerance_us = interval_us.saturating_mul(u64::from(burst));
        let key = key.to_string();
        let answer: Vec<i64> = self
            .call(op, |mut c| async move { Ok(GCRA.key(key).arg(interval_us).arg(tolerance_us).arg(cost).invoke_async(&mut c).await?) })
            .await?;
        match answer.as_slice() {
            [allowed @ (0 | 1), wait] if *wait >= 0 => {
                Ok(Gcra { allowed: *allowed == 1, wait: Duration::from_micros(u64::try_from(*wait).unwrap_or(0)) })
            }
            other => Err(StoreError::Unexpected(format!("rate-limit script answered {other:?}"))),
        }
    }
}
