//! The hot path's one Redis round trip: a single script (EVALSHA, reloaded after NOSCRIPT) that
//! claims the idempotency key, takes the consumer's handoff lease, applies the account's rate
//! limit and reads the consumer's open-conversation lease. Every key carries the account as its
//! hash tag, so the script runs on Redis Cluster.
//!
//! The rate limit is an exact sliding window: each admitted handoff is a member of a sorted set
//! scored by the Redis server's clock in microseconds; the script drops members older than the
//! window and admits only while fewer than `limit` remain. No window of that length, wherever it
//! starts, holds more than `limit` admissions (a fixed window admits twice the limit across its
//! edge), and replicas with skewed clocks agree because only the server's clock counts.
//!
//! Redis may lose what it holds (a restart, a flush, a failover to a replica that lagged). Each
//! account's window therefore has a marker (`<prefix>:{<account>}:rl:known`, kept a day past the
//! account's last admission): without it the script admits nothing and says so, and the window
//! is first filled in from PostgreSQL's handoffs of the last window. The same is done for an
//! account this replica admitted from memory while Redis was unreachable, once Redis answers
//! again. The limit then holds across the loss, except for handoffs admitted in the moment
//! before it that had not yet been written (at most the account's handoffs in flight then). The
//! consumer's lease and the idempotency key have their own record in PostgreSQL (see `store`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use c2m_storage::{RedisHandle, redis::Breaker};

pub use crate::passage::{Ask, Decision, Passage};
use crate::{
    local_gate::LocalGate,
    store::{HandoffStore, Recent},
};

const SCRIPT: &str = r"
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

/// Fills an account's window in (KEYS[1]) with the ARGV[3] admissions PostgreSQL knows of, pairs
/// of handoff id and age in microseconds after it, scored by the server's clock less their age
/// (members already there keep their score); sets the consumer leases KEYS[3..] that are not set,
/// from the pairs of handoff id and milliseconds left after the admissions; then marks the window
/// known (KEYS[2], for ARGV[2] milliseconds).
const SEED: &str = r"
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

/// How long an account's window stays known after its last admission.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// How long an idempotency claim lasts. PostgreSQL keeps idempotency records for 24 hours;
/// Redis only has to cover the moments before the first request commits (which includes a save
/// retried while PostgreSQL was away: see `Service::commit`).
pub const CLAIM_TTL: Duration = Duration::from_secs(60);

/// Gives back a claim and a lease (KEYS) where they still name the handoff (ARGV[1]).
const RELEASE: &str = r"
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key) end
end
return 0
";

#[derive(Clone)]
pub struct Gate {
    redis: RedisHandle,
    /// Where the handoffs of the last window are read from when Redis has lost them.
    store: Arc<dyn HandoffStore>,
    script: redis::Script,
    release: redis::Script,
    seed: redis::Script,
    /// Accounts this replica admitted from memory, and when it last did: Redis does not know of
    /// those admissions, so their windows are filled in from PostgreSQL once it answers again.
    decided_here: Arc<Mutex<HashMap<String, Instant>>>,
    /// Accounts whose recent handoffs this replica took in from PostgreSQL since Redis went
    /// away; forgotten when Redis answers again (the next outage takes them in afresh).
    seeded: Arc<Mutex<std::collections::HashSet<String>>>,
    /// Held while an account is taken in, so that the decisions that come meanwhile wait for it
    /// rather than pass on a memory that does not yet know what Redis admitted.
    seeding: Arc<tokio::sync::Mutex<()>>,
    window: Duration,
    idempotency_ttl: Duration,
    consumer_lease: Duration,
    local: Arc<LocalGate>,
    /// After Redis fails, the gate decides locally for a second before trying it again.
    breaker: Breaker,
}

impl Gate {
    /// `replicas`: how many Handoff replicas share the account limits, for the local fallback.
    pub fn new(
        redis: RedisHandle,
        store: Arc<dyn HandoffStore>,
        window: Duration,
        consumer_lease: Duration,
        replicas: u32,
    ) -> Self {
        let idempotency_ttl = CLAIM_TTL;
        Self {
            redis,
            store,
            script: redis::Script::new(SCRIPT),
            release: redis::Script::new(RELEASE),
            seed: redis::Script::new(SEED),
            decided_here: Arc::default(),
            seeded: Arc::default(),
            seeding: Arc::default(),
            window,
            idempotency_ttl,
            consumer_lease,
            local: Arc::new(LocalGate::new(
                window,
                idempotency_ttl,
                consumer_lease,
                replicas,
            )),
            breaker: Breaker::new("handoff"),
        }
    }

