//! [`ConfigStore`] on SQLite: the embedded default's control plane, one file, the same answers as
//! PostgreSQL's (`tests/config_store.rs` runs one suite against both). Times are integer
//! microseconds, lists JSON text. SQLite has no `NOTIFY`: each change is published to this
//! process's watchers once it has committed, which is all the watchers there are in embedded mode.

mod accounts;
mod configs;
mod webhooks;

use async_trait::async_trait;
use c2m_proto::v1::{Channel, WhatsAppTemplateCategory, WhatsAppTemplateStatus};
use c2m_storage::sqlite::{micros, now, time};
use chrono::{DateTime, Utc};
use sqlx::{
    Row, Sqlite, SqliteConnection, SqlitePool, Transaction, migrate::Migrator, sqlite::SqliteRow,
};

use super::{
    Actor, AuditRecord, ConfigStore, LeasedWebhook, StoreError, TemplateDeleted, Updated,
    WebhookPosition, common::*,
};
use crate::{
    model::{Account, ApiKey, HandoffConfig, Settings, Template, WebhookDelivery, WebhookEndpoint},
    watch::Watch,
};

/// The SQLite schema's migrations (`migrations-sqlite/`).
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations-sqlite");

#[derive(Debug, Clone)]
pub struct SqliteConfigStore {
    pool: SqlitePool,
    watch: Watch,
}

impl SqliteConfigStore {
    /// The store over `pool`, its migrations applied, publishing its changes to `watch`.
    pub async fn new(pool: SqlitePool, watch: Watch) -> Result<Self, sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self { pool, watch })
    }

    /// A write transaction. SQLite has one writer at a time; taking the lock at `BEGIN` rather
    /// than at the first write keeps a read-then-write from failing busy halfway through.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// Commits an audited change, then tells this process's watchers of it.
    async fn commit(
        &self,
        tx: Transaction<'static, Sqlite>,
        change: Audited,
    ) -> Result<(), StoreError> {
        tx.commit().await?;
        self.watch.publish(&change.account_id, &change.resource);
        Ok(())
    }
}

/// A change an audit record was written for, to publish once it commits.
struct Audited {
    account_id: String,
    resource: String,
}

