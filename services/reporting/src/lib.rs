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
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use tokio_util::sync::CancellationToken;

use crate::store::{EventStore, PgEventStore, SqliteEventStore};

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "reporting";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// `[reporting]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReportingSettings {
    /// Days the event log keeps: queries start no earlier, the rollups' older days are dropped
    /// and, on PostgreSQL, whole months once they end 30 days (the longest repeat window)
    /// before that. 0 keeps everything.
    pub retention_days: u64,
    /// IANA time zones whose daily rollups every account keeps from its first event, besides
    /// those its queries ask for (up to four per account, built from its log when first asked).
    pub rollup_zones: Vec<String>,
}

impl Default for ReportingSettings {
    fn default() -> Self {
        Self {
            retention_days: 395,
            rollup_zones: Vec::new(),
        }
    }
}

impl ReportingSettings {
    /// The configured rollup zones; the first name that is not a zone, as an error.
    pub fn zones(&self) -> Result<Vec<chrono_tz::Tz>, String> {
        self.rollup_zones
            .iter()
            .map(|name| name.parse().map_err(|_| name.clone()))
            .collect()
    }
}

/// The `c2m.v1.ReportingService` implementation.
#[derive(Clone)]
pub struct Service {
    store: Arc<dyn EventStore>,
    /// How long the log keeps events; `None`: forever.
    retention: Option<chrono::Duration>,
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
    /// On PostgreSQL (`c2m serve`). Zones in `settings` that are not zones are left out (the
    /// configuration is checked before).
    pub fn new(db: ServiceDb, key: TokenKey, peers: Peers, settings: &ReportingSettings) -> Self {
        let zones = settings.zones().unwrap_or_default();
        Self {
            store: Arc::new(PgEventStore::new(db.pool().clone()).rolling_up(zones)),
            retention: retention(settings),
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
        settings: &ReportingSettings,
    ) -> Result<Self, sqlx::migrate::MigrateError> {
        Ok(Self {
            retention: retention(settings),
            probe: c2m_storage::sqlite::probe(pool.clone(), SCHEMA),
            store: Arc::new(SqliteEventStore::new(pool).await?),
            key,
            peers,
        })
    }

    /// The earliest time queries see at `now`.
    fn horizon(&self, now: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        self.retention.map(|kept| now - kept)
    }

    /// The gRPC service, SERVING while its store answers, with the rollup builder and the log's
    /// upkeep beside it.
    pub fn into_component(self) -> Component {
        let (store, upkeep) = (self.store.clone(), self.clone());
        Component::new(ReportingServiceServer::new(self.clone()))
            .with_probe(self.probe.clone())
            .with_task(move |shutdown| build_rollups(store, shutdown))
            .with_task(move |shutdown| upkeep.keep_up(shutdown))
    }

    /// At start and every hour: the log's months to come, and retention.
    async fn keep_up(self, shutdown: CancellationToken) {
        loop {
            let now = chrono::Utc::now();
            match self.store.maintain(now, self.horizon(now)).await {
                Ok(done) if done != store::Maintenance::default() => {
                    tracing::info!(?done, "the event log kept up");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "keeping the event log up failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
            }
        }
    }
}

fn retention(settings: &ReportingSettings) -> Option<chrono::Duration> {
    let days = i64::try_from(settings.retention_days).unwrap_or(i64::MAX);
    (days > 0).then(|| chrono::Duration::days(days.min(36_500)))
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
