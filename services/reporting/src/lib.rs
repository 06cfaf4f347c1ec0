//! The Reporting service: the append-only event log and the funnel.
//!
//! Owns the `reporting` PostgreSQL schema: events, de-duplicated by id, so services can re-send
//! (at-least-once delivery from their outboxes) and every event still counts once.

#![forbid(unsafe_code)]

mod grpc;
pub mod store;

use std::sync::Arc;

use c2m_proto::v1::reporting_service_server::ReportingServiceServer;
use c2m_runtime::{Component, auth::TokenKey, health::Probe, peers::Peers};
use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::store::{EventStore, PgEventStore, SqliteEventStore};

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "reporting";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.ReportingService` implementation.
#[derive(Clone)]
pub struct Service {
    store: Arc<dyn EventStore>,
    /// SERVING while the store answers.
    probe: Arc<dyn Probe>,
    key: TokenKey,
    /// Config, for an account's time zone.
    peers: Peers,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReportingService").finish_non_exhaustive()
    }
}

impl Service {
    /// On PostgreSQL (`c2m serve`).
    pub fn new(db: ServiceDb, key: TokenKey, peers: Peers) -> Self {
        Self {
            store: Arc::new(PgEventStore::new(db.pool().clone())),
            probe: db.probe(),
            key,
            peers,
        }
    }

    /// On a SQLite file of its own (the embedded default), its migrations applied.
    pub async fn embedded(
        pool: sqlx::SqlitePool,
        key: TokenKey,
        peers: Peers,
    ) -> Result<Self, sqlx::migrate::MigrateError> {
        Ok(Self {
            probe: c2m_storage::sqlite::probe(pool.clone(), SCHEMA),
            store: Arc::new(SqliteEventStore::new(pool).await?),
            key,
            peers,
        })
    }

    /// The gRPC service, SERVING while its store answers, with the rollup builder beside it.
    pub fn into_component(self) -> Component {
        let store = self.store.clone();
        Component::new(ReportingServiceServer::new(self.clone()))
            .with_probe(self.probe.clone())
            .with_task(move |shutdown| build_rollups(store, shutdown))
    }
}

/// Attempts the builder tallies per transaction: a few hundred milliseconds of the account's
/// head, so appends wait that long at most.
const BUILD_CHUNK: i64 = 2_000;

/// Tallies what accounts logged before a time zone's rollups were asked for, a chunk at a time,
/// until none is building; then looks again every few seconds (another replica, or a query, may
/// ask for one). Replicas may build at once: a chunk counts only for the one that moves the
/// zone's cursor.
async fn build_rollups(store: Arc<dyn EventStore>, shutdown: CancellationToken) {
    let idle = std::time::Duration::from_secs(2);
    loop {
        let wait = match store.build_rollups(BUILD_CHUNK).await {
            Ok(0) => idle,
            Ok(_) => std::time::Duration::ZERO,
            Err(error) => {
                tracing::warn!(%error, "building rollups failed; trying again");
                idle
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
