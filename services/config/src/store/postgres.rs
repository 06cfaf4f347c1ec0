//! The PostgreSQL backend of Config's store.

mod accounts;
mod audit;
mod configs;
mod templates;
mod webhooks;

use async_trait::async_trait;
use c2m_proto::v1::{Channel, WhatsAppTemplateCategory, WhatsAppTemplateStatus};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};

use super::{
    Actor, AuditRecord, ConfigStore, LeasedWebhook, StoreError, TemplateDeleted, Updated,
    WebhookPosition, common::*,
};
use crate::model::{
    Account, ApiKey, HandoffConfig, Settings, Template, WebhookDelivery, WebhookEndpoint,
};

#[derive(Debug, Clone)]
pub struct PgConfigStore {
    pool: PgPool,
}

impl PgConfigStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn account_row(row: PgRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: row.try_get("account_id")?,
        display_name: row.try_get("display_name")?,
        settings: Settings {
            deflection_enabled: row.try_get("deflection_enabled")?,
            landline_check_enabled: row.try_get("landline_check_enabled")?,
            rate_limit_per_second: row.try_get::<i32, _>("rate_limit_per_second")? as u32,
            enabled_channels: channels(row.try_get("enabled_channels")?),
            reply_lookback_hours: row.try_get::<i32, _>("reply_lookback_hours")? as u32,
            idle_close_minutes: row.try_get::<i32, _>("idle_close_minutes")? as u32,
            help_text: row.try_get("help_text")?,
            time_zone: row.try_get("time_zone")?,
        },
        created_at: row.try_get("created_at")?,
    })
}

