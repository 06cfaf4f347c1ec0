//! One Redis connection per process, multiplexed, reconnecting, with short timeouts so a dead Redis
//! never makes a caller wait: to a single server (`redis.url`), or to a Redis Cluster
//! (`redis.cluster_nodes`), where the client follows `MOVED` and `ASK`, loads scripts on every
//! primary, and each handoff's script runs on the node of its account's hash tag.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use c2m_runtime::{Probe, ProbeFuture};
use redis::{
    Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

pub use ::redis::RedisError;

/// `[redis]`: counters and leases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// A Redis URL (`redis://host:port/db`, `rediss://` for TLS is not built in). Empty: no
    /// Redis; `c2m dev` then keeps counters and leases in its own memory, and `c2m serve`
    /// refuses to start a role that needs them.
    pub url: String,
    /// Milliseconds to wait for a connection.
    pub connect_timeout_ms: u64,
    /// Milliseconds to wait for a reply; past it the call fails and the caller falls back.
    pub response_timeout_ms: u64,
    /// A Redis Cluster's nodes (`redis://host:port` each; a few are enough to find the rest).
    /// When given, c2m uses the cluster and `url` must be empty.
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key c2m writes (`<prefix>:{<account>}:…`), so several deployments or test
    /// runs can share one Redis.
    pub key_prefix: String,
}

impl RedisSettings {
    /// Whether a Redis is configured at all (a server, or a cluster).
    pub fn is_set(&self) -> bool {
        !self.url.is_empty() || !self.cluster_nodes.is_empty()
    }
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            connect_timeout_ms: 500,
            cluster_nodes: Vec::new(),
            response_timeout_ms: 250,
            key_prefix: "c2m".to_owned(),
        }
    }
}

/// A lazily connected, shared Redis connection. Cloning shares it.
#[derive(Clone)]
pub struct RedisHandle {
    client: Client,
    connection: Arc<OnceCell<RedisConnection>>,
    key_prefix: Arc<str>,
}

/// Where the connection goes.
#[derive(Clone)]
enum Client {
    Single(redis::Client, ConnectionManagerConfig),
    Cluster(ClusterClient),
}

/// A connection to one server, or to a cluster: either runs commands and scripts the same way.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for RedisHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHandle")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl RedisHandle {
    /// Does not connect: the first call does, so a service can start while Redis is down.
    /// Fails only on a malformed URL.
    pub fn new(settings: &RedisSettings) -> redis::RedisResult<Self> {
        let connect = Duration::from_millis(settings.connect_timeout_ms);
        let respond = Duration::from_millis(settings.response_timeout_ms);
        let client = if settings.cluster_nodes.is_empty() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect))
                .set_response_timeout(Some(respond))
                .set_number_of_retries(1);
            Client::Single(redis::Client::open(settings.url.as_str())?, config)
        } else {
            Client::Cluster(
                ClusterClient::builder(settings.cluster_nodes.iter().map(String::as_str))
                    .connection_timeout(connect)
                    .response_timeout(respond)
                    .retries(2)
                    .build()?,
            )
        };
        Ok(Self {
            client,
            connection: Arc::new(OnceCell::new()),
            key_prefix: settings.key_prefix.as_str().into(),
        })
    }

    /// The shared connection, connecting on first use. Once connected it reconnects by itself.
    pub async fn connection(&self) -> redis::RedisResult<RedisConnection> {
        self.connection
            .get_or_try_init(|| async {
                Ok(match &self.client {
                    Client::Single(client, config) => RedisConnection::Single(
                        ConnectionManager::new_with_config(client.clone(), config.clone()).await?,
                    ),
                    Client::Cluster(client) => {
                        RedisConnection::Cluster(client.get_async_connection().await?)
                    }
                })
            })
            .await
            .cloned()
    }

    /// A key for one account's data: `<prefix>:{<account>}:<suffix>`. The braces make every key
    /// of one account hash to one Redis Cluster slot, so one script can touch them all.
    fn account_key(&self, account_id: &str, suffix: &str) -> String {
        format!("{}:{{{account_id}}}:{suffix}", self.key_prefix)
    }

    // Every key c2m keeps in Redis, named here once for every service that touches it.

    /// The account's sliding rate-limit window (a sorted set of admissions).
    pub fn rate_window_key(&self, account_id: &str) -> String {
        self.account_key(account_id, "rl")
    }

    /// Present while Redis knows the account's window (absent after a loss: fill it in).
    pub fn rate_known_key(&self, account_id: &str) -> String {
        self.account_key(account_id, "rl:known")
    }

    /// The handoff that claimed an idempotency key.
    pub fn idempotency_key(&self, account_id: &str, key: &str) -> String {
        self.account_key(account_id, &format!("idem:{key}"))
    }

    /// The handoff that holds a consumer (`handoff.consumer_lease_ms`).
    pub fn consumer_lease_key(&self, account_id: &str, consumer: &str) -> String {
        self.account_key(account_id, &format!("lease:{consumer}"))
    }

    /// The consumer's open conversation: set by Routing, read by Handoff's gate.
    pub fn conversation_lease_key(&self, account_id: &str, consumer: &str) -> String {
        self.account_key(account_id, &format!("conv:{consumer}"))
    }

    /// The health probe: PING answers.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(RedisProbe {
            redis: self.clone(),
        })
    }
}

