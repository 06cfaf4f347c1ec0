//! The Reporting service: the append-only event log and the funnel.
//!
//! Owns the `reporting` PostgreSQL schema: events, de-duplicated by id.

#![forbid(unsafe_code)]

use c2m_proto::v1::reporting_service_server::{ReportingService, ReportingServiceServer};
use c2m_runtime::Component;
use c2m_storage::ServiceDb;
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "reporting";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.ReportingService` implementation. RPCs not implemented yet answer UNIMPLEMENTED.
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
        Component::new(ReportingServiceServer::new(self.clone())).with_probe(self.db.probe())
    }
}

impl ReportingService for Service {}
