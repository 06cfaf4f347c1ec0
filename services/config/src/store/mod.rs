//! Config's storage, behind a trait so the embedded backend can slot in later.

mod common;
mod postgres;
mod sqlite;

pub use postgres::PgConfigStore;
pub use sqlite::SqliteConfigStore;

use async_trait::async_trait;
use c2m_proto::v1::{Channel, WhatsAppTemplateStatus};
use chrono::{DateTime, Utc};

use crate::model::{
    Account, ApiKey, HandoffConfig, Settings, Template, WebhookDelivery, WebhookEndpoint,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (the id or name is taken).
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Who made a change, for the audit log.
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a>(pub &'a str);

/// What updating a configuration at an expected version did.
#[derive(Debug)]
pub enum Updated {
    Done(Box<HandoffConfig>),
    /// Someone else updated it first: its version now.
    Stale(i64),
    Missing,
}

/// What deleting a template did.
#[derive(Debug)]
pub enum TemplateDeleted {
    Done,
    Missing,
    /// Configurations that still send it.
    InUse(Vec<String>),
}

/// An endpoint a Config replica delivers for, with what delivering needs.
#[derive(Debug, Clone)]
pub struct LeasedWebhook {
    pub endpoint: WebhookEndpoint,
    /// The signing secret, and the one before a rotation while it is still signed with.
    pub secret: Vec<u8>,
    pub previous_secret: Option<Vec<u8>>,
    /// The last conversation event posted or passed over; empty: none yet.
    pub cursor: String,
    /// The last handoff event (a position in Reporting's log) posted or passed over; `None`:
    /// none yet.
    pub handoff_position: Option<i64>,
    /// Changes with every admin change of the endpoint.
    pub version: i64,
}

/// Where a webhook endpoint is in one of the two feeds it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookPosition<'a> {
    /// Routing's conversation stream: a WatchConversations cursor.
    Conversations(&'a str),
    /// Reporting's event log: a ListEvents position.
    Handoffs(i64),
}

/// One audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub id: i64,
    pub account_id: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub at: DateTime<Utc>,
}

#[async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    async fn create_account(&self, account: &Account, actor: Actor<'_>) -> Result<(), StoreError>;
    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError>;
    async fn update_settings(
        &self,
        id: &str,
        settings: &Settings,
        actor: Actor<'_>,
    ) -> Result<Option<Account>, StoreError>;
    async fn create_handoff_config(
        &self,
        config: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<(), StoreError>;
    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError>;
    /// Configurations by id, after `after`, at most `limit`, optionally only those using a channel
    /// or routing to a skill.
    async fn handoff_configs(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
        channel: Option<Channel>,
        skill_id: Option<&str>,
    ) -> Result<Vec<HandoffConfig>, StoreError>;
    /// Replaces a configuration if it is still at `config.version`; the stored one gets the next.
    async fn update_handoff_config(
        &self,
        config: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<Updated, StoreError>;
    async fn delete_handoff_config(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError>;
    async fn create_template(
        &self,
        template: &Template,
        actor: Actor<'_>,
    ) -> Result<(), StoreError>;
    async fn template(&self, account_id: &str, id: &str) -> Result<Option<Template>, StoreError>;
    /// The template Meta knows by this name and language.
    async fn template_named(
        &self,
        account_id: &str,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>, StoreError>;
    async fn templates(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError>;
    async fn set_template_status(
        &self,
        account_id: &str,
        id: &str,
        status: WhatsAppTemplateStatus,
        actor: Actor<'_>,
    ) -> Result<Option<Template>, StoreError>;
    async fn delete_template(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<TemplateDeleted, StoreError>;
    async fn create_api_key(
        &self,
        key: &ApiKey,
        hash: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError>;
    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes a live key; `false` when there is no such live key.
    async fn revoke_api_key(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError>;
    /// The live key with this hash, marking it used.
    async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError>;
    async fn create_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        secret: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError>;
    async fn webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<WebhookEndpoint>, StoreError>;
    async fn webhook_endpoints(&self, account_id: &str)
    -> Result<Vec<WebhookEndpoint>, StoreError>;
    /// Replaces what an admin sets; a re-enabled endpoint stops failing.
    async fn update_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        actor: Actor<'_>,
    ) -> Result<Option<WebhookEndpoint>, StoreError>;
    async fn delete_webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError>;
    /// The endpoint's secret and its signatures' still-valid predecessor (for `keep_previous`).
    async fn rotate_webhook_secret(
        &self,
        account_id: &str,
        id: &str,
        secret: &[u8],
        keep_previous: std::time::Duration,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError>;
    /// The endpoint with its secrets, for a test delivery.
    async fn webhook_for_test(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<LeasedWebhook>, StoreError>;
    /// Takes or renews `owner`'s lease, for `ttl`, on every enabled endpoint no other replica
    /// holds; the endpoints it holds now.
    async fn lease_webhooks(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<LeasedWebhook>, StoreError>;
    /// An event was posted (`delivered`: the endpoint is not failing any more) or passed over:
    /// the endpoint's position in that feed moves past it. `false` when `owner` no longer holds
    /// the endpoint.
    async fn webhook_passed(
        &self,
        id: &str,
        owner: &str,
        position: WebhookPosition<'_>,
        delivered: bool,
    ) -> Result<bool, StoreError>;
    /// A delivery failed: the endpoint fails since now unless it already did, and is disabled
    /// once it has failed for `disable_after`. Whether it is still enabled.
    async fn webhook_failed(
        &self,
        id: &str,
        owner: &str,
        disable_after: std::time::Duration,
    ) -> Result<bool, StoreError>;
    async fn record_webhook_delivery(&self, delivery: &WebhookDelivery) -> Result<(), StoreError>;
    /// The endpoint's deliveries before `before` (0: the newest), newest first, with their ids.
    async fn webhook_deliveries(
        &self,
        id: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, WebhookDelivery)>, StoreError>;
    /// Forgets deliveries older than `age`.
    async fn prune_webhook_deliveries(&self, age: std::time::Duration) -> Result<u64, StoreError>;
    /// Audit records of an account in `[start, end)`, after record `after`, oldest first.
    async fn audit(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}
