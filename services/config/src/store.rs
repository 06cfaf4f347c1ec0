//! Config's storage, behind a trait so the embedded backend can slot in later.

use async_trait::async_trait;
use c2m_proto::v1::{Channel, WhatsAppTemplateCategory, WhatsAppTemplateStatus};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};

use crate::model::{Account, ApiKey, HandoffConfig, Settings, Template};

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

const TEMPLATE_COLUMNS: &str = "template_id, account_id, name, language, category, body, status";

fn template(row: PgRow) -> Result<Template, sqlx::Error> {
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

fn account_json(a: &Account) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.Account", &a.to_wire())
}

fn config_json(c: &HandoffConfig) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.HandoffConfig", &c.to_wire())
}

fn template_json(t: &Template) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.WhatsAppTemplate", &t.to_wire())
}

fn messages_json(c: &HandoffConfig) -> serde_json::Value {
    serde_json::Value::Object(
        c.messages
            .iter()
            .map(|(channel, text)| (channel.as_str_name().to_owned(), text.clone().into()))
            .collect(),
    )
}

#[async_trait]
impl ConfigStore for PgConfigStore {
    async fn create_account(&self, a: &Account, actor: Actor<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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
        .execute(&mut *tx)
        .await
        .map_err(conflict("account"))?;
        audit(
            &mut tx,
            &a.id,
            actor,
            "CreateAccount",
            &format!("accounts/{}", a.id),
            None,
            Some(account_json(a)),
        )
        .await?;
        tx.commit().await?;
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

    async fn update_settings(
        &self,
        id: &str,
        s: &Settings,
        actor: Actor<'_>,
    ) -> Result<Option<Account>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(account)
        .transpose()?
        else {
            return Ok(None);
        };
        let after = sqlx::query(sql(format!(
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
        .fetch_one(&mut *tx)
        .await
        .and_then(account)?;
        audit(
            &mut tx,
            id,
            actor,
            "UpdateAccountSettings",
            &format!("accounts/{id}"),
            Some(account_json(&before)),
            Some(account_json(&after)),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(after))
    }

    async fn create_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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
        .bind(messages_json(c))
        .bind(&c.whatsapp_template_id)
        .bind(&c.apple_business_id)
        .bind(&c.apple_intent_id)
        .bind(&c.apple_group_id)
        .bind(c.delivery_deadline_seconds as i32)
        .bind(c.version)
        .bind(c.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(conflict("handoff configuration (id or name)"))?;
        audit(
            &mut tx,
            &c.account_id,
            actor,
            "CreateHandoffConfig",
            &format!("handoff_configs/{}", c.id),
            None,
            Some(config_json(c)),
        )
        .await?;
        tx.commit().await?;
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

    async fn handoff_configs(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
        channel: Option<Channel>,
        skill_id: Option<&str>,
    ) -> Result<Vec<HandoffConfig>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
             WHERE account_id = $1 AND handoff_config_id > $2 \
             AND ($3::text IS NULL OR $3 = ANY(channel_priority)) \
             AND ($4::text IS NULL OR skill_id = $4) \
             ORDER BY handoff_config_id LIMIT $5"
        )))
        .bind(account_id)
        .bind(after)
        .bind(channel.map(|c| c.as_str_name()))
        .bind(skill_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(handoff_config)
            .collect::<Result<_, _>>()?)
    }