    /// The decision for one handoff: from Redis (one round trip), or from this replica's memory
    /// while Redis is unreachable.
    pub async fn decide(&self, ask: Ask<'_>) -> Decision {
        if !self.breaker.is_open() {
            match self.decide_exactly(ask).await {
                Ok(decision) => {
                    if self.breaker.succeeded() {
                        tracing::info!("redis is back: exact limits again");
                        self.seeded
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clear();
                    }
                    return decision;
                }
                Err(error) => {
                    if self.breaker.failed() {
                        tracing::warn!(%error, "redis unavailable: deciding in this replica (degraded)");
                    }
                }
            }
        }
        self.decided_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ask.account_id.to_owned(), Instant::now());
        if !self.seeded(ask.account_id) {
            let _seeding = self.seeding.lock().await;
            if !self.seeded(ask.account_id) {
                self.seed_local(ask.account_id).await;
                // Marked once taken in (whatever came of it: a PostgreSQL that does not answer is
                // not asked again on every decision), so no decision passes before.
                self.seeded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ask.account_id.to_owned());
            }
        }
        self.local.pass(ask, Instant::now())
    }

    /// Whether this replica took in PostgreSQL's view of the account since Redis went away.
    fn seeded(&self, account_id: &str) -> bool {
        self.seeded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(account_id)
    }

    /// The first decision from memory for an account since Redis went away: the handoffs Redis
    /// admitted until then are only in Redis and PostgreSQL, so this replica takes them in from
    /// PostgreSQL (its window, and the consumers they hold), or a second handoff for a consumer
    /// Redis admitted a moment ago would message them again.
    async fn seed_local(&self, account_id: &str) {
        let span = self.window.max(self.consumer_lease);
        let recent = match self.store.recent(account_id, span).await {
            Ok(recent) => recent,
            Err(error) => {
                tracing::warn!(account_id, %error, "deciding from memory without postgresql's recent handoffs");
                return;
            }
        };
        let admitted: Vec<Duration> = recent
            .iter()
            .filter(|r| r.age < self.window)
            .map(|r| r.age)
            .collect();
        let leases = latest_leases(&recent, self.consumer_lease);
        let leases: Vec<(&str, &str, Duration)> = leases
            .iter()
            .map(|(consumer, held)| {
                (
                    *consumer,
                    held.handoff_id.as_str(),
                    self.consumer_lease.saturating_sub(held.age),
                )
            })
            .collect();
        tracing::info!(
            account_id,
            admissions = admitted.len(),
            leases = leases.len(),
            "deciding from memory: window and consumer leases taken in from postgresql"
        );
        self.local
            .seed(account_id, &admitted, &leases, Instant::now());
    }

    /// The decision from Redis, the account's window filled in first where Redis lacks
    /// admissions: ones this replica made from memory lately, or all of them (Redis lost them).
    /// An error when Redis (or PostgreSQL, to fill a window in) cannot be reached.
    pub async fn decide_exactly(&self, ask: Ask<'_>) -> Result<Decision, GateError> {
        let here_lately = {
            let mut here = self.decided_here.lock().unwrap_or_else(|p| p.into_inner());
            here.remove(ask.account_id)
                .is_some_and(|at| at.elapsed() < self.window)
        };
        if here_lately {
            self.fill_in(ask.account_id).await?;
        }
        if let Some(decision) = self.pass(ask).await? {
            return Ok(decision);
        }
        self.fill_in(ask.account_id).await?;
        Ok(self.pass(ask).await?.unwrap_or(Decision {
            // Lost again at once (a flush in between): a moment's wait, not a guess.
            passage: Passage::Limited {
                retry_after: Duration::from_millis(10),
            },
            at_us: 0,
            local: false,
        }))
    }

    /// Fills the account's window and its consumers' leases in from the handoffs PostgreSQL has
    /// of the last window and lease.
    async fn fill_in(&self, account_id: &str) -> Result<(), GateError> {
        let recent = self
            .store
            .recent(account_id, self.window.max(self.consumer_lease))
            .await?;
        let admissions: Vec<_> = recent.iter().filter(|r| r.age < self.window).collect();
        let leases = latest_leases(&recent, self.consumer_lease);
        tracing::info!(
            account_id,
            admissions = admissions.len(),
            leases = leases.len(),
            "rate-limit window and consumer leases filled in from postgresql"
        );
        let mut connection = self.redis.connection().await?;
        let mut seed = self.seed.key(self.redis.rate_window_key(account_id));
        seed.key(self.known_key(account_id))
            .arg(self.window.as_micros() as u64)
            .arg(KNOWN_FOR.as_millis() as u64)
            .arg(admissions.len());
        for admitted in &admissions {
            seed.arg(&admitted.handoff_id)
                .arg(admitted.age.as_micros() as u64);
        }
        for (consumer, held) in &leases {
            let left = self
                .consumer_lease
                .saturating_sub(held.age)
                .as_millis()
                .max(1);
            seed.key(self.redis.consumer_lease_key(account_id, consumer))
                .arg(&held.handoff_id)
                .arg(left as u64);
        }
        seed.invoke_async::<()>(&mut connection).await?;
        Ok(())
    }

    fn known_key(&self, account_id: &str) -> String {
        self.redis.rate_known_key(account_id)
    }

    /// Gives back what admitting `ask` took, for a handoff that ends before anything is sent (a
    /// refused request, or a retry an earlier request's record answers): its idempotency claim,
    /// so the corrected request can use the key at once, and its consumer lease, so the next call
    /// for that consumer is not skipped in favour of a handoff that never was. Each only where it
    /// still names this handoff. The rate-limit slot stays taken: the request was made. A failed
    /// release is logged; the claim and the lease expire on their own.
    pub async fn release(&self, ask: Ask<'_>) {
        self.local.release(ask);
        if self.breaker.is_open() {
            return;
        }
        let released = async {
            let mut connection = self.redis.connection().await?;
            self.release
                .key(self.claim_key(ask))
                .key(self.lease_key(ask))
                .arg(ask.handoff_id)
                .invoke_async::<()>(&mut connection)
                .await
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, handoff_id = ask.handoff_id, "claim and lease not released; they expire on their own");
        }
    }

    /// Gives back the consumer's lease where it still names `handoff_id`: a handoff that sent
    /// nothing does not hold its consumer. A failed release is logged; the lease expires.
    pub async fn release_lease(&self, account_id: &str, consumer: &str, handoff_id: &str) {
        self.local.release_lease(account_id, consumer, handoff_id);
        if self.breaker.is_open() {
            return;
        }
        let released = async {
            let mut connection = self.redis.connection().await?;
            self.release
                .key(self.redis.consumer_lease_key(account_id, consumer))
                .arg(handoff_id)
                .invoke_async::<()>(&mut connection)
                .await
        };
        if let Err(error) = released.await {
            tracing::warn!(%error, handoff_id, "consumer lease not released; it expires on its own");
        }
    }

    fn claim_key(&self, ask: Ask<'_>) -> String {
        self.redis
            .idempotency_key(ask.account_id, ask.idempotency_key)
    }

    fn lease_key(&self, ask: Ask<'_>) -> String {
        self.redis.consumer_lease_key(ask.account_id, ask.consumer)
    }

    /// The Redis key of the open-conversation lease Routing holds for a consumer.
    pub fn conversation_key(&self, account_id: &str, consumer: &str) -> String {
        self.redis.conversation_lease_key(account_id, consumer)
    }

    /// One round trip: `EVALSHA`, or `EVAL` once after the script cache was emptied. None when
    /// Redis does not know the account's window (it lost it): nothing was decided.
    async fn pass(&self, ask: Ask<'_>) -> redis::RedisResult<Option<Decision>> {
        let mut connection = self.redis.connection().await?;
        let (code, at_us, value): (i64, i64, String) = self
            .script
            .key(self.redis.rate_window_key(ask.account_id))
            .key(self.claim_key(ask))
            .key(self.lease_key(ask))
            .key(self.conversation_key(ask.account_id, ask.consumer))
            .key(self.known_key(ask.account_id))
            .arg(ask.limit)
            .arg(self.window.as_micros() as u64)
            .arg(ask.handoff_id)
            .arg(self.idempotency_ttl.as_millis() as u64)
            .arg(self.consumer_lease.as_millis() as u64)
            .arg(KNOWN_FOR.as_millis() as u64)
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
}

/// Why the gate could not decide in Redis (it then decides in this replica).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("reading the last window's handoffs: {0}")]
    Db(#[from] sqlx::Error),
}

/// The latest handoff that holds each consumer, among `recent`, within `lease`.
fn latest_leases(recent: &[Recent], lease: Duration) -> HashMap<&str, &Recent> {
    let mut leases: HashMap<&str, &Recent> = HashMap::new();
    for held in recent.iter().filter(|r| r.holds_consumer && r.age < lease) {
        let latest = leases.entry(held.consumer_phone.as_str()).or_insert(held);
        if held.age < latest.age {
            *latest = held;
        }
    }
    leases
}
