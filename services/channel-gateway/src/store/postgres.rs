//! [`GatewayStore`] on PostgreSQL: the gateway's schema. The batched statements take many
//! sends' rows in one round trip (the callers batch them: `c2m_storage::batch`).

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, DevicePlatform, FunnelStage, LineType, Provider};
use c2m_runtime::health::Probe;
use c2m_storage::{ServiceDb, outbox};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Row, Transaction, postgres::PgRow};

use super::{GatewayStore, GatewayTx, Outbound, StageChange};
use crate::devices::Device;

/// Every column of a message, as read back.
const COLUMNS: &str = "message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
    provider_message_id, stage, error_code, error_message, sent_at, updated_at, conversation_id, \
    delivered_at, read_at, sending_until, claimed_by";

fn outbound(row: &PgRow) -> Result<Outbound, sqlx::Error> {
    Ok(Outbound {
        message_id: row.try_get("message_id")?,
        account_id: row.try_get("account_id")?,
        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?).unwrap_or_default(),
        handoff_id: row.try_get("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        skill_id: row.try_get("skill_id")?,
        conversation_id: row.try_get("conversation_id")?,
        provider_message_id: row.try_get("provider_message_id")?,
        stage: FunnelStage::from_str_name(&row.try_get::<String, _>("stage")?).unwrap_or_default(),
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        sent_at: row.try_get("sent_at")?,
        updated_at: row.try_get("updated_at")?,
        delivered_at: row.try_get("delivered_at")?,
        read_at: row.try_get("read_at")?,
        sending_until: row.try_get("sending_until")?,
        claimed_by: row.try_get("claimed_by")?,
    })
}

#[derive(Debug, Clone)]
pub(crate) struct PgGatewayStore {
    db: ServiceDb,
}

impl PgGatewayStore {
    pub fn new(db: ServiceDb) -> Self {
        Self { db }
    }
}

#[async_trait]
impl GatewayStore for PgGatewayStore {
    fn probe(&self) -> Arc<dyn Probe> {
        self.db.probe()
    }

    async fn begin(&self) -> Result<Box<dyn GatewayTx>, sqlx::Error> {
        Ok(Box::new(PgTx(self.db.pool().begin().await?)))
    }

