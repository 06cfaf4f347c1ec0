//! [`Coordination`] on Redis: one script per handoff (EVALSHA, reloaded after NOSCRIPT), every
//! key of an account under its hash tag so the script runs on Redis Cluster.
//!
//! The rate limit is an exact sliding window: each admission is a member of a sorted set scored
//! by the Redis server's clock in microseconds; the script drops members older than the window
//! and admits only while fewer than `limit` remain. No window of that length, wherever it starts,
//! holds more than `limit` admissions (a fixed window admits twice the limit across its edge),
//! and replicas with skewed clocks agree because only the server's clock counts. Each window has
//! a marker (`rl:known`): a Redis that lost its data (a restart, a flush, a failover to a replica
//! that lagged) lacks it, and the script then admits nothing until the window is filled in.

use std::{sync::Arc, time::Duration};

use ::redis::AsyncCommands;
use c2m_runtime::Probe;

use super::{Admitted, Ask, Coordination, CoordinationError, Decision, Held, Passage, Terms};
use crate::RedisHandle;

const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if redis.call('EXISTS', KEYS[5]) == 0 then return {4, now, ''} end
local seen = redis.call('GET', KEYS[2])
if seen then return {2, now, seen} end
local conversation = redis.call('GET', KEYS[4])
if not conversation then
  local holder = redis.call('GET', KEYS[3])
  if holder then return {3, now, holder} end
end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, now, tostring(tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
redis.call('PEXPIRE', KEYS[5], ARGV[6])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
if conversation then return {1, now, conversation} end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[5])
return {1, now, ''}
";

/// Fills an account's window in (KEYS[1]) with the ARGV[3] admissions, pairs of handoff id and
/// age in microseconds after it, scored by the server's clock less their age (members already
/// there keep their score); sets the consumer leases KEYS[3..] that are not set, from the pairs
/// of handoff id and milliseconds left after the admissions; then marks the window known
/// (KEYS[2], for ARGV[2] milliseconds).
const FILL_IN: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[3])
for i = 0, n - 1 do
  redis.call('ZADD', KEYS[1], 'NX', now - tonumber(ARGV[5 + 2 * i]), ARGV[4 + 2 * i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000))
local first = 4 + 2 * n
for k = 3, #KEYS do
  local at = first + 2 * (k - 3)
  redis.call('SET', KEYS[k], ARGV[at], 'PX', ARGV[at + 1], 'NX')
end
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
return 0
";

/// Deletes the keys (KEYS) that still name the handoff (ARGV[1]).
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
";

/// The Redis backend. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisCoordination {
    redis: RedisHandle,
    admit: ::redis::Script,
    fill_in: ::redis::Script,
    release: ::redis::Script,
}

impl std::fmt::Debug for RedisCoordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisCoordination")
            .field(&self.redis)
            .finish()
    }
}

impl RedisCoordination {
    pub fn new(redis: RedisHandle) -> Self {
        Self {
            redis,
            admit: ::redis::Script::new(ADMIT),
            fill_in: ::redis::Script::new(FILL_IN),
            release: ::redis::Script::new(RELEASE),
        }
    }
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros().try_into().unwrap_or(u64::MAX)
}

/// At least one millisecond: Redis refuses a zero expiry.
fn millis(duration: Duration) -> u64 {
    duration.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

#[async_trait::async_trait]
impl Coordination for RedisCoordination {
    async fn admit(
        &self,
        ask: Ask<'_>,
        terms: Terms,
    ) -> Result<Option<Decision>, CoordinationError> {
        let redis = &self.redis;
        let mut connection = redis.connection().await?;
        let (code, at_us, value): (i64, i64, String) = self
            .admit
            .key(redis.rate_window_key(ask.account_id))
            .key(redis.idempotency_key(ask.account_id, ask.idempotency_key))
            .key(redis.consumer_lease_key(ask.account_id, ask.consumer))
            .key(redis.conversation_lease_key(ask.account_id, ask.consumer))
            .key(redis.rate_known_key(ask.account_id))
            .arg(ask.limit)
            .arg(micros(terms.window))
            .arg(ask.handoff_id)
            .arg(millis(terms.claim_ttl))
            .arg(millis(terms.consumer_lease))
            .arg(millis(terms.known_for))
            .invoke_async(&mut connection)
            .await?;
        let passage = match code {
            4 => return Ok(None),
            1 => Passage::Admitted {
                open_conversation: Some(value).filter(|v| !v.is_empty()),
            },
            2 => Passage::Duplicate { handoff_id: value },
            3 => Passage::ConsumerBusy { handoff_id: value },
            _ => Passage::Limited {
                retry_after: Duration::from_micros(value.parse::<u64>().unwrap_or(1).max(1)),
            },
        };
        Ok(Some(Decision {
            passage,
            at_us,
            local: false,
        }))
    }

    async fn fill_in(
        &self,
        account_id: &str,
        terms: Terms,
        admitted: &[Admitted<'_>],
        leases: &[Held<'_>],
    ) -> Result<(), CoordinationError> {
        let redis = &self.redis;
        let mut connection = redis.connection().await?;
        let mut fill_in = self.fill_in.key(redis.rate_window_key(account_id));
        fill_in
            .key(redis.rate_known_key(account_id))
            .arg(micros(terms.window))
            .arg(millis(terms.known_for))
            .arg(admitted.len());
        for admission in admitted {
            fill_in.arg(admission.handoff_id).arg(micros(admission.age));
        }
        for held in leases {
            fill_in
                .key(redis.consumer_lease_key(account_id, held.consumer))
                .arg(held.handoff_id)
                .arg(millis(held.left));
        }
        fill_in.invoke_async::<()>(&mut connection).await?;
        Ok(())
    }

    async fn release(
        &self,
        account_id: &str,
        handoff_id: &str,
        idempotency_key: Option<&str>,
        consumer: &str,
    ) -> Result<(), CoordinationError> {
        let redis = &self.redis;
        let mut connection = redis.connection().await?;
        let mut release = self
            .release
            .key(redis.consumer_lease_key(account_id, consumer));
        if let Some(key) = idempotency_key {
            release.key(redis.idempotency_key(account_id, key));
        }
        release
            .arg(handoff_id)
            .invoke_async::<()>(&mut connection)
            .await?;
        Ok(())
    }

    async fn set_conversation(
        &self,
        account_id: &str,
        consumer: &str,
        conversation_id: Option<&str>,
        ttl: Duration,
    ) -> Result<(), CoordinationError> {
        let key = self.redis.conversation_lease_key(account_id, consumer);
        let mut connection = self.redis.connection().await?;
        match conversation_id {
            Some(id) => {
                connection
                    .pset_ex::<_, _, ()>(&key, id, millis(ttl))
                    .await?
            }
            None => connection.del::<_, ()>(&key).await?,
        }
        Ok(())
    }

    fn probe(&self) -> Option<Arc<dyn Probe>> {
        Some(self.redis.probe())
    }
}
