//! The Channel-Gateway service: sends on every channel and turns provider webhooks into events.
//!
//! Owns the `channel_gateway` PostgreSQL schema: provider credentials, outbound messages, the number-lookup cache and the webhook inbox.

#![forbid(unsafe_code)]

use c2m_proto::v1::channel_gateway_service_server::{
    ChannelGatewayService, ChannelGatewayServiceServer,
};
use c2m_runtime::Component;
use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "channel_gateway";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.ChannelGatewayService` implementation. RPCs not implemented yet answer UNIMPLEMENTED.
#[derive(Debug, Clone)]
pub struct Service {
    db: ServiceDb,
}

impl Service {
    pub fn new(db: ServiceDb) -> Self {
        Self { db }
    }

    /// The gRPC service, SERVING while its schema answer.
    pub fn into_component(self) -> Component {
        Component::new(ChannelGatewayServiceServer::new(self.clone())).with_probe(self.db.probe())
    }
}

impl ChannelGatewayService for Service {}
