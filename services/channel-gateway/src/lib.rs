//! The Channel-Gateway service: sends on every channel and turns provider webhooks into events.
//!
//! Owns the `channel_gateway` PostgreSQL schema: provider credentials (sealed), outbound messages,
//! the number-lookup cache, the webhook inbox and its event outbox. Webhooks arrive on an HTTP
//! listener of their own (`listen.webhooks`), the one port to expose to the providers.

#![forbid(unsafe_code)]

mod channels;
mod credentials;
mod devices;
mod google;
mod grpc;
pub mod jwt;
mod lookup;
mod messages;
pub mod meta;
mod outcome;
mod push;
pub mod rbm;
mod retry;
mod sandbox;
mod sending;
mod store;
#[cfg(test)]
mod store_conformance;
pub mod twilio;
mod webhooks;
mod window;

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::channel_gateway_service_server::ChannelGatewayServiceServer;
use c2m_runtime::{Component, TaskTracker, auth::TokenKey, cache::TtlCache, peers::Peers};
use c2m_storage::{ServiceDb, batch::Batcher, outbox::Relay};
use serde::{Deserialize, Serialize};
use sqlx::migrate::Migrator;
use tokio::net::TcpListener;

use crate::store::{GatewayStore, PgGatewayStore, SqliteGatewayStore};

pub use credentials::Sealer;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "channel_gateway";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// `[channel_gateway]`: providers and webhooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// The URL providers reach the webhook listener at (`listen.webhooks`), as they call it:
    /// status callbacks point there, and Twilio signs that URL.
    pub public_url: String,
    /// Base64 of 32 random bytes that seal provider credentials at rest. Required by
    /// `c2m serve channel-gateway`; `c2m dev` makes one up for the run when it is empty.
    pub credentials_key: String,
    /// Twilio's REST API (point it at an emulator in tests).
    pub twilio_api_base: String,
    /// Twilio Lookup, for the landline check.
    pub twilio_lookup_base: String,
    /// Meta's Graph API, for WhatsApp.
    pub meta_api_base: String,
    /// The Graph API version in request paths.
    pub meta_api_version: String,
    /// Google's OAuth 2.0 token endpoint, for RBM's and FCM's service accounts.
    pub google_token_url: String,
    /// Google RCS Business Messaging.
    pub rbm_api_base: String,
    /// Firebase Cloud Messaging (HTTP v1), for app messaging on Android.
    pub fcm_api_base: String,
    /// APNs, for app messaging on iOS (`https://api.sandbox.push.apple.com` for development apps).
    pub apns_api_base: String,
    /// Milliseconds a send may spend with its provider, retries included; below `peers.timeout_ms`,
    /// so that Handoff has the answer before it stops waiting.
    pub provider_timeout_ms: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:8080".into(),
            credentials_key: String::new(),
            twilio_api_base: "https://api.twilio.com".into(),
            twilio_lookup_base: "https://lookups.twilio.com".into(),
            meta_api_base: "https://graph.facebook.com".into(),
            meta_api_version: "v21.0".into(),
            google_token_url: "https://oauth2.googleapis.com/token".into(),
            rbm_api_base: "https://rcsbusinessmessaging.googleapis.com".into(),
            fcm_api_base: "https://fcm.googleapis.com".into(),
            apns_api_base: "https://api.push.apple.com".into(),
            provider_timeout_ms: 4_000,
        }
    }
}

impl GatewaySettings {
    /// The credentials key, if it is 32 bytes of base64.
    pub fn sealing_key(&self) -> Option<[u8; 32]> {
        STANDARD
            .decode(self.credentials_key.trim())
            .ok()?
            .try_into()
            .ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("channel_gateway.credentials_key must be base64 of 32 bytes")]
    Key,
    #[error("cannot build the http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("cannot migrate the gateway's file: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The `c2m.v1.ChannelGatewayService` implementation and its webhook listener.
#[derive(Clone)]
pub struct Service {
    store: Arc<dyn GatewayStore>,
    peers: Peers,
    key: TokenKey,
    sealer: Sealer,
    http: reqwest::Client,
    /// HTTP/2 only, for APNs.
    http2: reqwest::Client,
    google: Arc<google::Tokens>,
    apns_tokens: Arc<push::ApnsTokens>,
    /// RCS capability per account and number, for ten minutes.
    rcs_capability: Arc<TtlCache<(String, String), bool>>,
    settings: Arc<GatewaySettings>,
    relay: Relay,
    /// Stages of agents' and bots' messages, to Routing.
    stages: Relay<messages::ToRouting>,
    lookups: Batcher<messages::Lookups>,
    claims: Batcher<messages::Claims>,
    records: Batcher<messages::Records>,
    /// Opened credentials per account and provider, briefly. Replaced here at once; other
    /// replicas see a change within the TTL.
    credentials: Arc<TtlCache<(String, i32), Vec<u8>>>,
    /// Records of sent messages PostgreSQL refused, offered again in the background; a shutdown
    /// waits for them within its grace period.
    detached: TaskTracker,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelGatewayService")
            .finish_non_exhaustive()
    }
}