    async fn messages(&self, ids: &[String]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        // LATERAL with OFFSET 0 is not flattened into a join: each id is one probe of the
        // primary key, whatever the generic plan thought of the table's size.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT q.n, found.* FROM unnest($1::text[]) WITH ORDINALITY AS q(message_id, n) \
             CROSS JOIN LATERAL (SELECT {COLUMNS} FROM outbound_messages m \
                 WHERE m.message_id = q.message_id OFFSET 0) AS found"
        )))
        .bind(ids)
        .fetch_all(self.db.batch_pool())
        .await?;
        let mut found = vec![None; ids.len()];
        for row in rows {
            let n: i64 = row.try_get("n")?;
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| found.get_mut(i)) {
                *slot = Some(outbound(&row)?);
            }
        }
        Ok(found)
    }

    async fn claim(&self, messages: &[Arc<Outbound>]) -> Result<Vec<String>, sqlx::Error> {
        let text = |f: fn(&Outbound) -> &str| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        sqlx::query_scalar(
            "INSERT INTO outbound_messages (message_id, account_id, channel, handoff_id, \
                 handoff_config_id, skill_id, stage, sent_at, updated_at, conversation_id, \
                 sending_until, claimed_by) \
             SELECT message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
                 'FUNNEL_STAGE_SENT', sent_at, sent_at, conversation_id, sending_until, claimed_by \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::timestamptz[], $8::text[], $9::timestamptz[], $10::text[]) \
                 AS m(message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
                     sent_at, conversation_id, sending_until, claimed_by) \
             ON CONFLICT (message_id) DO NOTHING RETURNING claimed_by",
        )
        .bind(text(|m| &m.message_id))
        .bind(text(|m| &m.account_id))
        .bind(text(|m| m.channel.as_str_name()))
        .bind(text(|m| &m.handoff_id))
        .bind(text(|m| &m.handoff_config_id))
        .bind(text(|m| &m.skill_id))
        .bind(messages.iter().map(|m| m.sent_at).collect::<Vec<_>>())
        .bind(text(|m| &m.conversation_id))
        .bind(messages.iter().map(|m| m.sending_until).collect::<Vec<_>>())
        .bind(
            messages
                .iter()
                .map(|m| m.claimed_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(self.db.batch_pool())
        .await
    }

    /// The rows are found by `= ANY` on the primary key, and the statement is planned for each
    /// batch rather than kept prepared: a generic plan made while the table was small is a scan
    /// of the whole table, and it stays one as the table grows unless the table is analyzed (a
    /// ten-minute soak at 580 handoffs/s spent most of PostgreSQL's CPU scanning it). A plan
    /// made for the batch at hand sees the table's size now.
    async fn record(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Outbound>, sqlx::Error> {
        let text = |f: fn(&Outbound) -> &str| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        let optional =
            |f: fn(&Outbound) -> Option<&str>| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbound_messages m SET \
                 stage = CASE WHEN m.stage = 'FUNNEL_STAGE_SENT' AND m.provider_message_id IS NULL \
                     THEN u.stage ELSE m.stage END, \
                 provider_message_id = coalesce(m.provider_message_id, u.provider_message_id), \
                 error_code = coalesce(m.error_code, u.error_code), \
                 error_message = coalesce(m.error_message, u.error_message), \
                 updated_at = now(), sending_until = NULL \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 AS u(message_id, provider_message_id, stage, error_code, error_message) \
             WHERE m.message_id = ANY($1::text[]) AND m.message_id = u.message_id \
             RETURNING {}",
            COLUMNS
                .split(", ")
                .map(|c| format!("m.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(text(|m| &m.message_id))
        .bind(optional(|m| m.provider_message_id.as_deref()))
        .bind(text(|m| m.stage.as_str_name()))
        .bind(optional(|m| m.error_code.as_deref()))
        .bind(optional(|m| m.error_message.as_deref()))
        .persistent(false)
        .fetch_all(self.db.batch_pool())
        .await?
        .iter()
        .map(outbound)
        .collect()
    }

    async fn take_back(
        &self,
        message_id: &str,
        claimed_by: Option<&str>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "DELETE FROM outbound_messages WHERE message_id = $1 AND claimed_by = $2 \
             AND provider_message_id IS NULL",
        )
        .bind(message_id)
        .bind(claimed_by)
        .execute(self.db.pool())
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
            "INSERT INTO provider_credentials (account_id, provider, ciphertext) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (account_id, provider) DO UPDATE SET ciphertext = $3, updated_at = now()",
        )
        .bind(account_id)
        .bind(provider.as_str_name())
        .bind(sealed)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    async fn delete_credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<bool, sqlx::Error> {
        let done =
            sqlx::query("DELETE FROM provider_credentials WHERE account_id = $1 AND provider = $2")
                .bind(account_id)
                .bind(provider.as_str_name())
                .execute(self.db.pool())
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<Option<Vec<u8>>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT ciphertext FROM provider_credentials WHERE account_id = $1 AND provider = $2",
        )
        .bind(account_id)
        .bind(provider.as_str_name())
        .fetch_optional(self.db.pool())
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
            "INSERT INTO devices (account_id, consumer_id, platform, device_token) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (account_id, device_token) DO UPDATE \
             SET consumer_id = EXCLUDED.consumer_id, platform = EXCLUDED.platform, \
                 registered_at = now()",
        )
        .bind(account_id)
        .bind(consumer_id)
        .bind(platform.as_str_name())
        .bind(token)
        .execute(self.db.pool())
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
            "DELETE FROM devices WHERE account_id = $1 AND consumer_id = $2 AND device_token = $3",
        )
        .bind(account_id)
        .bind(consumer_id)
        .bind(token)
        .execute(self.db.pool())
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn forget_device(&self, account_id: &str, token: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM devices WHERE account_id = $1 AND device_token = $2")
            .bind(account_id)
            .bind(token)
            .execute(self.db.pool())
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
             WHERE account_id = $1 AND consumer_id = $2 ORDER BY registered_at DESC LIMIT 20",
        )
        .bind(account_id)
        .bind(consumer_id)
        .fetch_all(self.db.pool())
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
        sqlx::query_scalar(
            "SELECT last_inbound_at FROM whatsapp_windows WHERE account_id = $1 AND phone = $2",
        )
        .bind(account_id)
        .bind(phone)
        .fetch_optional(self.db.pool())
        .await
    }

    async fn inbound(
        &self,
        account_id: &str,
        phone: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO whatsapp_windows (account_id, phone, last_inbound_at) VALUES ($1, $2, $3) \
             ON CONFLICT (account_id, phone) DO UPDATE \
             SET last_inbound_at = GREATEST(whatsapp_windows.last_inbound_at, EXCLUDED.last_inbound_at)",
        )
        .bind(account_id)
        .bind(phone)
        .bind(at)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }

    async fn line_type(
        &self,
        phone: &str,
    ) -> Result<Option<(LineType, DateTime<Utc>)>, sqlx::Error> {
        let row: Option<(String, DateTime<Utc>)> =
            sqlx::query_as("SELECT line_type, looked_up_at FROM number_lookups WHERE phone = $1")
                .bind(phone)
                .fetch_optional(self.db.pool())
                .await?;
        Ok(row.and_then(|(kind, at)| Some((LineType::from_str_name(&kind)?, at))))
    }

    async fn remember_line_type(&self, phone: &str, kind: LineType) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO number_lookups (phone, line_type) VALUES ($1, $2) \
             ON CONFLICT (phone) DO UPDATE SET line_type = $2, looked_up_at = now()",
        )
        .bind(phone)
        .bind(kind.as_str_name())
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}