/// Writes one audit record inside the change's transaction.
async fn audit(
    tx: &mut SqliteConnection,
    account_id: &str,
    actor: Actor<'_>,
    action: &str,
    resource: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<Audited, sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_events (account_id, actor, action, resource, before, after, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .bind(account_id)
    .bind(actor.0)
    .bind(action)
    .bind(resource)
    .bind(before.map(|v| v.to_string()))
    .bind(after.map(|v| v.to_string()))
    .bind(now())
    .execute(&mut *tx)
    .await?;
    Ok(Audited {
        account_id: account_id.to_owned(),
        resource: resource.to_owned(),
    })
}

/// A list as JSON text.
fn json_list<T: serde::Serialize>(values: &[T]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

/// JSON text as a list of strings; anything else as none.
fn strings(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

fn optional_time(row: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    Ok(row.try_get::<Option<i64>, _>(column)?.map(time))
}

fn account_row(row: &SqliteRow) -> Result<Account, sqlx::Error> {
    let number = |column: &str| -> Result<u32, sqlx::Error> {
        Ok(u32::try_from(row.try_get::<i64, _>(column)?).unwrap_or_default())
    };
    Ok(Account {
        id: row.try_get("account_id")?,
        display_name: row.try_get("display_name")?,
        settings: Settings {
            deflection_enabled: row.try_get("deflection_enabled")?,
            landline_check_enabled: row.try_get("landline_check_enabled")?,
            rate_limit_per_second: number("rate_limit_per_second")?,
            enabled_channels: channels(strings(row.try_get("enabled_channels")?)),
            reply_lookback_hours: number("reply_lookback_hours")?,
            idle_close_minutes: number("idle_close_minutes")?,
            help_text: row.try_get("help_text")?,
            time_zone: row.try_get("time_zone")?,
        },
        created_at: time(row.try_get("created_at")?),
    })
}

fn config_row(row: &SqliteRow) -> Result<HandoffConfig, sqlx::Error> {
    let stored: &str = row.try_get("messages")?;
    Ok(HandoffConfig {
        id: row.try_get("handoff_config_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        skill_id: row.try_get("skill_id")?,
        channel_priority: channels(strings(row.try_get("channel_priority")?)),
        messages: messages(&serde_json::from_str(stored).unwrap_or_default()),
        whatsapp_template_id: row.try_get("whatsapp_template_id")?,
        apple_business_id: row.try_get("apple_business_id")?,
        apple_intent_id: row.try_get("apple_intent_id")?,
        apple_group_id: row.try_get("apple_group_id")?,
        apple_body: row.try_get("apple_body")?,
        delivery_deadline_seconds: u32::try_from(
            row.try_get::<i64, _>("delivery_deadline_seconds")?,
        )
        .unwrap_or_default(),
        version: row.try_get("version")?,
        updated_at: time(row.try_get("updated_at")?),
    })
}

fn api_key_row(row: &SqliteRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("api_key_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_at: time(row.try_get("created_at")?),
        last_used_at: optional_time(row, "last_used_at")?,
        revoked_at: optional_time(row, "revoked_at")?,
        scopes: strings(row.try_get("scopes")?)
            .iter()
            .filter_map(|s| c2m_proto::v1::ApiKeyScope::from_str_name(s))
            .collect(),
    })
}

fn template_row(row: &SqliteRow) -> Result<Template, sqlx::Error> {
    Ok(Template {
        id: row.try_get("template_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        language: row.try_get("language")?,
        category: WhatsAppTemplateCategory::from_str_name(row.try_get("category")?)
            .unwrap_or_default(),
        body: row.try_get("body")?,
        status: WhatsAppTemplateStatus::from_str_name(row.try_get("status")?).unwrap_or_default(),
    })
}

#[async_trait]
impl ConfigStore for SqliteConfigStore {
    async fn create_account(&self, a: &Account, actor: Actor<'_>) -> Result<(), StoreError> {
        self.create_account(a, actor).await
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        self.account(id).await
    }

    async fn update_settings(
        &self,
        id: &str,
        s: &Settings,
        actor: Actor<'_>,
    ) -> Result<Option<Account>, StoreError> {
        self.update_settings(id, s, actor).await
    }

    async fn create_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        self.create_handoff_config(c, actor).await
    }

    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError> {
        self.handoff_config(account_id, id).await
    }

    async fn handoff_configs(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
        channel: Option<Channel>,
        skill_id: Option<&str>,
    ) -> Result<Vec<HandoffConfig>, StoreError> {
        self.handoff_configs(account_id, after, limit, channel, skill_id)
            .await
    }

    async fn update_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<Updated, StoreError> {
        self.update_handoff_config(c, actor).await
    }

    async fn delete_handoff_config(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        self.delete_handoff_config(account_id, id, actor).await
    }

    async fn create_template(&self, t: &Template, actor: Actor<'_>) -> Result<(), StoreError> {
        self.create_template(t, actor).await
    }

    async fn template(&self, account_id: &str, id: &str) -> Result<Option<Template>, StoreError> {
        self.template(account_id, id).await
    }

    async fn template_named(
        &self,
        account_id: &str,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>, StoreError> {
        self.template_named(account_id, name, language).await
    }

    async fn templates(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError> {
        self.templates(account_id, after, limit).await
    }

    async fn set_template_status(
        &self,
        account_id: &str,
        id: &str,
        status: WhatsAppTemplateStatus,
        actor: Actor<'_>,
    ) -> Result<Option<Template>, StoreError> {
        self.set_template_status(account_id, id, status, actor)
            .await
    }

    async fn delete_template(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<TemplateDeleted, StoreError> {
        self.delete_template(account_id, id, actor).await
    }

    async fn create_api_key(
        &self,
        k: &ApiKey,
        hash: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        self.create_api_key(k, hash, actor).await
    }

    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        self.api_keys(account_id).await
    }

    async fn revoke_api_key(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        self.revoke_api_key(account_id, id, actor).await
    }

    async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError> {
        self.use_api_key(hash).await
    }

    async fn create_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        secret: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        self.create_webhook(endpoint, secret, actor).await
    }

    async fn webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        self.webhook(account_id, id).await
    }

    async fn webhook_endpoints(
        &self,
        account_id: &str,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        self.webhooks(account_id).await
    }

    async fn update_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        actor: Actor<'_>,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        self.update_webhook(endpoint, actor).await
    }

    async fn delete_webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        self.delete_webhook(account_id, id, actor).await
    }

    async fn rotate_webhook_secret(
        &self,
        account_id: &str,
        id: &str,
        secret: &[u8],
        keep_previous: std::time::Duration,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        self.rotate_webhook_secret(account_id, id, secret, keep_previous, actor)
            .await
    }

    async fn webhook_for_test(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<LeasedWebhook>, StoreError> {
        self.webhook_for_test(account_id, id).await
    }

    async fn lease_webhooks(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<LeasedWebhook>, StoreError> {
        self.lease_webhooks(owner, ttl).await
    }

    async fn webhook_passed(
        &self,
        id: &str,
        owner: &str,
        position: WebhookPosition<'_>,
        delivered: bool,
    ) -> Result<bool, StoreError> {
        self.webhook_passed(id, owner, position, delivered).await
    }

    async fn webhook_failed(
        &self,
        id: &str,
        owner: &str,
        disable_after: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.webhook_failed(id, owner, disable_after).await
    }

    async fn record_webhook_delivery(&self, delivery: &WebhookDelivery) -> Result<(), StoreError> {
        self.record_webhook_delivery(delivery).await
    }

    async fn webhook_deliveries(
        &self,
        id: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, WebhookDelivery)>, StoreError> {
        self.webhook_deliveries(id, before, limit).await
    }

    async fn prune_webhook_deliveries(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        self.prune_webhook_deliveries(age).await
    }

    async fn audit(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_records(account_id, (start, end), after, limit)
            .await
    }
}
