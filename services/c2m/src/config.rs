//! c2m's configuration: defaults, then a TOML file (`--config`), then `C2M_…` environment
//! variables (`__` between levels: `C2M_DATABASE__URL`), then command-line flags. It is validated
//! before any port is bound; the first bad key stops the process with exit code 64.

use std::{net::SocketAddr, path::Path};

use c2m_channel_gateway::GatewaySettings;
use c2m_config::webhooks::WebhookSettings;
use c2m_handoff::HandoffSettings;
use c2m_reporting::ReportingSettings;
use c2m_routing::RoutingSettings;
use c2m_runtime::{LogFormat, ServerSettings, TelemetrySettings, peers::PeerSettings};
use c2m_storage::{DatabaseSettings, RedisSettings, mask_password};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// The whole configuration. Each section's fields are documented where they are defined.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: ListenSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub server: ServerSettings,
    pub telemetry: TelemetrySettings,
    pub auth: AuthSettings,
    pub peers: PeerSettings,
    pub channel_gateway: GatewaySettings,
    pub handoff: HandoffSettings,
    pub routing: RoutingSettings,
    pub reporting: ReportingSettings,
    pub webhooks: WebhookSettings,
    pub embedded: EmbeddedSettings,
}

/// `[embedded]`: where `c2m dev` keeps its data when no database is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedSettings {
    /// A directory of SQLite files, one per service (`config.db`, `handoff.db`, …), and the
    /// secrets made up for it (`secrets.toml`); created if missing (flag `--data-dir`).
    pub data_dir: std::path::PathBuf,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            data_dir: "c2m-data".into(),
        }
    }
}

/// `[auth]`: the key that signs console, operator and service tokens.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// HS256 secret, at least 32 characters, shared by every replica of every role. Required by
    /// `c2m serve`; `c2m dev` makes one up for the run when it is empty.
    pub token_secret: String,
}

/// `[listen]`: the gRPC address of each role, and of `c2m dev` (all roles on one address).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSettings {
    pub handoff: SocketAddr,
    pub routing: SocketAddr,
    pub channel_gateway: SocketAddr,
    pub config: SocketAddr,
    pub reporting: SocketAddr,
    pub dev: SocketAddr,
    /// The channel gateway's webhook listener (HTTP), for `serve channel-gateway` and `dev`: the
    /// one port to expose to the providers.
    pub webhooks: SocketAddr,
}

impl Default for ListenSettings {
    fn default() -> Self {
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        Self {
            handoff: any(50051),
            routing: any(50052),
            channel_gateway: any(50053),
            config: any(50054),
            reporting: any(50055),
            dev: SocketAddr::from(([127, 0, 0, 1], 50051)),
            webhooks: any(8080),
        }
    }
}