/// Skips Redis for a second after a call to it failed, so that a dead Redis costs one timeout a
/// second rather than one a call, and keeps `c2m_redis_degraded{service}` to what it saw last.
#[derive(Debug, Clone)]
pub struct Breaker {
    service: &'static str,
    skip_until: Arc<Mutex<Option<Instant>>>,
}

impl Breaker {
    const PAUSE: Duration = Duration::from_secs(1);

    pub fn new(service: &'static str) -> Self {
        Self {
            service,
            skip_until: Arc::default(),
        }
    }

    /// Whether calls should skip Redis now.
    pub fn is_open(&self) -> bool {
        self.skip_until()
            .is_some_and(|until| Instant::now() < until)
    }

    /// A call to Redis answered; true when that ends a spell without it.
    pub fn succeeded(&self) -> bool {
        let back = self.skip_until().take().is_some();
        if back {
            c2m_runtime::metrics::redis_degraded(self.service, false);
        }
        back
    }

    /// A call to Redis failed: skip it for a while; true when that starts a spell without it.
    pub fn failed(&self) -> bool {
        let mut skip = self.skip_until();
        let gone = skip.is_none();
        if gone {
            c2m_runtime::metrics::redis_degraded(self.service, true);
        }
        *skip = Some(Instant::now() + Self::PAUSE);
        gone
    }

    fn skip_until(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.skip_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct RedisProbe {
    redis: RedisHandle,
}

impl Probe for RedisProbe {
    fn name(&self) -> &str {
        "redis"
    }

    fn check(&self) -> ProbeFuture<'_> {
        Box::pin(async move {
            let mut connection = self.redis.connection().await.map_err(|e| e.to_string())?;
            let _: String = redis::cmd("PING")
                .query_async(&mut connection)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accounts_keys_share_a_hash_tag() {
        let redis = RedisHandle::new(&RedisSettings {
            url: "redis://127.0.0.1:6379".into(),
            ..RedisSettings::default()
        })
        .expect("valid url");
        assert_eq!(
            [
                redis.rate_window_key("acct-1"),
                redis.rate_known_key("acct-1"),
                redis.idempotency_key("acct-1", "k-9"),
                redis.consumer_lease_key("acct-1", "+14155550123"),
                redis.conversation_lease_key("acct-1", "+14155550123"),
            ],
            [
                "c2m:{acct-1}:rl",
                "c2m:{acct-1}:rl:known",
                "c2m:{acct-1}:idem:k-9",
                "c2m:{acct-1}:lease:+14155550123",
                "c2m:{acct-1}:conv:+14155550123",
            ]
        );
    }
}
