//! What every c2m service needs around its business logic: server settings, the gRPC server
//! bootstrap (health, reflection, timeouts, concurrency limits, tracing), health probes, graceful
//! shutdown and telemetry.

#![forbid(unsafe_code)]

pub mod api_keys;
pub mod auth;
pub mod backoff;
pub mod cache;
pub mod config_changes;
pub mod health;
pub mod http;
pub mod ids;
pub mod media;
pub mod metrics;
pub mod peers;
pub mod phone;
pub mod rest;
mod rpc_metrics;
pub mod server;
pub mod settings;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod trace_layer;

pub use health::{Probe, ProbeFuture};
pub use phone::{E164, is_e164, mask_phone};
pub use server::{Component, ServeError};
pub use settings::{LogFormat, ServerSettings, TelemetrySettings};
pub use tokio_util::{sync::CancellationToken, task::TaskTracker};
