//! The Handoff service: what an IVR calls to deflect a caller to messaging.
//!
//! Owns the `handoff` PostgreSQL schema: handoffs, idempotency records and the event outbox.

#![forbid(unsafe_code)]

use c2m_proto::v1::handoff_service_server::{HandoffService, HandoffServiceServer};
use c2m_runtime::Component;
use c2m_storage::{RedisHandle, ServiceDb};
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "handoff";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.HandoffService` implementation. RPCs not implemented yet answer UNIMPLEMENTED.
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
        Component::new(HandoffServiceServer::new(self.clone()))
            .with_probe(self.db.probe())
            .with_probe(self.redis.probe())
    }
}

impl HandoffService for Service {}
