//! Typed settings shared by every role. The binary assembles them into its configuration file
//! format; each field's doc is the reference for its key.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[server]`: how every gRPC server behaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Seconds in-flight requests get to finish after SIGTERM before the process exits anyway.
    pub grace_period_secs: u64,
    /// Milliseconds between reporting NOT_SERVING on SIGTERM and refusing new connections, so load
    /// balancers can take the replica out first.
    pub drain_delay_ms: u64,
    /// Milliseconds a request may run before it is answered DEADLINE_EXCEEDED (a client's shorter
    /// `grpc-timeout` wins).
    pub request_timeout_ms: u64,
    /// Requests served at once by one process, across all connections; more wait for a slot.
    pub concurrency_limit: usize,
    /// Milliseconds between health probes of the dependencies (PostgreSQL, Redis).
    pub health_interval_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grace_period_secs: 20,
            drain_delay_ms: 0,
            request_timeout_ms: 10_000,
            concurrency_limit: 1024,
            health_interval_ms: 2_000,
        }
    }
}

impl ServerSettings {
    pub fn grace_period(&self) -> Duration {
        Duration::from_secs(self.grace_period_secs)
    }

    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }
}

/// `[telemetry]`: logs. Traces are exported over OTLP when the standard `OTEL_*` variables ask.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,c2m_handoff=debug`. `RUST_LOG` overrides it.
    pub log_filter: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
