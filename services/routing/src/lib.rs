//! The Routing service: pending deflections, conversations and opt-outs, and where replies go.
//!
//! Owns the `routing` PostgreSQL schema: deflections, conversations, transcripts and opt-outs.

#![forbid(unsafe_code)]

use c2m_proto::v1::routing_service_server::{RoutingService, RoutingServiceServer};
use c2m_runtime::Component;
use c2m_storage::{RedisHandle, ServiceDb};
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "routing";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.RoutingService` implementation. RPCs not implemented yet answer UNIMPLEMENTED.
#[derive(Debug, Clone)]
pub struct Service {
    db: ServiceDb,
    redis: RedisHandle,
}

impl Service {
    pub fn new(db: ServiceDb, redis: RedisHandle) -> Self {
        Self { db, redis }
    }

    /// The gRPC service, SERVING while its schema and Redis answer.
    pub fn into_component(self) -> Component {
        Component::new(RoutingServiceServer::new(self.clone()))
            .with_probe(self.db.probe())
            .with_probe(self.redis.probe())
    }
}

impl RoutingService for Service {}