impl Service {
    /// On PostgreSQL (`c2m serve`).
    pub fn new(
        db: ServiceDb,
        peers: Peers,
        key: TokenKey,
        settings: GatewaySettings,
    ) -> Result<Self, GatewayError> {
        let relay = Relay::new(db.clone(), peers.clone());
        let stages = Relay::to(messages::ToRouting, db.clone(), peers.clone());
        Self::over(
            Arc::new(PgGatewayStore::new(db)),
            (relay, stages),
            peers,
            key,
            settings,
        )
    }

    /// On a SQLite file of its own (the embedded default), its migrations applied.
    pub async fn embedded(
        pool: sqlx::SqlitePool,
        peers: Peers,
        key: TokenKey,
        settings: GatewaySettings,
    ) -> Result<Self, GatewayError> {
        let store = SqliteGatewayStore::new(pool).await?;
        let rows: Arc<dyn c2m_storage::outbox::OutboxRows> = Arc::new(store.outbox());
        let relay = Relay::over(rows.clone(), peers.clone());
        let stages = Relay::to_over(messages::ToRouting, rows, peers.clone());
        Self::over(Arc::new(store), (relay, stages), peers, key, settings)
    }

    fn over(
        store: Arc<dyn GatewayStore>,
        (relay, stages): (Relay, Relay<messages::ToRouting>),
        peers: Peers,
        key: TokenKey,
        settings: GatewaySettings,
    ) -> Result<Self, GatewayError> {
        let sealer = Sealer::new(&settings.sealing_key().ok_or(GatewayError::Key)?);
        let timeout = Duration::from_millis(settings.provider_timeout_ms);
        let http = c2m_runtime::http::client(timeout, false)?;
        let http2 = c2m_runtime::http::client(timeout, true)?;
        let lookups = Batcher::new(messages::Lookups(store.clone()));
        let claims = Batcher::new(messages::Claims(store.clone()));
        let records = Batcher::new(messages::Records(store.clone()));
        Ok(Self {
            detached: TaskTracker::new(),
            store,
            peers,
            key,
            sealer,
            http,
            http2,
            google: Arc::new(google::Tokens::new(&settings.google_token_url)),
            apns_tokens: Arc::new(push::ApnsTokens::default()),
            rcs_capability: Arc::new(TtlCache::new(Duration::from_secs(600), 100_000)),
            settings: Arc::new(settings),
            relay,
            stages,
            lookups,
            claims,
            records,
            credentials: Arc::new(TtlCache::new(Duration::from_secs(30), 100_000)),
        })
    }

    /// The gRPC service, SERVING while its schema answers, with the webhook listener on `webhooks`
    /// and the outbox relay.
    pub fn into_component(self, webhooks: TcpListener) -> Component {
        let (relay, stages) = (self.relay.clone(), self.stages.clone());
        let router = webhooks::router(self.clone());
        Component::new(ChannelGatewayServiceServer::new(self.clone()))
            .with_probe(self.store.probe())
            .with_detached(self.detached.clone())
            .with_task(move |shutdown| relay.run(shutdown))
            .with_task(move |shutdown| stages.run(shutdown))
            .with_task(move |shutdown| async move {
                let addr = webhooks.local_addr().ok();
                tracing::info!(?addr, "webhooks listening");
                if let Err(error) = axum::serve(webhooks, router)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
                {
                    tracing::error!(%error, "webhook listener failed");
                }
            })
    }
}

/// A storage error as the status an RPC answers with (UNAVAILABLE while PostgreSQL is away).
pub(crate) fn db_status(error: sqlx::Error) -> tonic::Status {
    c2m_storage::postgres::db_status("gateway", error)
}