struct PgTx(Transaction<'static, Postgres>);

#[async_trait]
impl GatewayTx for PgTx {
    async fn store(&mut self, dedup_key: &str, body: &[u8]) -> Result<bool, sqlx::Error> {
        let provider = dedup_key.split(':').next().unwrap_or_default();
        sqlx::query(
            "INSERT INTO webhook_inbox (provider, dedup_key, body) VALUES ($3, $1, $2) \
             ON CONFLICT (dedup_key) DO NOTHING",
        )
        .bind(dedup_key)
        .bind(body)
        .bind(provider)
        .execute(&mut *self.0)
        .await?;
        let processed: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT processed_at FROM webhook_inbox WHERE dedup_key = $1 FOR UPDATE",
        )
        .bind(dedup_key)
        .fetch_one(&mut *self.0)
        .await?;
        Ok(processed.is_none())
    }

    async fn processed(&mut self, dedup_key: &str) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE webhook_inbox SET processed_at = now() WHERE dedup_key = $1")
            .bind(dedup_key)
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
            "SELECT {COLUMNS} FROM outbound_messages WHERE account_id = $1 \
             AND (message_id = $4 OR channel = $2 AND provider_message_id = $3) FOR UPDATE"
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
        sqlx::query(
            "UPDATE outbound_messages SET stage = $2, error_code = coalesce($3, error_code), \
             provider_message_id = coalesce(provider_message_id, $4), updated_at = now(), \
             delivered_at = CASE WHEN $5 THEN now() ELSE delivered_at END, \
             read_at = CASE WHEN $6 THEN now() ELSE read_at END \
             WHERE message_id = $1",
        )
        .bind(c.message_id)
        .bind(c.stage.as_str_name())
        .bind(c.error_code)
        .bind(c.provider_message_id)
        .bind(c.delivered)
        .bind(c.read)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn enqueue_stages(&mut self, stages: &[pb::MessageStage]) -> Result<(), sqlx::Error> {
        let payloads: Vec<Vec<u8>> = stages.iter().map(prost::Message::encode_to_vec).collect();
        sqlx::query("INSERT INTO conversation_outbox (payload) SELECT * FROM unnest($1::bytea[])")
            .bind(&payloads)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error> {
        outbox::enqueue(&mut self.0, events).await
    }

    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
        self.0.commit().await
    }
}