fn config_row(row: PgRow) -> Result<HandoffConfig, sqlx::Error> {
    let messages = messages(&row.try_get("messages")?);
    Ok(HandoffConfig {
        id: row.try_get("handoff_config_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        skill_id: row.try_get("skill_id")?,
        channel_priority: channels(row.try_get("channel_priority")?),
        messages,
        whatsapp_template_id: row.try_get("whatsapp_template_id")?,
        apple_business_id: row.try_get("apple_business_id")?,
        apple_intent_id: row.try_get("apple_intent_id")?,
        apple_group_id: row.try_get("apple_group_id")?,
        apple_body: row.try_get("apple_body")?,
        delivery_deadline_seconds: row.try_get::<i32, _>("delivery_deadline_seconds")? as u32,
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn api_key_row(row: PgRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("api_key_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get::<Option<DateTime<Utc>>, _>("last_used_at")?,
        revoked_at: row.try_get::<Option<DateTime<Utc>>, _>("revoked_at")?,
        scopes: row
            .try_get::<Vec<String>, _>("scopes")?
            .iter()
            .filter_map(|s| c2m_proto::v1::ApiKeyScope::from_str_name(s))
            .collect(),
    })
}

fn template_row(row: PgRow) -> Result<Template, sqlx::Error> {
    Ok(Template {
        id: row.try_get("template_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        language: row.try_get("language")?,
        category: WhatsAppTemplateCategory::from_str_name(&row.try_get::<String, _>("category")?)
            .unwrap_or_default(),
        body: row.try_get("body")?,
        status: WhatsAppTemplateStatus::from_str_name(&row.try_get::<String, _>("status")?)
            .unwrap_or_default(),
    })
}

/// Writes one audit record inside the change's transaction.
async fn audit(
    tx: &mut PgConnection,
    account_id: &str,
    actor: Actor<'_>,
    action: &str,
    resource: &str,
    before: Option<serde_json::Value>,
    after: Option<serde_json::Value>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_events (account_id, actor, action, resource, before, after) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(account_id)
    .bind(actor.0)
    .bind(action)
    .bind(resource)
    .bind(before)
    .bind(after)
    .execute(&mut *tx)
    .await?;
    // Delivered to every Config replica's listener when (and only if) the change commits.
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(crate::watch::CHANNEL)
        .bind(format!("{account_id}\n{resource}"))
        .execute(&mut *tx)
        .await?;
    Ok(())
}

#[async_trait]
impl ConfigStore for PgConfigStore {
    async fn create_account(&self, a: &Account, actor: Actor<'_>) -> Result<(), StoreError> {
        accounts::create_account(&self.pool, a, actor).await
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        accounts::account(&self.pool, id).await
    }

    async fn update_settings(
        &self,
        id: &str,
        s: &Settings,
        actor: Actor<'_>,
    ) -> Result<Option<Account>, StoreError> {
        accounts::update_settings(&self.pool, id, s, actor).await
    }

    async fn create_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        configs::create_handoff_config(&self.pool, c, actor).await
    }

    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError> {
        configs::handoff_config(&self.pool, account_id, id).await
    }

    async fn handoff_configs(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
        channel: Option<Channel>,
        skill_id: Option<&str>,
    ) -> Result<Vec<HandoffConfig>, StoreError> {
        configs::handoff_configs(&self.pool, account_id, after, limit, channel, skill_id).await
    }

    async fn update_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<Updated, StoreError> {
        configs::update_handoff_config(&self.pool, c, actor).await
    }

    async fn delete_handoff_config(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        configs::delete_handoff_config(&self.pool, account_id, id, actor).await
    }

    async fn create_template(&self, t: &Template, actor: Actor<'_>) -> Result<(), StoreError> {
        templates::create_template(&self.pool, t, actor).await
    }

    async fn template(&self, account_id: &str, id: &str) -> Result<Option<Template>, StoreError> {
        templates::template(&self.pool, account_id, id).await
    }

    async fn templates(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError> {
        templates::templates(&self.pool, account_id, after, limit).await
    }

    async fn set_template_status(
        &self,
        account_id: &str,
        id: &str,
        status: WhatsAppTemplateStatus,
        actor: Actor<'_>,
    ) -> Result<Option<Template>, StoreError> {
        templates::set_template_status(&self.pool, account_id, id, status, actor).await
    }

    async fn delete_template(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<TemplateDeleted, StoreError> {
        templates::delete_template(&self.pool, account_id, id, actor).await
    }

    async fn create_api_key(
        &self,
        k: &ApiKey,
        hash: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        accounts::create_api_key(&self.pool, k, hash, actor).await
    }

    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        accounts::api_keys(&self.pool, account_id).await
    }

    async fn revoke_api_key(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        accounts::revoke_api_key(&self.pool, account_id, id, actor).await
    }

    async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError> {
        accounts::use_api_key(&self.pool, hash).await
    }

    async fn create_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        secret: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        webhooks::create(&self.pool, endpoint, secret, actor).await
    }

    async fn webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        webhooks::get(&self.pool, account_id, id).await
    }

    async fn webhook_endpoints(
        &self,
        account_id: &str,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        webhooks::list(&self.pool, account_id).await
    }

    async fn update_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        actor: Actor<'_>,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        webhooks::update(&self.pool, endpoint, actor).await
    }

    async fn delete_webhook_endpoint(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        webhooks::delete(&self.pool, account_id, id, actor).await
    }

    async fn rotate_webhook_secret(
        &self,
        account_id: &str,
        id: &str,
        secret: &[u8],
        keep_previous: std::time::Duration,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        webhooks::rotate(&self.pool, account_id, id, secret, keep_previous, actor).await
    }

    async fn webhook_for_test(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<LeasedWebhook>, StoreError> {
        webhooks::for_test(&self.pool, account_id, id).await
    }

    async fn lease_webhooks(
        &self,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<Vec<LeasedWebhook>, StoreError> {
        webhooks::lease(&self.pool, owner, ttl).await
    }

    async fn webhook_passed(
        &self,
        id: &str,
        owner: &str,
        position: WebhookPosition<'_>,
        delivered: bool,
    ) -> Result<bool, StoreError> {
        webhooks::passed(&self.pool, id, owner, position, delivered).await
    }

    async fn webhook_failed(
        &self,
        id: &str,
        owner: &str,
        disable_after: std::time::Duration,
    ) -> Result<bool, StoreError> {
        webhooks::failed(&self.pool, id, owner, disable_after).await
    }

    async fn record_webhook_delivery(&self, delivery: &WebhookDelivery) -> Result<(), StoreError> {
        webhooks::record(&self.pool, delivery).await
    }

    async fn webhook_deliveries(
        &self,
        id: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, WebhookDelivery)>, StoreError> {
        webhooks::deliveries(&self.pool, id, before, limit).await
    }

    async fn prune_webhook_deliveries(&self, age: std::time::Duration) -> Result<u64, StoreError> {
        webhooks::prune(&self.pool, age).await
    }

    async fn audit(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        audit::list(&self.pool, account_id, start, end, after, limit).await
    }

    async fn template_named(
        &self,
        account_id: &str,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>, StoreError> {
        templates::template_named(&self.pool, account_id, name, language).await
    }
}