    async fn update_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<Updated, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
             WHERE account_id = $1 AND handoff_config_id = $2 FOR UPDATE"
        )))
        .bind(&c.account_id)
        .bind(&c.id)
        .fetch_optional(&mut *tx)
        .await?
        .map(handoff_config)
        .transpose()?
        else {
            return Ok(Updated::Missing);
        };
        if before.version != c.version {
            return Ok(Updated::Stale(before.version));
        }
        let after = sqlx::query(sql(format!(
            "UPDATE handoff_configs SET name = $3, skill_id = $4, channel_priority = $5, messages = $6, \
             whatsapp_template_id = $7, apple_business_id = $8, apple_intent_id = $9, apple_group_id = $10, \
             delivery_deadline_seconds = $11, version = version + 1, updated_at = now() \
             WHERE account_id = $1 AND handoff_config_id = $2 RETURNING {CONFIG_COLUMNS}"
        )))
        .bind(&c.account_id)
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.skill_id)
        .bind(names(&c.channel_priority))
        .bind(messages_json(c))
        .bind(&c.whatsapp_template_id)
        .bind(&c.apple_business_id)
        .bind(&c.apple_intent_id)
        .bind(&c.apple_group_id)
        .bind(c.delivery_deadline_seconds as i32)
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict("handoff configuration name"))
        .and_then(|row| handoff_config(row).map_err(StoreError::Db))?;
        audit(
            &mut tx,
            &c.account_id,
            actor,
            "UpdateHandoffConfig",
            &format!("handoff_configs/{}", c.id),
            Some(config_json(&before)),
            Some(config_json(&after)),
        )
        .await?;
        tx.commit().await?;
        Ok(Updated::Done(Box::new(after)))
    }

    async fn delete_handoff_config(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = sqlx::query(sql(format!(
            "DELETE FROM handoff_configs WHERE account_id = $1 AND handoff_config_id = $2 RETURNING {CONFIG_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(handoff_config)
        .transpose()?
        else {
            return Ok(false);
        };
        audit(
            &mut tx,
            account_id,
            actor,
            "DeleteHandoffConfig",
            &format!("handoff_configs/{id}"),
            Some(config_json(&before)),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn create_template(&self, t: &Template, actor: Actor<'_>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO whatsapp_templates (template_id, account_id, name, language, category, body, status) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&t.id)
        .bind(&t.account_id)
        .bind(&t.name)
        .bind(&t.language)
        .bind(t.category.as_str_name())
        .bind(&t.body)
        .bind(t.status.as_str_name())
        .execute(&mut *tx)
        .await
        .map_err(conflict("template (id, or name and language)"))?;
        audit(
            &mut tx,
            &t.account_id,
            actor,
            "CreateWhatsAppTemplate",
            &format!("whatsapp_templates/{}", t.id),
            None,
            Some(template_json(t)),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn template(&self, account_id: &str, id: &str) -> Result<Option<Template>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(template).transpose()?)
    }

    async fn templates(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id > $2 \
             ORDER BY template_id LIMIT $3"
        )))
        .bind(account_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(template).collect::<Result<_, _>>()?)
    }

    async fn set_template_status(
        &self,
        account_id: &str,
        id: &str,
        status: WhatsAppTemplateStatus,
        actor: Actor<'_>,
    ) -> Result<Option<Template>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2 FOR UPDATE"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(template)
        .transpose()?
        else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE whatsapp_templates SET status = $3 WHERE account_id = $1 AND template_id = $2",
        )
        .bind(account_id)
        .bind(id)
        .bind(status.as_str_name())
        .execute(&mut *tx)
        .await?;
        let after = Template {
            status,
            ..before.clone()
        };
        audit(
            &mut tx,
            account_id,
            actor,
            "UpdateWhatsAppTemplateStatus",
            &format!("whatsapp_templates/{id}"),
            Some(template_json(&before)),
            Some(template_json(&after)),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(after))
    }

    async fn delete_template(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<TemplateDeleted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT handoff_config_id FROM handoff_configs \
             WHERE account_id = $1 AND whatsapp_template_id = $2 ORDER BY 1 FOR SHARE",
        )
        .bind(account_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Ok(TemplateDeleted::InUse(users));
        }
        let Some(before) = sqlx::query(sql(format!(
            "DELETE FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2 RETURNING {TEMPLATE_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(template)
        .transpose()?
        else {
            return Ok(TemplateDeleted::Missing);
        };
        audit(
            &mut tx,
            account_id,
            actor,
            "DeleteWhatsAppTemplate",
            &format!("whatsapp_templates/{id}"),
            Some(template_json(&before)),
            None,
        )
        .await?;
        tx.commit().await?;
        Ok(TemplateDeleted::Done)
    }

    async fn create_api_key(
        &self,
        k: &ApiKey,
        hash: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
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
        .execute(&mut *tx)
        .await
        .map_err(conflict("api key"))?;
        let after = c2m_proto::to_json("c2m.v1.ApiKey", &k.to_wire());
        audit(
            &mut tx,
            &k.account_id,
            actor,
            "CreateApiKey",
            &format!("api_keys/{}", k.id),
            None,
            Some(after),
        )
        .await?;
        tx.commit().await?;
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

    async fn revoke_api_key(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(sql(format!(
            "UPDATE api_keys SET revoked_at = now() \
             WHERE account_id = $1 AND api_key_id = $2 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .map(api_key)
        .transpose()?;
        let Some(key) = revoked else {
            return Ok(false);
        };
        let after = c2m_proto::to_json("c2m.v1.ApiKey", &key.to_wire());
        audit(
            &mut tx,
            account_id,
            actor,
            "RevokeApiKey",
            &format!("api_keys/{id}"),
            None,
            Some(after),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
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

    async fn audit(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT audit_event_id, account_id, actor, action, resource, before, after, at FROM audit_events \
             WHERE account_id = $1 AND at >= $2 AND at < $3 AND audit_event_id > $4 \
             ORDER BY audit_event_id LIMIT $5",
        )
        .bind(account_id)
        .bind(start)
        .bind(end)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(AuditRecord {
                    id: row.try_get("audit_event_id")?,
                    account_id: row.try_get("account_id")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    resource: row.try_get("resource")?,
                    before: row.try_get("before")?,
                    after: row.try_get("after")?,
                    at: row.try_get("at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::Db)
    }
}
