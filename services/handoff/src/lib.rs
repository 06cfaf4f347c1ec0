//! The Handoff service: what an IVR calls to deflect a caller to messaging.
//!
//! Owns the `handoff` PostgreSQL schema: handoffs, idempotency records, the event outbox and the
//! deflection outbox (to Routing). Keeps the per-account rate limit in Redis
//! (`<prefix>:{<account>}:rl`).

#![forbid(unsafe_code)]

mod abandoned;
mod context;
mod deflections;
mod engine;
pub mod error;
mod fallback;
mod follow;
pub mod gate;
mod grpc;
pub mod model;
pub mod plan;
pub mod render;
pub mod request;
pub mod rest;
mod send;
pub mod store;
pub mod upstream;

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::handoff_service_server::HandoffServiceServer;
use c2m_runtime::{
    Component, TaskTracker, api_keys::ApiKeys, auth::TokenKey, health::Probe, peers::Peers,
};
use c2m_storage::{Coordination, ServiceDb, outbox::Relay};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;

use crate::{
    deflections::ToRouting,
    engine::Engine,
    gate::Gate,
    send::Sender,
    store::{HandoffStore, PgHandoffStore, SqliteHandoffStore},
    upstream::Peered,
};

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
    /// Handoffs this replica runs at once, counting those whose IVR stopped waiting (a handoff
    /// runs to its end). Past it, CreateHandoff answers RESOURCE_EXHAUSTED (reason `OVERLOADED`)
    /// at once, with nothing written or sent: the IVR keeps the caller in the voice queue, or
    /// retries, rather than wait on a backlog that only grows.
    pub max_in_progress: u32,
}

impl Default for HandoffSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            consumer_lease_ms: 10_000,
            unconfirmed_fallback_ms: 60_000,
            max_in_progress: 1_000,
        }
    }
}

/// The `c2m.v1.HandoffService` implementation: the RPCs (`grpc.rs`, `rest.rs`) over the engine.
#[derive(Clone)]
pub struct Service {
    engine: Arc<Engine>,
    /// SERVING while the store answers.
    probe: Arc<dyn Probe>,
    key: TokenKey,
    coordination: Arc<dyn Coordination>,
    api_keys: Arc<ApiKeys>,
}

/// What a service is built with beside its store.
struct Parts {
    coordination: Arc<dyn Coordination>,
    peers: Peers,
    key: TokenKey,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandoffService").finish_non_exhaustive()
    }
}

impl Service {
    /// On PostgreSQL (`c2m serve`).
    pub fn new(
        db: ServiceDb,
        coordination: Arc<dyn Coordination>,
        peers: Peers,
        key: TokenKey,
        settings: &HandoffSettings,
    ) -> Self {
        let relays = (
            Relay::new(db.clone(), peers.clone()),
            Relay::to(ToRouting, db.clone(), peers.clone()),
        );
        let probe = db.probe();
        let store = Arc::new(PgHandoffStore::new(db));
        let parts = Parts {
            coordination,
            peers,
            key,
        };
        Self::over(store, probe, relays, parts, settings)
    }

    /// On a SQLite file of its own (the embedded default), its migrations applied.
    pub async fn embedded(
        pool: sqlx::SqlitePool,
        coordination: Arc<dyn Coordination>,
        peers: Peers,
        key: TokenKey,
        settings: &HandoffSettings,
    ) -> Result<Self, sqlx::migrate::MigrateError> {
        let probe = c2m_storage::sqlite::probe(pool.clone(), SCHEMA);
        let store = SqliteHandoffStore::new(pool).await?;
        let rows: Arc<dyn c2m_storage::outbox::OutboxRows> = Arc::new(store.outbox());
        let relays = (
            Relay::over(rows.clone(), peers.clone()),
            Relay::to_over(ToRouting, rows, peers.clone()),
        );
        let parts = Parts {
            coordination,
            peers,
            key,
        };
        Ok(Self::over(Arc::new(store), probe, relays, parts, settings))
    }

    fn over(
        store: Arc<dyn HandoffStore>,
        probe: Arc<dyn Probe>,
        (relay, deflections): (Relay, Relay<ToRouting>),
        Parts {
            coordination,
            peers,
            key,
        }: Parts,
        settings: &HandoffSettings,
    ) -> Self {
        let engine = Engine {
            relay,
            deflections,
            gate: Gate::new(
                coordination.clone(),
                store.clone(),
                Duration::from_secs(1),
                Duration::from_millis(settings.consumer_lease_ms),
                settings.replicas,
            ),
            store,
            upstream: Arc::new(Peered::new(peers.clone())),
            sender: Sender {
                peers: peers.clone(),
                unconfirmed_window: Duration::from_millis(settings.unconfirmed_fallback_ms),
            },
            consumer_lease: Duration::from_millis(settings.consumer_lease_ms),
            detached: TaskTracker::new(),
            admission: engine::Admission::new(settings.max_in_progress),
            peers,
            key: key.clone(),
        };
        Self {
            engine: Arc::new(engine),
            probe,
            key,
            coordination,
            api_keys: Arc::new(ApiKeys::new(Duration::from_secs(30))),
        }
    }

    /// The gRPC service, SERVING while its schema and Redis answer, with its outbox relays.
    pub fn into_component(self) -> Component {
        let engine = self.engine.clone();
        let relay = engine.relay.clone();
        let deflections = engine.deflections.clone();
        let (peers, upstream, api_keys) = (
            engine.peers.clone(),
            engine.upstream.clone(),
            self.api_keys.clone(),
        );
        let (fallbacks, sweeper) = (engine.clone(), engine.clone());
        Component::new(HandoffServiceServer::new(self.clone()))
            .with_http(rest::router(self.clone()))
            .with_probe(self.probe.clone())
            .with_optional_probe(self.coordination.probe())
            .with_detached(engine.detached.clone())
            .with_task(move |shutdown| relay.run(shutdown))
            .with_task(move |shutdown| deflections.run(shutdown))
            .with_task(move |shutdown| follow::follow_config(peers, upstream, api_keys, shutdown))
            .with_task(move |shutdown| fallbacks.run_fallbacks(shutdown))
            .with_task(move |shutdown| sweeper.run_abandoned(shutdown))
    }
}
