//! [`GatewayStore`] on SQLite: the embedded default's messages, credentials and inbox, one file,
//! the same answers as PostgreSQL's (`store::tests`). Times are integer microseconds; a report's
//! change takes the file's write lock when it begins (`BEGIN IMMEDIATE`).

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, DevicePlatform, FunnelStage, LineType, Provider};
use c2m_runtime::health::Probe;
use c2m_storage::outbox::{self, SqliteOutbox};
use c2m_storage::sqlite::{micros, now, time};
use chrono::{DateTime, Utc};
use sqlx::{Row, Sqlite, SqlitePool, Transaction, migrate::Migrator, sqlite::SqliteRow};

use super::{GatewayStore, GatewayTx, Outbound, StageChange};
use crate::devices::Device;

/// The SQLite schema's migrations (`migrations-sqlite/`).
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations-sqlite");

const COLUMNS: &str = "message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
    provider_message_id, stage, error_code, error_message, sent_at, updated_at, conversation_id, \
    delivered_at, read_at, sending_until, claimed_by";

fn outbound(row: &SqliteRow) -> Result<Outbound, sqlx::Error> {
    let at = |column: &str| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(column)?.map(time))
    };
    Ok(Outbound {
        message_id: row.try_get("message_id")?,
        account_id: row.try_get("account_id")?,
        channel: Channel::from_str_name(row.try_get("channel")?).unwrap_or_default(),
        handoff_id: row.try_get("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        skill_id: row.try_get("skill_id")?,
        conversation_id: row.try_get("conversation_id")?,
        provider_message_id: row.try_get("provider_message_id")?,
        stage: FunnelStage::from_str_name(row.try_get("stage")?).unwrap_or_default(),
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        sent_at: time(row.try_get("sent_at")?),
        updated_at: time(row.try_get("updated_at")?),
        delivered_at: at("delivered_at")?,
        read_at: at("read_at")?,
        sending_until: at("sending_until")?,
        claimed_by: row.try_get("claimed_by")?,
    })
}

#[derive(Debug, Clone)]
pub(crate) struct SqliteGatewayStore {
    pool: SqlitePool,
}

impl SqliteGatewayStore {
    /// The store over `pool`, its migrations applied.
    pub async fn new(pool: SqlitePool) -> Result<Self, sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The outboxes kept in this file (funnel events, conversation stages), for their relays.
    pub fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone())
    }
}

#[async_trait]
impl GatewayStore for SqliteGatewayStore {
    fn probe(&self) -> Arc<dyn Probe> {
        c2m_storage::sqlite::probe(self.pool.clone(), "gateway")
    }

    async fn begin(&self) -> Result<Box<dyn GatewayTx>, sqlx::Error> {
        Ok(Box::new(SqliteTx(
            self.pool.begin_with("BEGIN IMMEDIATE").await?,
        )))
    }