/// Values from command-line flags, the last and strongest layer. Unset flags leave the layers
/// below alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryOverrides>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedded: Option<EmbeddedOverrides>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddedOverrides {
    pub data_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseOverrides {
    pub url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedisOverrides {
    pub url: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TelemetryOverrides {
    pub log_format: LogFormat,
}

impl Overrides {
    /// Listen on `addr` for the listener named `key` (a role's key or `dev`).
    pub fn listen(mut self, key: &str, addr: SocketAddr) -> Self {
        self.listen
            .get_or_insert_with(Default::default)
            .insert(key.to_owned(), serde_json::Value::String(addr.to_string()));
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {}", describe(.0))]
    Parse(Box<figment::Error>),
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
}

impl From<figment::Error> for ConfigError {
    fn from(error: figment::Error) -> Self {
        ConfigError::Parse(Box::new(error))
    }
}

impl Config {
    /// What `c2m serve <role>` needs beyond what `c2m dev` can make up: the shared token secret,
    /// and the gateway's sealing key.
    pub fn check_serve(&self, role: crate::Role) -> Result<(), ConfigError> {
        if self.auth.token_secret.is_empty() {
            return Err(ConfigError::Invalid {
                key: "auth.token_secret",
                reason:
                    "must be set for `c2m serve` (C2M_AUTH__TOKEN_SECRET), the same for every role"
                        .into(),
            });
        }
        if matches!(role, crate::Role::Handoff | crate::Role::Routing) && !self.redis.is_set() {
            return Err(ConfigError::Invalid {
                key: "redis.url",
                reason: format!(
                    "must be set for `c2m serve {}` (C2M_REDIS__URL, or redis.cluster_nodes): replicas share their rate limits and leases in Redis",
                    role.name()
                ),
            });
        }
        if role == crate::Role::ChannelGateway && self.channel_gateway.credentials_key.is_empty() {
            return Err(ConfigError::Invalid {
                key: "channel_gateway.credentials_key",
                reason: "must be set for `c2m serve channel-gateway` (base64 of 32 random bytes)"
                    .into(),
            });
        }
        let (schema, _) = role.schema();
        if self.database.for_schema(schema).url.is_empty() {
            return Err(ConfigError::Invalid {
                key: "database.url",
                reason: format!(
                    "must be set for `c2m serve {}` (C2M_DATABASE__URL, or --database-url): \
                     replicas share PostgreSQL; only `c2m dev` keeps its data in SQLite files",
                    role.name()
                ),
            });
        }
        Ok(())
    }

    /// Loads and validates the configuration: defaults, `file`, the process's `C2M_*` variables,
    /// then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Read it first so a missing or unreadable file is reported as such, with its path.
            std::fs::File::open(path).map_err(|source| ConfigError::Unreadable {
                path: path.display().to_string(),
                source,
            })?;
            figment = figment.merge(Toml::file_exact(path));
        }
        let config: Config = figment
            .merge(
                Env::prefixed("C2M_")
                    .split("__")
                    // Lower-cased here, not only on output, so errors name keys as files do.
                    .map(|key| key.as_str().to_ascii_lowercase().into())
                    // `C2M_TEST_*` and other variables outside the configuration's sections are
                    // not configuration.
                    .filter(|key| SECTIONS.iter().any(|s| key.as_str().starts_with(s))),
            )
            .merge(Serialized::defaults(overrides))
            .extract()?;
        config.validate()?;
        Ok(config)
    }

    /// Warnings for `C2M_*` variables in `vars` that set nothing: a section misspelled
    /// (`C2M_DATABSE__URL`) or a single underscore where two belong (`C2M_DATABASE_URL`). A
    /// key misspelled inside a known section is an error already (unknown field).
    pub fn unused_variables(vars: impl IntoIterator<Item = String>) -> Vec<String> {
        /// `C2M_*` variables that are not configuration: the test suite's and the benchmarks'.
        const OTHERS: [&str; 2] = ["C2M_TEST_", "C2M_BENCH_"];
        let mut warnings: Vec<String> = vars
            .into_iter()
            .filter(|name| name.starts_with("C2M_") && !OTHERS.iter().any(|o| name.starts_with(o)))
            .filter(|name| {
                let key = name["C2M_".len()..].to_ascii_lowercase().replace("__", ".");
                !SECTIONS.iter().any(|s| key.starts_with(s))
            })
            .map(|name| {
                let key = name["C2M_".len()..].to_ascii_lowercase();
                let hint = SECTIONS
                    .iter()
                    .map(|s| s.trim_end_matches('.'))
                    .find(|section| {
                        key.strip_prefix(section)
                            .is_some_and(|rest| rest.starts_with('_') && !rest.starts_with("__"))
                    })
                    .map(|section| {
                        let rest = &name["C2M_".len() + section.len() + 1..];
                        format!(
                            " (did you mean C2M_{}__{rest}?)",
                            section.to_ascii_uppercase()
                        )
                    })
                    .unwrap_or_else(|| {
                        let sections: Vec<&str> =
                            SECTIONS.iter().map(|s| s.trim_end_matches('.')).collect();
                        format!(
                            " (configuration variables are C2M_<SECTION>__<KEY>, sections: {})",
                            sections.join(", ")
                        )
                    });
                format!("{name} sets no configuration key and is ignored{hint}")
            })
            .collect();
        warnings.sort();
        warnings
    }

    /// Checks what types alone cannot: URLs, ranges, the log filter.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        let scheme = |raw: &str| url::Url::parse(raw).map(|u| u.scheme().to_owned());
        let own_urls = self
            .database
            .overrides()
            .map(|(schema, db)| (database_key(schema), db.url.as_str()));
        for (key, url) in [("database.url", self.database.url.as_str())]
            .into_iter()
            .filter(|(_, url)| !url.is_empty())
            .chain(own_urls)
        {
            match scheme(url) {
                Ok(s) if s == "postgres" || s == "postgresql" => {}
                Ok(_) => return invalid(key, "must be a postgres:// URL"),
                Err(e) => return invalid(key, &format!("is not a URL: {e}")),
            }
            if url::Url::parse(url).is_ok_and(|u| u.password() == Some(MASKED)) {
                return invalid(
                    key,
                    "holds the mask `c2m config` prints (*****), not the password: give the real one",
                );
            }
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if self.database.acquire_timeout_ms == 0 {
            return invalid("database.acquire_timeout_ms", "must be at least 1");
        }
        if !self.redis.url.is_empty() && !self.redis.cluster_nodes.is_empty() {
            return invalid(
                "redis.cluster_nodes",
                "and redis.url are exclusive: a cluster's nodes, or one server",
            );
        }
        for node in &self.redis.cluster_nodes {
            if !scheme(node).is_ok_and(|s| s == "redis") {
                return invalid(
                    "redis.cluster_nodes",
                    "each must be a redis://host:port URL",
                );
            }
        }
        match scheme(&self.redis.url) {
            _ if self.redis.url.is_empty() => {}
            Ok(s) if s == "redis" || s == "redis+unix" || s == "unix" => {}
            Ok(_) => return invalid("redis.url", "must be a redis:// URL"),
            Err(e) => return invalid("redis.url", &format!("is not a URL: {e}")),
        }
        if self.redis.connect_timeout_ms == 0 || self.redis.response_timeout_ms == 0 {
            return invalid(
                "redis.response_timeout_ms",
                "and redis.connect_timeout_ms must be at least 1",
            );
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return invalid("redis.key_prefix", "must be non-empty, without braces");
        }
        if self.server.request_timeout_ms == 0 {
            return invalid("server.request_timeout_ms", "must be at least 1");
        }
        if self.server.concurrency_limit == 0 {
            return invalid("server.concurrency_limit", "must be at least 1");
        }
        if self.server.health_interval_ms < 10 {
            return invalid("server.health_interval_ms", "must be at least 10");
        }
        // `c2m config` prints secrets masked; its output fed back must not run on the mask.
        let password_masked =
            |url: &str| url::Url::parse(url).is_ok_and(|u| u.password() == Some(MASKED));
        for (key, masked) in [
            ("auth.token_secret", self.auth.token_secret == MASKED),
            (
                "channel_gateway.credentials_key",
                self.channel_gateway.credentials_key == MASKED,
            ),
            ("database.url", password_masked(&self.database.url)),
            ("redis.url", password_masked(&self.redis.url)),
        ] {
            if masked {
                return invalid(
                    key,
                    "holds the mask `c2m config` prints (*****), not the secret: give the real one, e.g. through its C2M_ variable",
                );
            }
        }
        if !self.auth.token_secret.is_empty() && self.auth.token_secret.len() < 32 {
            return invalid("auth.token_secret", "must be at least 32 characters");
        }
        for (key, url) in [
            ("peers.handoff", &self.peers.handoff),
            ("peers.routing", &self.peers.routing),
            ("peers.channel_gateway", &self.peers.channel_gateway),
            ("peers.config", &self.peers.config),
            ("peers.reporting", &self.peers.reporting),
        ] {
            match scheme(url) {
                Ok(s) if s == "http" || s == "https" => {}
                _ => return invalid(key, "must be an http:// or https:// URL"),
            }
        }
        if !self.channel_gateway.credentials_key.is_empty()
            && self.channel_gateway.sealing_key().is_none()
        {
            return invalid(
                "channel_gateway.credentials_key",
                "must be base64 of 32 bytes",
            );
        }
        match scheme(&self.channel_gateway.public_url) {
            Ok(s) if s == "http" || s == "https" => {}
            _ => {
                return invalid(
                    "channel_gateway.public_url",
                    "must be an http:// or https:// URL",
                );
            }
        }
        match scheme(&self.channel_gateway.twilio_api_base) {
            Ok(s) if s == "http" || s == "https" => {}
            _ => {
                return invalid(
                    "channel_gateway.twilio_api_base",
                    "must be an http:// or https:// URL",
                );
            }
        }
        if self.channel_gateway.provider_timeout_ms == 0
            || self.channel_gateway.provider_timeout_ms >= self.peers.timeout_ms
        {
            return invalid(
                "channel_gateway.provider_timeout_ms",
                &format!(
                    "must be at least 1 and below peers.timeout_ms ({}): a send must have its \
                     answer before Handoff stops waiting for it, or a late one becomes a second \
                     message on the next channel",
                    self.peers.timeout_ms
                ),
            );
        }
        if self.handoff.replicas == 0 {
            return invalid("handoff.replicas", "must be at least 1");
        }
        if self.handoff.consumer_lease_ms == 0 {
            return invalid("handoff.consumer_lease_ms", "must be at least 1");
        }
        if self.handoff.unconfirmed_fallback_ms == 0 {
            return invalid("handoff.unconfirmed_fallback_ms", "must be at least 1");
        }
        if self.handoff.max_in_progress == 0 {
            return invalid("handoff.max_in_progress", "must be at least 1");
        }
        if self.routing.idle_sweep_ms == 0 {
            return invalid("routing.idle_sweep_ms", "must be at least 1");
        }
        if self.routing.log_retention_days == 0 || self.routing.log_retention_days > 3650 {
            return invalid("routing.log_retention_days", "must be 1 to 3650");
        }
        if self.reporting.retention_days > 36_500 {
            return invalid("reporting.retention_days", "must be 0 (forever) to 36500");
        }
        if let Err(name) = self.reporting.zones() {
            return invalid(
                "reporting.rollup_zones",
                &format!("{name:?} is not an IANA time zone (e.g. America/New_York)"),
            );
        }
        if self.reporting.rollup_zones.len() > 8 {
            return invalid("reporting.rollup_zones", "at most 8 zones");
        }
        for (key, value) in [
            ("webhooks.timeout_ms", self.webhooks.timeout_ms),
            ("webhooks.retry_base_ms", self.webhooks.retry_base_ms),
            (
                "webhooks.disable_after_hours",
                self.webhooks.disable_after_hours,
            ),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1");
            }
        }
        if self.webhooks.retry_max_ms < self.webhooks.retry_base_ms {
            return invalid(
                "webhooks.retry_max_ms",
                "must be at least webhooks.retry_base_ms",
            );
        }
        if let Err(e) = c2m_runtime::telemetry::validate_filter(&self.telemetry.log_filter) {
            return invalid(
                "telemetry.log_filter",
                &format!("is not a valid filter: {e}"),
            );
        }
        Ok(())
    }

    /// The configuration as TOML, with secrets and passwords in URLs masked, under a comment that
    /// says how to use it as a file.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        masked.database.url = mask_password(&masked.database.url);
        for db in [
            &mut masked.database.handoff,
            &mut masked.database.routing,
            &mut masked.database.channel_gateway,
            &mut masked.database.config,
            &mut masked.database.reporting,
        ]
        .into_iter()
        .flatten()
        {
            db.url = mask_password(&db.url);
        }
        masked.redis.url = mask_password(&masked.redis.url);
        for node in &mut masked.redis.cluster_nodes {
            *node = mask_password(node);
        }
        for secret in [
            &mut masked.auth.token_secret,
            &mut masked.channel_gateway.credentials_key,
        ] {
            if !secret.is_empty() {
                *secret = MASKED.to_owned();
            }
        }
        match toml::to_string_pretty(&masked) {
            Ok(text) => format!(
                "# c2m's effective configuration. Secrets show as {MASKED}: to use this as a file \n\
                 # (--config), give them again through their C2M_ variables (C2M_AUTH__TOKEN_SECRET, \n\
                 # C2M_CHANNEL_GATEWAY__CREDENTIALS_KEY, the URLs' passwords); c2m refuses a mask.\n\n{text}"
            ),
            Err(e) => format!("# cannot print: {e}\n"),
        }
    }
}

