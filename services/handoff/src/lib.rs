//! The Handoff service: what an IVR calls to deflect a caller to messaging.
//!
//! Owns the `handoff` PostgreSQL schema: handoffs, idempotency records, the event outbox and the
//! deflection outbox (to Routing). Keeps the per-account rate limit in Redis
//! (`<prefix>:{<account>}:rl`).

#![forbid(unsafe_code)]

mod abandoned;
mod decide;
mod deflections;
mod fallback;
mod follow;
pub mod gate;
mod grpc;
mod local_gate;
mod passage;
pub mod render;
mod request;
pub mod rest;
mod send;
mod store;

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, handoff_service_server::HandoffServiceServer};
use c2m_runtime::{
    Component, TaskTracker, api_keys::ApiKeys, auth::TokenKey, cache::TtlCache, peers::Peers,
};
use c2m_storage::{RedisHandle, ServiceDb, batch::Batcher, outbox::Relay};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;

use crate::{deflections::ToRouting, gate::Gate};

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "handoff";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// `[handoff]`: the hot path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HandoffSettings {
    /// How many Handoff replicas run. While Redis is unreachable each replica admits this share
    /// of an account's rate limit, so together they stay within it.
    pub replicas: u32,
    /// Milliseconds a handoff holds its consumer: another handoff for the same consumer inside
    /// it sends nothing (`HANDOFF_STATUS_SKIPPED_RECENT_HANDOFF`).
    pub consumer_lease_ms: u64,
    /// Milliseconds a send its provider never answered (a timeout) waits for the provider's first
    /// report of it before the next channel is tried: it may have reached the consumer, and
    /// trying the next channel at once could reach them twice.
    pub unconfirmed_fallback_ms: u64,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            consumer_lease_ms: 10_000,
            unconfirmed_fallback_ms: 60_000,
        }
    }
}

/// How long configuration read from Config is trusted on the hot path when no change notice
/// arrives (while the WatchConfig stream is down); with it, changes show within milliseconds.
const CONFIG_TTL: Duration = Duration::from_secs(5);

/// The `c2m.v1.HandoffService` implementation.
#[derive(Clone)]
pub struct Service {
    db: ServiceDb,
    redis: RedisHandle,
    peers: Peers,
    key: TokenKey,
    relay: Relay,
    deflections: Relay<ToRouting>,
    gate: Gate,
    saves: Batcher<store::Saves>,
    intents: Batcher<store::Intents>,
    replays: Batcher<store::Replays>,
    api_keys: Arc<ApiKeys>,
    accounts: Arc<TtlCache<String, pb::Account>>,
    configs: Arc<TtlCache<(String, String), pb::HandoffConfig>>,
    templates: Arc<TtlCache<(String, String), pb::WhatsAppTemplate>>,
    /// `unconfirmed_fallback_ms`.
    unconfirmed_window: Duration,
    /// `consumer_lease_ms`.
    consumer_lease: Duration,
    /// Handoffs running on after their IVR stopped waiting; a shutdown lets them finish.
    detached: TaskTracker,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffService").finish_non_exhaustive()
    }
}

impl Service {
    pub fn new(
        db: ServiceDb,
        redis: RedisHandle,
        peers: Peers,
        key: TokenKey,
        settings: &HandoffSettings,
    ) -> Self {
        Self {
            relay: Relay::new(db.clone(), peers.clone()),
            deflections: Relay::to(ToRouting, db.clone(), peers.clone()),
            gate: Gate::new(
                redis.clone(),
                db.clone(),
                Duration::from_secs(1),
                Duration::from_millis(settings.consumer_lease_ms),
                settings.replicas,
            ),
            saves: Batcher::new(store::Saves(db.batch_pool().clone())),
            intents: Batcher::new(store::Intents(db.batch_pool().clone())),
            replays: Batcher::new(store::Replays(db.batch_pool().clone())),
            api_keys: Arc::new(ApiKeys::new(Duration::from_secs(30))),
            accounts: Arc::new(TtlCache::new(CONFIG_TTL, 100_000)),
            configs: Arc::new(TtlCache::new(CONFIG_TTL, 100_000)),
            templates: Arc::new(TtlCache::new(CONFIG_TTL, 100_000)),
            unconfirmed_window: Duration::from_millis(settings.unconfirmed_fallback_ms),
            consumer_lease: Duration::from_millis(settings.consumer_lease_ms),
            detached: TaskTracker::new(),
            db,
            redis,
            peers,
            key,
        }
    }

    /// The gRPC service, SERVING while its schema and Redis answer, with its outbox relays.
    pub fn into_component(self) -> Component {
        let relay = self.relay.clone();
        let deflections = self.deflections.clone();
        let follower = self.clone();
        let watcher = self.clone();
        let sweeper = self.clone();
        Component::new(HandoffServiceServer::new(self.clone()))
            .with_http(rest::router(self.clone()))
            .with_probe(self.db.probe())
            .with_optional_probe(self.redis.probe())
            .with_detached(self.detached.clone())
            .with_task(move |shutdown| relay.run(shutdown))
            .with_task(move |shutdown| deflections.run(shutdown))
            .with_task(move |shutdown| follower.follow_config(shutdown))
            .with_task(move |shutdown| watcher.run_fallbacks(shutdown))
            .with_task(move |shutdown| sweeper.run_abandoned(shutdown))
    }
}