    async fn messages(&self, ids: &[String]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM outbound_messages WHERE message_id = ?1"
            )))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
            found.push(row.as_ref().map(outbound).transpose()?);
        }
        Ok(found)
    }

    async fn claim(&self, messages: &[Arc<Outbound>]) -> Result<Vec<String>, sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut claimed = Vec::new();
        for m in messages {
            let token: Option<String> = sqlx::query_scalar(
                "INSERT INTO outbound_messages (message_id, account_id, channel, handoff_id, \
                     handoff_config_id, skill_id, stage, sent_at, updated_at, conversation_id, \
                     sending_until, claimed_by) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'FUNNEL_STAGE_SENT', ?7, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (message_id) DO NOTHING RETURNING claimed_by",
            )
            .bind(&m.message_id)
            .bind(&m.account_id)
            .bind(m.channel.as_str_name())
            .bind(&m.handoff_id)
            .bind(&m.handoff_config_id)
            .bind(&m.skill_id)
            .bind(micros(m.sent_at))
            .bind(&m.conversation_id)
            .bind(m.sending_until.map(micros))
            .bind(&m.claimed_by)
            .fetch_optional(&mut *tx)
            .await?;
            claimed.extend(token);
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn record(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Outbound>, sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut recorded = Vec::new();
        for m in messages {
            let row = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE outbound_messages SET \
                     stage = CASE WHEN stage = 'FUNNEL_STAGE_SENT' \
                         AND provider_message_id IS NULL THEN ?3 ELSE stage END, \
                     provider_message_id = coalesce(provider_message_id, ?2), \
                     error_code = coalesce(error_code, ?4), \
                     error_message = coalesce(error_message, ?5), \
                     updated_at = ?6, sending_until = NULL \
                 WHERE message_id = ?1 RETURNING {COLUMNS}"
            )))
            .bind(&m.message_id)
            .bind(&m.provider_message_id)
            .bind(m.stage.as_str_name())
            .bind(&m.error_code)
            .bind(&m.error_message)
            .bind(now())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = row {
                recorded.push(outbound(&row)?);
            }
        }
        tx.commit().await?;
        Ok(recorded)
    }

    async fn take_back(
        &self,
        message_id: &str,
        claimed_by: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM outbound_messages WHERE message_id = ?1 AND claimed_by = ?2 \
             AND provider_message_id IS NULL",
        )
        .bind(message_id)
        .bind(claimed_by)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn put_credentials(
        &self,
        account_id: &str,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO provider_credentials (account_id, provider, ciphertext, updated_at) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (account_id, provider) DO UPDATE \
             SET ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
        )
        .bind(account_id)
        .bind(provider.as_str_name())
        .bind(sealed)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<bool, sqlx::Error> {
        let done =
            sqlx::query("DELETE FROM provider_credentials WHERE account_id = ?1 AND provider = ?2")
                .bind(account_id)
                .bind(provider.as_str_name())
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<Option<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT ciphertext FROM provider_credentials WHERE account_id = ?1 AND provider = ?2",
        )
        .bind(account_id)
        .bind(provider.as_str_name())
        .fetch_optional(&self.pool)
        .await
    }

    async fn register_device(
        &self,
        account_id: &str,
        consumer_id: &str,
        platform: DevicePlatform,
        token: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO devices (account_id, consumer_id, platform, device_token, registered_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (account_id, device_token) DO UPDATE \
             SET consumer_id = excluded.consumer_id, platform = excluded.platform, \
                 registered_at = excluded.registered_at",
        )
        .bind(account_id)
        .bind(consumer_id)
        .bind(platform.as_str_name())
        .bind(token)
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn remove_device(
        &self,
        account_id: &str,
        consumer_id: &str,
        token: &str,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "DELETE FROM devices WHERE account_id = ?1 AND consumer_id = ?2 AND device_token = ?3",
        )
        .bind(account_id)
        .bind(consumer_id)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn forget_device(&self, account_id: &str, token: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM devices WHERE account_id = ?1 AND device_token = ?2")
            .bind(account_id)
            .bind(token)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn devices(
        &self,
        account_id: &str,
        consumer_id: &str,
    ) -> Result<Vec<Device>, sqlx::Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT platform, device_token FROM devices \
             WHERE account_id = ?1 AND consumer_id = ?2 ORDER BY registered_at DESC LIMIT 20",
        )
        .bind(account_id)
        .bind(consumer_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(platform, token)| Device {
                platform: DevicePlatform::from_str_name(&platform).unwrap_or_default(),
                token,
            })
            .collect())
    }

    async fn last_inbound(
        &self,
        account_id: &str,
        phone: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT last_inbound_at FROM whatsapp_windows WHERE account_id = ?1 AND phone = ?2",
        )
        .bind(account_id)
        .bind(phone)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at.map(time))
    }

    async fn inbound(
        &self,
        account_id: &str,
        phone: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO whatsapp_windows (account_id, phone, last_inbound_at) \
             VALUES (?1, ?2, ?3) \
             ON CONFLICT (account_id, phone) DO UPDATE \
             SET last_inbound_at = max(last_inbound_at, excluded.last_inbound_at)",
        )
        .bind(account_id)
        .bind(phone)
        .bind(micros(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn line_type(
        &self,
        phone: &str,
    ) -> Result<Option<(LineType, DateTime<Utc>)>, sqlx::Error> {
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT line_type, looked_up_at FROM number_lookups WHERE phone = ?1")
                .bind(phone)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.and_then(|(kind, at)| Some((LineType::from_str_name(&kind)?, time(at)))))
    }

    async fn remember_line_type(&self, phone: &str, kind: LineType) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO number_lookups (phone, line_type, looked_up_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (phone) DO UPDATE \
             SET line_type = excluded.line_type, looked_up_at = excluded.looked_up_at",
        )
        .bind(phone)
        .bind(kind.as_str_name())
        .bind(now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

struct SqliteTx(Transaction<'static, Sqlite>);

#[async_trait]
impl GatewayTx for SqliteTx {
    async fn store(&mut self, dedup_key: &str, body: &[u8]) -> Result<bool, sqlx::Error> {
        let provider = dedup_key.split(':').next().unwrap_or_default();
        sqlx::query(
            "INSERT INTO webhook_inbox (provider, dedup_key, body, received_at) \
             VALUES (?3, ?1, ?2, ?4) ON CONFLICT (dedup_key) DO NOTHING",
        )
        .bind(dedup_key)
        .bind(body)
        .bind(provider)
        .bind(now())
        .execute(&mut *self.0)
        .await?;
        let processed: Option<i64> =
            sqlx::query_scalar("SELECT processed_at FROM webhook_inbox WHERE dedup_key = ?1")
                .bind(dedup_key)
                .fetch_one(&mut *self.0)
                .await?;
        Ok(processed.is_none())
    }

    async fn processed(&mut self, dedup_key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE webhook_inbox SET processed_at = ?2 WHERE dedup_key = ?1")
            .bind(dedup_key)
            .bind(now())
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn reported(
        &mut self,
        account_id: &str,
        channel: Channel,
        provider_message_id: &str,
        message_id: Option<&str>,
    ) -> Result<Option<Outbound>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM outbound_messages WHERE account_id = ?1 \
             AND (message_id = ?4 OR channel = ?2 AND provider_message_id = ?3)"
        )))
        .bind(account_id)
        .bind(channel.as_str_name())
        .bind(provider_message_id)
        .bind(message_id)
        .fetch_optional(&mut *self.0)
        .await?
        .as_ref()
        .map(outbound)
        .transpose()
    }

    async fn change_stage(&mut self, c: &StageChange<'_>) -> Result<(), sqlx::Error> {
        let now = now();
        sqlx::query(
            "UPDATE outbound_messages SET stage = ?2, error_code = coalesce(?3, error_code), \
             provider_message_id = coalesce(provider_message_id, ?4), updated_at = ?7, \
             delivered_at = CASE WHEN ?5 THEN ?7 ELSE delivered_at END, \
             read_at = CASE WHEN ?6 THEN ?7 ELSE read_at END \
             WHERE message_id = ?1",
        )
        .bind(c.message_id)
        .bind(c.stage.as_str_name())
        .bind(c.error_code)
        .bind(c.provider_message_id)
        .bind(c.delivered)
        .bind(c.read)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn enqueue_stages(&mut self, stages: &[pb::MessageStage]) -> Result<(), sqlx::Error> {
        for stage in stages {
            sqlx::query("INSERT INTO conversation_outbox (payload) VALUES (?1)")
                .bind(prost::Message::encode_to_vec(stage))
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error> {
        outbox::enqueue_sqlite(&mut self.0, events).await
    }

    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
        self.0.commit().await
    }
}
