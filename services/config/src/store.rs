//! Config's storage, behind a trait so the embedded backend can slot in later.

use async_trait::async_trait;
use c2m_proto::v1::Channel;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row, postgres::PgRow};

use crate::model::{Account, ApiKey, HandoffConfig, Settings};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (the id or name is taken).
    #[error("{0} already exists")]
    Conflict(&'static str),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

#[async_trait]
pub trait ConfigStore: Send + Sync + 'static {
    async fn create_account(&self, account: &Account) -> Result<(), StoreError>;
    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError>;
    async fn update_settings(
        &self,
        id: &str,
        settings: &Settings,
    ) -> Result<Option<Account>, StoreError>;
    async fn create_handoff_config(&self, config: &HandoffConfig) -> Result<(), StoreError>;
    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError>;
    async fn create_api_key(&self, key: &ApiKey, hash: &[u8]) -> Result<(), StoreError>;
    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes a live key; `false` when there is no such live key.
    async fn revoke_api_key(&self, account_id: &str, id: &str) -> Result<bool, StoreError>;
    /// The live key with this hash, marking it used.
    async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError>;
}

#[derive(Debug, Clone)]
pub struct PgConfigStore {
    pool: PgPool,
}

impl PgConfigStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn names(channels: &[Channel]) -> Vec<&'static str> {
    channels.iter().map(|c| c.as_str_name()).collect()
}

fn channels(names: Vec<String>) -> Vec<Channel> {
    names
        .iter()
        .filter_map(|n| Channel::from_str_name(n))
        .collect()
}

fn conflict(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Db(e),
    }
}

const ACCOUNT_COLUMNS: &str = "account_id, display_name, deflection_enabled, landline_check_enabled, \
    rate_limit_per_second, enabled_channels, reply_lookback_hours, created_at";

fn account(row: PgRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: row.try_get("account_id")?,
        display_name: row.try_get("display_name")?,
        settings: Settings {
            deflection_enabled: row.try_get("deflection_enabled")?,
            landline_check_enabled: row.try_get("landline_check_enabled")?,
            rate_limit_per_second: row.try_get::<i32, _>("rate_limit_per_second")? as u32,
            enabled_channels: channels(row.try_get("enabled_channels")?),
            reply_lookback_hours: row.try_get::<i32, _>("reply_lookback_hours")? as u32,
        },
        created_at: row.try_get("created_at")?,
    })
}

const CONFIG_COLUMNS: &str = "handoff_config_id, account_id, name, skill_id, channel_priority, messages, \
    whatsapp_template_id, apple_business_id, apple_intent_id, apple_group_id, \
    delivery_deadline_seconds, version, updated_at";

fn handoff_config(row: PgRow) -> Result<HandoffConfig, sqlx::Error> {
    let messages: serde_json::Value = row.try_get("messages")?;
    let messages = messages
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((Channel::from_str_name(k)?, v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
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
        delivery_deadline_seconds: row.try_get::<i32, _>("delivery_deadline_seconds")? as u32,
        version: row.try_get("version")?,
        updated_at: row.try_get("updated_at")?,
    })
}

const KEY_COLUMNS: &str =
    "api_key_id, account_id, name, prefix, created_at, last_used_at, revoked_at";

fn api_key(row: PgRow) -> Result<ApiKey, sqlx::Error> {
    Ok(ApiKey {
        id: row.try_get("api_key_id")?,
        account_id: row.try_get("account_id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_at: row.try_get("created_at")?,
        last_used_at: row.try_get::<Option<DateTime<Utc>>, _>("last_used_at")?,
        revoked_at: row.try_get::<Option<DateTime<Utc>>, _>("revoked_at")?,
    })
}

fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

#[async_trait]
impl ConfigStore for PgConfigStore {
    async fn create_account(&self, a: &Account) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO accounts (account_id, display_name, deflection_enabled, landline_check_enabled, \
             rate_limit_per_second, enabled_channels, reply_lookback_hours, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&a.id)
        .bind(&a.display_name)
        .bind(a.settings.deflection_enabled)
        .bind(a.settings.landline_check_enabled)
        .bind(a.settings.rate_limit_per_second as i32)
        .bind(names(&a.settings.enabled_channels))
        .bind(a.settings.reply_lookback_hours as i32)
        .bind(a.created_at)
        .execute(&self.pool)
        .await
        .map_err(conflict("account"))?;
        Ok(())
    }

    async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(account).transpose()?)
    }

    async fn update_settings(&self, id: &str, s: &Settings) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(sql(format!(
            "UPDATE accounts SET deflection_enabled = $2, landline_check_enabled = $3, \
             rate_limit_per_second = $4, enabled_channels = $5, reply_lookback_hours = $6 \
             WHERE account_id = $1 RETURNING {ACCOUNT_COLUMNS}"
        )))
        .bind(id)
        .bind(s.deflection_enabled)
        .bind(s.landline_check_enabled)
        .bind(s.rate_limit_per_second as i32)
        .bind(names(&s.enabled_channels))
        .bind(s.reply_lookback_hours as i32)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(account).transpose()?)
    }

    async fn create_handoff_config(&self, c: &HandoffConfig) -> Result<(), StoreError> {
        let messages: serde_json::Map<String, serde_json::Value> = c
            .messages
            .iter()
            .map(|(channel, text)| (channel.as_str_name().to_owned(), text.clone().into()))
            .collect();
        sqlx::query(
            "INSERT INTO handoff_configs (handoff_config_id, account_id, name, skill_id, channel_priority, \
             messages, whatsapp_template_id, apple_business_id, apple_intent_id, apple_group_id, \
             delivery_deadline_seconds, version, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(&c.id)
        .bind(&c.account_id)
        .bind(&c.name)
        .bind(&c.skill_id)
        .bind(names(&c.channel_priority))
        .bind(serde_json::Value::Object(messages))
        .bind(&c.whatsapp_template_id)
        .bind(&c.apple_business_id)
        .bind(&c.apple_intent_id)
        .bind(&c.apple_group_id)
        .bind(c.delivery_deadline_seconds as i32)
        .bind(c.version)
        .bind(c.updated_at)
        .execute(&self.pool)
        .await
        .map_err(conflict("handoff configuration"))?;
        Ok(())
    }

    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs WHERE account_id = $1 AND handoff_config_id = $2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(handoff_config).transpose()?)
    }

    async fn create_api_key(&self, k: &ApiKey, hash: &[u8]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO api_keys (api_key_id, account_id, name, prefix, key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&k.id)
        .bind(&k.account_id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(hash)
        .bind(k.created_at)
        .execute(&self.pool)
        .await
        .map_err(conflict("api key"))?;
        Ok(())
    }

    async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at"
        )))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(api_key).collect::<Result<_, _>>()?)
    }

    async fn revoke_api_key(&self, account_id: &str, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = now() \
             WHERE account_id = $1 AND api_key_id = $2 AND revoked_at IS NULL",
        )
        .bind(account_id)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(sql(format!(
            "UPDATE api_keys SET last_used_at = now() \
             WHERE key_hash = $1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        )))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(api_key).transpose()?)
    }
}
