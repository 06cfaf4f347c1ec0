//! The Config service: the brand's control plane.
//!
//! Owns the `config` PostgreSQL schema: accounts and settings, handoff configurations, WhatsApp templates, API keys and the audit log.

#![forbid(unsafe_code)]

use c2m_proto::v1::config_service_server::{ConfigService, ConfigServiceServer};
use c2m_runtime::Component;
use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "config";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.ConfigService` implementation. RPCs not implemented yet answer UNIMPLEMENTED.
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
        Component::new(ConfigServiceServer::new(self.clone())).with_probe(self.db.probe())
    }
}

impl ConfigService for Service {}
