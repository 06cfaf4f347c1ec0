//! Test support for c2m: each test gets its own PostgreSQL database and Redis key prefix (both
//! removed when dropped), throwaway `redis-server`s and PostgreSQL clusters for tests that kill
//! their Redis or crash their PostgreSQL, and waiting on conditions with a deadline instead of
//! sleeping.
//!
//! Tests reach the shared servers through `C2M_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `C2M_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`), and fail with a message saying so when they cannot.

#![forbid(unsafe_code)]

mod apns;
mod conformance;
pub use conformance::Kept;
mod database;
mod google;
mod meta;
mod postgres;
mod redis;
mod twilio;
mod wait;

pub use apns::{APNS_KEY_ID, APNS_TEAM_ID, APNS_TOPIC, ApnsEmulator, SentApns};
pub use database::TestDatabase;
pub use google::{GoogleEmulator, SentFcm, SentRcs, TEST_SERVICE_ACCOUNT_KEY, goog_signature};
pub use meta::{MetaEmulator, SentWhatsApp, Stall, meta_signature};
pub use postgres::PostgresServer;
pub use redis::{RedisCluster, RedisServer, TestRedis};
pub use twilio::{Latency, SentSms, TwilioEmulator, twilio_signature};
pub use wait::{eventually, eventually_eq, free_port};
