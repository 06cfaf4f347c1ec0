//! The per-account rate limit: an exact sliding window shared by every replica through Redis.
//!
//! Each admitted handoff is a member of a sorted set scored by the Redis server's clock in
//! microseconds. One script drops members older than the window, counts the rest and admits the
//! request only if that count is under the limit, so no window of that length, wherever it
//! starts, ever holds more than `limit` admissions (a fixed window admits twice the limit across
//! its edge). One round trip (EVALSHA, reloaded after NOSCRIPT); the server's clock, so replicas
//! with skewed clocks agree.

use std::time::Duration;

use c2m_storage::RedisHandle;

const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
";

/// What the limiter decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over the limit: a slot frees after this long.
    Limited {
        retry_after: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Limiter {
    redis: RedisHandle,
    script: redis::Script,
    window: Duration,
}

impl Limiter {
    pub fn new(redis: RedisHandle, window: Duration) -> Self {
        Self {
            redis,
            script: redis::Script::new(SCRIPT),
            window,
        }
    }

    /// Admits one request of `account_id` if fewer than `limit` were admitted in the last window.
    pub async fn admit(&self, account_id: &str, limit: u32) -> redis::RedisResult<Admission> {
        let mut connection = self.redis.connection().await?;
        let member = uuid::Uuid::new_v4().simple().to_string();
        let (admitted, wait_us): (i64, i64) = self
            .script
            .key(self.redis.account_key(account_id, "rl"))
            .arg(limit)
            .arg(self.window.as_micros() as u64)
            .arg(member)
            .invoke_async(&mut connection)
            .await?;
        Ok(if admitted == 1 {
            Admission::Admitted
        } else {
            Admission::Limited {
                retry_after: Duration::from_micros(wait_us.max(1) as u64),
            }
        })
    }
}
