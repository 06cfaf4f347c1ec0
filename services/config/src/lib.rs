//! The Config service: the brand's control plane.
//!
//! Owns the `config` PostgreSQL schema: accounts and settings, handoff configurations, WhatsApp
//! templates, API keys, webhook endpoints and the audit log; posts conversation events to the
//! webhook endpoints (`webhooks`).

#![forbid(unsafe_code)]

mod console;
mod grpc;
pub mod model;
pub mod store;
pub mod watch;
pub mod webhooks;

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::config_service_server::ConfigServiceServer;
use c2m_runtime::{Component, auth::TokenKey, peers::Peers};
use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;

use crate::{
    store::{ConfigStore, PgConfigStore, SqliteConfigStore},
    watch::Watch,
    webhooks::{Dispatcher, WebhookSettings},
};

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "config";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.ConfigService` implementation.
#[derive(Clone)]
pub struct Service {
    kept: Kept,
    store: Arc<dyn ConfigStore>,
    key: TokenKey,
    watch: Watch,
    webhooks: Dispatcher,
    /// The other services, for the console's pages (called as the signed-in person).
    peers: Peers,
}

/// Where the store lives, for what each backend needs beside it: PostgreSQL's schema is migrated
/// by its health probe and sends change notices with `NOTIFY`; a SQLite file is migrated when
/// opened and publishes its own changes.
#[derive(Clone)]
enum Kept {
    Postgres(Box<ServiceDb>),
    Sqlite(sqlx::SqlitePool),
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigService").finish_non_exhaustive()
    }
}

impl Service {
    /// On PostgreSQL (`c2m serve`). Fails only when the HTTP client for webhooks cannot be built.
    pub fn new(
        db: ServiceDb,
        key: TokenKey,
        peers: Peers,
        webhooks: &WebhookSettings,
    ) -> Result<Self, reqwest::Error> {
        let store: Arc<dyn ConfigStore> = Arc::new(PgConfigStore::new(db.pool().clone()));
        Self::over(
            Kept::Postgres(Box::new(db)),
            store,
            Watch::new(),
            key,
            peers,
            webhooks,
        )
    }

    /// On a SQLite file of its own (the embedded default), its migrations applied.
    pub async fn embedded(
        pool: sqlx::SqlitePool,
        key: TokenKey,
        peers: Peers,
        webhooks: &WebhookSettings,
    ) -> Result<Self, EmbeddedError> {
        let watch = Watch::new();
        let store = SqliteConfigStore::new(pool.clone(), watch.clone()).await?;
        Ok(Self::over(
            Kept::Sqlite(pool),
            Arc::new(store),
            watch,
            key,
            peers,
            webhooks,
        )?)
    }

    fn over(
        kept: Kept,
        store: Arc<dyn ConfigStore>,
        watch: Watch,
        key: TokenKey,
        peers: Peers,
        webhooks: &WebhookSettings,
    ) -> Result<Self, reqwest::Error> {
        let http = c2m_runtime::http::client(Duration::from_millis(webhooks.timeout_ms), false)?;
        Ok(Self {
            webhooks: Dispatcher::new(store.clone(), peers.clone(), http, webhooks.clone()),
            peers,
            store,
            kept,
            key,
            watch,
        })
    }

    /// The gRPC service, SERVING while its store answers, with the webhook dispatcher.
    pub fn into_component(self) -> Component {
        let webhooks = self.webhooks.clone();
        let component = Component::new(ConfigServiceServer::new(self.clone()))
            .with_http(console::router(self.clone()));
        match self.kept.clone() {
            Kept::Postgres(db) => {
                let (watch, pool) = (self.watch.clone(), db.pool().clone());
                component
                    .with_probe(db.probe())
                    .with_task(move |shutdown| watch.listen(pool, shutdown))
                    .with_task(move |shutdown| async move {
                        if db.until_migrated(&shutdown).await {
                            webhooks.run(shutdown).await;
                        }
                    })
            }
            Kept::Sqlite(pool) => component
                .with_probe(c2m_storage::sqlite::probe(pool, SCHEMA))
                .with_task(move |shutdown| webhooks.run(shutdown)),
        }
    }
}

/// Why the embedded Config cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("cannot migrate Config's file: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot build the http client for webhooks: {0}")]
    Http(#[from] reqwest::Error),
}
