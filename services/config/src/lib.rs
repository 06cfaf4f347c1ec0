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
    store::{ConfigStore, PgConfigStore},
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
    db: ServiceDb,
    store: Arc<dyn ConfigStore>,
    key: TokenKey,
    watch: Watch,
    webhooks: Dispatcher,
    /// The other services, for the console's pages (called as the signed-in person).
    peers: Peers,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigService").finish_non_exhaustive()
    }
}

impl Service {
    /// Fails only when the HTTP client for webhooks cannot be built.
    pub fn new(
        db: ServiceDb,
        key: TokenKey,
        peers: Peers,
        webhooks: &WebhookSettings,
    ) -> Result<Self, reqwest::Error> {
        let store: Arc<dyn ConfigStore> = Arc::new(PgConfigStore::new(db.pool().clone()));
        let http = c2m_runtime::http::client(Duration::from_millis(webhooks.timeout_ms), false)?;
        Ok(Self {
            webhooks: Dispatcher::new(store.clone(), peers.clone(), http, webhooks.clone()),
            peers,
            store,
            db,
            key,
            watch: Watch::new(),
        })
    }

    /// The gRPC service, SERVING while its schema answers, with the webhook dispatcher.
    pub fn into_component(self) -> Component {
        let (watch, pool) = (self.watch.clone(), self.db.pool().clone());
        let (webhooks, db) = (self.webhooks.clone(), self.db.clone());
        Component::new(ConfigServiceServer::new(self.clone()))
            .with_http(console::router(self.clone()))
            .with_probe(self.db.probe())
            .with_task(move |shutdown| watch.listen(pool, shutdown))
            .with_task(move |shutdown| async move {
                if db.until_migrated(&shutdown).await {
                    webhooks.run(shutdown).await;
                }
            })
    }
}
