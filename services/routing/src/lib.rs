//! The Routing service: pending deflections, conversations and opt-outs, and where replies go.
//!
//! Owns the `routing` PostgreSQL schema: deflections, conversations, transcripts, opt-outs and its
//! event outbox. The open-conversation fact lives here (one open conversation per account and
//! consumer, a unique index); the Redis lease `<prefix>:{<account>}:conv:<consumer>` is the fast
//! path in front of it.

#![forbid(unsafe_code)]

mod conversations;
mod deflections;
mod grpc;

use c2m_proto::v1::routing_service_server::RoutingServiceServer;
use c2m_runtime::{Component, auth::TokenKey, peers::Peers};
use c2m_storage::{RedisHandle, ServiceDb, batch::Batcher, outbox::Relay, redis::Breaker};
use sqlx::migrate::Migrator;

/// The PostgreSQL schema this service owns; no other service reads it.
pub const SCHEMA: &str = "routing";

/// This service's migrations (`migrations/`), applied at start or by `c2m migrate`.
pub static MIGRATOR: Migrator = sqlx::migrate!();

/// The `c2m.v1.RoutingService` implementation.
#[derive(Debug, Clone)]
pub struct Service {
    db: ServiceDb,
    redis: RedisHandle,
    peers: Peers,
    key: TokenKey,
    relay: Relay,
    checks: Batcher<deflections::Checks>,
    /// After Redis fails, lease writes are skipped for a second, so a dead Redis costs a caller
    /// one timeout a second at most rather than one per request.
    breaker: Breaker,
}

impl Service {
    pub fn new(db: ServiceDb, redis: RedisHandle, peers: Peers, key: TokenKey) -> Self {
        let relay = Relay::new(db.clone(), peers.clone());
        Self {
            checks: Batcher::new(deflections::Checks(db.batch_pool().clone())),
            db,
            redis,
            peers,
            key,
            relay,
            breaker: Breaker::new("routing"),
        }
    }

    /// The gRPC service, SERVING while its schema and Redis answer, with its outbox relay.
    pub fn into_component(self) -> Component {
        let relay = self.relay.clone();
        Component::new(RoutingServiceServer::new(self.clone()))
            .with_probe(self.db.probe())
            .with_optional_probe(self.redis.probe())
            .with_task(move |shutdown| relay.run(shutdown))
    }

    fn lease_key(&self, account_id: &str, consumer: &str) -> String {
        self.redis
            .account_key(account_id, &format!("conv:{consumer}"))
    }
}
