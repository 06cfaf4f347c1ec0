//! PostgreSQL and Redis plumbing shared by the c2m services.
//!
//! Each service owns one PostgreSQL schema (its tables and its `_sqlx_migrations` record), reached
//! through a pool whose `search_path` is that schema alone, so no service can read another's
//! tables by accident. Redis holds counters and leases under per-account hash-tagged keys.

#![forbid(unsafe_code)]

pub mod batch;
pub mod coordination;
pub mod outbox;
pub mod postgres;
pub mod redis;
pub mod sqlite;
mod url_mask;

pub use coordination::{Coordination, InProcess, RedisCoordination};
pub use postgres::{DatabaseSettings, ServiceDatabase, ServiceDb};
pub use redis::{RedisHandle, RedisSettings};
pub use url_mask::mask_password;