/// The key of a service's own database URL.
fn database_key(schema: &str) -> &'static str {
    match schema {
        "handoff" => "database.handoff.url",
        "routing" => "database.routing.url",
        "channel_gateway" => "database.channel_gateway.url",
        "config" => "database.config.url",
        _ => "database.reporting.url",
    }
}

/// What `c2m config` prints in place of a secret.
const MASKED: &str = "*****";

/// Names the key, the problem and where the value came from: the file, or the variable.
fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = match e.metadata.as_ref() {
                Some(m) => match &m.source {
                    Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
                    _ if m.name.contains("environment") => {
                        format!(" (from ${})", env_var_name(&e.path))
                    }
                    _ => String::new(),
                },
                None => String::new(),
            };
            if key.is_empty() {
                format!("{}{origin}", e.kind)
            } else {
                format!("`{key}`: {}{origin}", e.kind)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn env_var_name(path: &[String]) -> String {
    format!("C2M_{}", path.join("__").to_ascii_uppercase())
}

/// The top-level sections, which environment variables may set.
const SECTIONS: [&str; 13] = [
    "listen.",
    "database.",
    "redis.",
    "server.",
    "telemetry.",
    "auth.",
    "peers.",
    "channel_gateway.",
    "handoff.",
    "routing.",
    "reporting.",
    "webhooks.",
    "embedded.",
];
