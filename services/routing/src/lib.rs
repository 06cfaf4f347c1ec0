//! The Routing service: pending deflections, conversations and opt-outs, and where replies go.
//!
//! Owns the `routing` PostgreSQL schema: deflections, conversations, transcripts, opt-outs and its
//! event outbox. The open-conversation fact lives here (one open conversation per account and
//! consumer, a unique index); the open-conversation lease (in Redis, or in this process's memory
//! in `c2m dev`) is the fast path in front of it. Serves `c2m.v1.RoutingService` to c2m's other services and
//! `c2m.v1.ConversationService` to agents and bots, whose streams follow the conversation log.

#![forbid(unsafe_code)]

mod consent;
mod conversations;
mod deflections;
mod desk;
mod grpc;
mod idle;
mod inbound;
mod leases;
mod log;
mod rest;
mod store;
#[cfg(test)]
mod store_conformance;

use std::{sync::Arc, time::Duration};

use c2m_runtime::{
    api_keys::ApiKeys,
    config_changes::{self, Notice},
};

use c2m_proto::v1::{
    conversation_service_server::ConversationServiceServer,
    routing_service_server::RoutingServiceServer,
};
use c2m_runtime::{CancellationToken, Component, auth::TokenKey, peers::Peers};
use c2m_storage::{Coordination, ServiceDb, batch::Batcher, outbox::Relay, redis::Breaker};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;

use crate::store::{PgRoutingStore, RoutingStore, SqliteRoutingStore};

/// `[routing]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSettings {
    /// Milliseconds between two looks for conversations idle past their account's
    /// `idle_close_minutes` (and for log events past their retention).
    pub idle_sweep_ms: u64,
    /// Days the conversation log keeps its events: what a stream can resume through, and how long
    /// a disabled webhook endpoint can catch up after.
    pub log_retention_days: u64,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            idle_sweep_ms: 30_000,
            log_retention_days: 30,
        }
    }
}

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "routing";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.RoutingService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    store: Arc<dyn RoutingStore>,
    coordination: Arc<dyn Coordination>,
    peers: Peers,
    key: TokenKey,
    relay: Relay,
    checks: Batcher<deflections::Checks>,
    /// After Redis fails, lease writes are skipped for a second, so a dead Redis costs a caller
    /// one timeout a second at most rather than one per request.
    breaker: Breaker,
    /// The conversation log fanned out to this replica's watch streams.
    feed: log::Feed,
    /// Cancelled when the server stops taking requests: watch streams end then.
    closing: CancellationToken,
    idle_sweep: Duration,
    log_retention: Duration,
    /// How long an answer's send may be at the provider: the peers' timeout, twice over.
    send_lease: chrono::Duration,
    /// Bots' and desks' API keys, as Config vouched for them (30 s).
    api_keys: Arc<ApiKeys>,
}

impl Service {
    /// On PostgreSQL (`c2m serve`).
    pub fn new(
        db: ServiceDb,
        coordination: Arc<dyn Coordination>,
        peers: Peers,
        key: TokenKey,
        settings: &RoutingSettings,
        peer_timeout: Duration,
    ) -> Self {
        let relay = Relay::new(db.clone(), peers.clone());
        let store = Arc::new(PgRoutingStore::new(db));
        Self::over(
            store,
            relay,
            coordination,
            peers,
            key,
            settings,
            peer_timeout,
        )
    }

    /// On a SQLite file of its own (the embedded default), its migrations applied.
    pub async fn embedded(
        pool: sqlx::SqlitePool,
        coordination: Arc<dyn Coordination>,
        peers: Peers,
        key: TokenKey,
        settings: &RoutingSettings,
        peer_timeout: Duration,
    ) -> Result<Self, sqlx::migrate::MigrateError> {
        let store = SqliteRoutingStore::new(pool).await?;
        let relay = Relay::over(Arc::new(store.outbox()), peers.clone());
        Ok(Self::over(
            Arc::new(store),
            relay,
            coordination,
            peers,
            key,
            settings,
            peer_timeout,
        ))
    }

    fn over(
        store: Arc<dyn RoutingStore>,
        relay: Relay,
        coordination: Arc<dyn Coordination>,
        peers: Peers,
        key: TokenKey,
        settings: &RoutingSettings,
        peer_timeout: Duration,
    ) -> Self {
        let closing = CancellationToken::new();
        Self {
            feed: log::Feed::new(store.clone(), closing.clone()),
            closing,
            idle_sweep: Duration::from_millis(settings.idle_sweep_ms),
            log_retention: Duration::from_secs(settings.log_retention_days * 86_400),
            send_lease: chrono::Duration::from_std(peer_timeout * 2)
                .unwrap_or(chrono::Duration::MAX),
            api_keys: Arc::new(ApiKeys::new(Duration::from_secs(30))),
            checks: Batcher::new(deflections::Checks(store.clone())),
            store,
            coordination,
            peers,
            key,
            relay,
            breaker: Breaker::new("routing"),
        }
    }

    /// The gRPC services, SERVING while the schema answers (Redis is reported on its own): the
    /// routing service with its outbox relay, and the conversation service with the feed of its
    /// streams.
    pub fn into_components(self) -> [Component; 2] {
        let (relay, feed, idle) = (self.relay.clone(), self.feed.clone(), self.clone());
        let (peers, api_keys) = (self.peers.clone(), self.api_keys.clone());
        // A revoked key stops at once, not at the end of its cache entry's life.
        let follow = move |shutdown| async move {
            config_changes::follow(peers, shutdown, "routing", |notice| match notice {
                Notice::Changed(change)
                    if change.resource != c2m_proto::v1::ConfigResource::ApiKey as i32 => {}
                _ => api_keys.clear(),
            })
            .await;
        };
        [
            Component::new(RoutingServiceServer::new(self.clone()))
                .with_probe(self.store.probe())
                .with_optional_probe(self.coordination.probe())
                .with_task(move |shutdown| relay.run(shutdown))
                .with_task(move |shutdown| idle.close_idle(shutdown)),
            Component::new(ConversationServiceServer::new(self.clone()))
                .with_probe(self.store.probe())
                .with_http(rest::router(self.clone()))
                .with_task(move |shutdown| feed.run(shutdown))
                .with_task(follow)
                .with_draining(self.closing.clone()),
        ]
    }
}

/// A storage error as the status an RPC answers with (UNAVAILABLE while PostgreSQL is away).
pub(crate) fn db_status(error: sqlx::Error) -> tonic::Status {
    c2m_storage::postgres::db_status("routing", error)
}

/// Adds a violation when `value` is empty.
pub(crate) fn required(
    violations: &mut c2m_runtime::status::FieldViolations,
    field: &str,
    value: &str,
) {
    if value.is_empty() {
        violations.add(field, "required");
    }
}
