//! [`RoutingStore`] on PostgreSQL: Routing's schema, with the conversation log's positions held
//! by a per-account head row and its notices sent by `NOTIFY` on commit.

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::{CancellationToken, health::Probe};
use c2m_storage::{ServiceDb, outbox};
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{
    Postgres, Row, Transaction,
    postgres::{PgListener, PgRow},
};

use super::{
    Change, Check, Consumer, Deflection, Listing, LogNotices, NewConversation, NewEntry,
    OpenConversation, RoutingStore, RoutingTx, SentEntry, latest_per_handoff,
};

/// The notification channel of the conversation log; the payload is the account id.
const CHANNEL: &str = "c2m_conversations";

/// The columns a transcript entry is read from.
const ENTRY_COLUMNS: &str = "seq, direction, text, at, author, message_id, client_message_id, \
    stage, error_code, media_urls";

/// The columns a conversation is read from.
const CONVERSATION_COLUMNS: &str = "conversation_id, account_id, skill_id, channel, handoff_id, \
    handoff_config_id, engagement_attributes, opened_at, closed_at, consumer_address, assignee, \
    close_reason, last_message_at";

#[derive(Debug, Clone)]
pub(crate) struct PgRoutingStore {
    db: ServiceDb,
}

impl PgRoutingStore {
    pub fn new(db: ServiceDb) -> Self {
        Self { db }
    }
}

/// A transcript entry as its row reads ([`ENTRY_COLUMNS`]).
fn transcript_entry(row: &PgRow) -> Result<pb::TranscriptEntry, sqlx::Error> {
    let stage: Option<String> = row.try_get("stage")?;
    Ok(pb::TranscriptEntry {
        seq: i64::from(row.try_get::<i32, _>("seq")?),
        direction: match row.try_get::<String, _>("direction")?.as_str() {
            "OUTBOUND" => pb::TranscriptDirection::Outbound,
            _ => pb::TranscriptDirection::Inbound,
        } as i32,
        text: row.try_get("text")?,
        at: Some(c2m_proto::timestamp(row.try_get("at")?)),
        author: row.try_get("author")?,
        message_id: row
            .try_get::<Option<String>, _>("message_id")?
            .unwrap_or_default(),
        client_message_id: row
            .try_get::<Option<String>, _>("client_message_id")?
            .unwrap_or_default(),
        stage: stage
            .as_deref()
            .and_then(FunnelStage::from_str_name)
            .unwrap_or_default() as i32,
        error_code: row
            .try_get::<Option<String>, _>("error_code")?
            .unwrap_or_default(),
        media_urls: row.try_get("media_urls")?,
    })
}

/// A conversation as its row reads ([`CONVERSATION_COLUMNS`]), without its transcript.
fn conversation(row: &PgRow) -> Result<pb::Conversation, sqlx::Error> {
    let closed_at: Option<DateTime<Utc>> = row.try_get("closed_at")?;
    let attributes: Vec<u8> = row.try_get("engagement_attributes")?;
    let optional = |column: &str| -> Result<String, sqlx::Error> {
        Ok(row
            .try_get::<Option<String>, _>(column)?
            .unwrap_or_default())
    };
    Ok(pb::Conversation {
        conversation_id: row.try_get("conversation_id")?,
        account_id: row.try_get("account_id")?,
        skill_id: row.try_get("skill_id")?,
        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?).unwrap_or_default()
            as i32,
        handoff_id: optional("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        state: if closed_at.is_some() {
            pb::ConversationState::Closed
        } else {
            pb::ConversationState::Open
        } as i32,
        engagement_attributes: pb::EngagementAttributes::decode(attributes.as_slice()).ok(),
        transcript: Vec::new(),
        opened_at: Some(c2m_proto::timestamp(row.try_get("opened_at")?)),
        closed_at: closed_at.map(c2m_proto::timestamp),
        consumer_address: row.try_get("consumer_address")?,
        assignee: optional("assignee")?,
        close_reason: optional("close_reason")?,
        last_message_at: Some(c2m_proto::timestamp(row.try_get("last_message_at")?)),
    })
}

/// A conversation with its transcript, read on `conn`.
async fn load(
    conn: &mut sqlx::PgConnection,
    account_id: &str,
    conversation_id: &str,
) -> Result<Option<pb::Conversation>, sqlx::Error> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations \
         WHERE account_id = $1 AND conversation_id = $2"
    )))
    .bind(account_id)
    .bind(conversation_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let mut loaded = conversation(&row)?;
    loaded.transcript = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM transcript_entries WHERE conversation_id = $1 ORDER BY seq"
    )))
    .bind(conversation_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(transcript_entry)
    .collect::<Result<_, _>>()?;
    Ok(Some(loaded))
}

#[async_trait]
impl RoutingStore for PgRoutingStore {
    fn probe(&self) -> Arc<dyn Probe> {
        self.db.probe()
    }

    async fn until_ready(&self, shutdown: &CancellationToken) -> bool {
        self.db.until_migrated(shutdown).await
    }

    async fn begin(&self) -> Result<Box<dyn RoutingTx>, sqlx::Error> {
        Ok(Box::new(PgTx(self.db.pool().begin().await?)))
    }

    /// Each fact is a probe by the tables' keys (a subquery per row, which PostgreSQL cannot
    /// turn into a scan of a whole table).
    async fn check_consumers(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error> {
        let accounts: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
        let phones: Vec<&str> = checks.iter().map(|c| c.1.as_str()).collect();
        let hours: Vec<i32> = checks.iter().map(|c| c.2).collect();
        let rows = sqlx::query(
            "SELECT \
                 (SELECT conversation_id FROM conversations \
                  WHERE account_id = q.account_id AND consumer_address = q.phone \
                    AND closed_at IS NULL) AS conversation, \
                 ARRAY(SELECT channel FROM opt_outs \
                       WHERE account_id = q.account_id AND consumer_phone = q.phone) AS opted_out, \
                 (SELECT d.handoff_id FROM deflections d \
                  WHERE q.hours > 0 AND d.account_id = q.account_id AND d.consumer_phone = q.phone \
                    AND d.channel = 'CHANNEL_APPLE_MESSAGES' \
                    AND d.sent_at > now() - make_interval(hours => q.hours) \
                    AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.handoff_id = d.handoff_id) \
                  ORDER BY d.sent_at DESC LIMIT 1) AS pending_invite \
             FROM unnest($1::text[], $2::text[], $3::int[]) WITH ORDINALITY AS q(account_id, phone, hours, n) \
             ORDER BY q.n",
        )
        .bind(&accounts)
        .bind(&phones)
        .bind(&hours)
        .fetch_all(self.db.batch_pool())
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(Consumer {
                    conversation: row.try_get("conversation")?,
                    opted_out: row.try_get("opted_out")?,
                    pending_invite: row.try_get("pending_invite")?,
                })
            })
            .collect()
    }

    async fn record_deflections(&self, deflections: Vec<Deflection>) -> Result<(), sqlx::Error> {
        // One statement cannot touch a row twice: one row per handoff, its latest send.
        let deflections = latest_per_handoff(deflections);
        let text = |f: fn(&Deflection) -> &str| deflections.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO deflections (handoff_id, account_id, handoff_config_id, ivr_number, \
                 consumer_phone, channel, skill_id, first_message, engagement_attributes, sent_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::bytea[], $10::timestamptz[]) \
             ON CONFLICT (handoff_id) DO UPDATE SET channel = EXCLUDED.channel, \
                 first_message = EXCLUDED.first_message, sent_at = EXCLUDED.sent_at \
             WHERE deflections.sent_at <= EXCLUDED.sent_at",
        )
        .bind(text(|d| &d.handoff_id))
        .bind(text(|d| &d.account_id))
        .bind(text(|d| &d.handoff_config_id))
        .bind(text(|d| &d.ivr_number))
        .bind(text(|d| &d.consumer_phone))
        .bind(text(|d| &d.channel))
        .bind(text(|d| &d.skill_id))
        .bind(text(|d| &d.first_message))
        .bind(
            deflections
                .iter()
                .map(|d| d.engagement_attributes.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(deflections.iter().map(|d| d.sent_at).collect::<Vec<_>>())
        .execute(self.db.batch_pool())
        .await?;
        Ok(())
    }

    async fn consent_changes(
        &self,
        account_id: &str,
        consumer_phone: Option<&str>,
        channel: Option<Channel>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, pb::ConsentChange)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, consumer_phone, channel, opted_in, source, at FROM consent_changes \
             WHERE account_id = $1 AND id > $2 \
             AND ($3::text IS NULL OR consumer_phone = $3) AND ($4::text IS NULL OR channel = $4) \
             ORDER BY id LIMIT $5",
        )
        .bind(account_id)
        .bind(after)
        .bind(consumer_phone)
        .bind(channel.map(|c| c.as_str_name()))
        .bind(limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("id")?,
                    pb::ConsentChange {
                        consumer_phone: row.try_get("consumer_phone")?,
                        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?)
                            .unwrap_or_default() as i32,
                        opted_in: row.try_get("opted_in")?,
                        source: row.try_get("source")?,
                        at: Some(c2m_proto::timestamp(row.try_get("at")?)),
                    },
                ))
            })
            .collect()
    }

    async fn conversations(&self, l: &Listing) -> Result<Vec<pb::Conversation>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = $1 \
             AND ($2::bool IS NULL OR (closed_at IS NULL) = $2) \
             AND ($3::text IS NULL OR skill_id = $3) \
             AND ($4::text[] IS NULL OR skill_id = ANY($4)) \
             AND ($5::text IS NULL OR channel = $5) \
             AND ($6::text IS NULL OR consumer_address = $6) \
             AND ($7::text IS NULL OR assignee = $7) \
             AND ($8::timestamptz IS NULL OR opened_at >= $8) \
             AND ($9::timestamptz IS NULL OR (opened_at, conversation_id) < ($9, $10)) \
             ORDER BY opened_at DESC, conversation_id DESC LIMIT $11"
        )))
        .bind(&l.account_id)
        .bind(l.open)
        .bind(&l.skill_id)
        .bind(&l.skills)
        .bind(l.channel.map(|c| c.as_str_name()))
        .bind(&l.consumer)
        .bind(&l.assignee)
        .bind(l.opened_after)
        .bind(l.after.as_ref().map(|a| a.0))
        .bind(l.after.as_ref().map(|a| a.1.as_str()))
        .bind(l.limit)
        .fetch_all(self.db.pool())
        .await?;
        rows.iter().map(conversation).collect()
    }

    async fn conversation(
        &self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        let mut conn = self.db.pool().acquire().await?;
        load(&mut conn, account_id, conversation_id).await
    }

    async fn accounts_with_open_conversations(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT DISTINCT account_id FROM conversations WHERE closed_at IS NULL")
            .fetch_all(self.db.pool())
            .await
    }

    async fn idle(
        &self,
        account_id: &str,
        idle_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT conversation_id FROM conversations \
             WHERE account_id = $1 AND closed_at IS NULL AND last_message_at <= $2 \
             ORDER BY last_message_at LIMIT $3",
        )
        .bind(account_id)
        .bind(idle_since)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await
    }

    async fn log_head(&self, account_id: &str) -> Result<i64, sqlx::Error> {
        Ok(
            sqlx::query_scalar("SELECT position FROM conversation_log_heads WHERE account_id = $1")
                .bind(account_id)
                .fetch_optional(self.db.pool())
                .await?
                .unwrap_or(0),
        )
    }

    async fn log_after(
        &self,
        account_id: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT position, payload FROM conversation_events \
             WHERE account_id = $1 AND position > $2 ORDER BY position LIMIT $3",
        )
        .bind(account_id)
        .bind(position)
        .bind(limit)
        .fetch_all(self.db.pool())
        .await
    }

    async fn log_oldest_kept(&self, account_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce( \
                 (SELECT min(position) FROM conversation_events WHERE account_id = $1), \
                 (SELECT position + 1 FROM conversation_log_heads WHERE account_id = $1), 1)",
        )
        .bind(account_id)
        .fetch_one(self.db.pool())
        .await
    }

    async fn log_before(&self, account_id: &str, since: DateTime<Utc>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce(max(position), 0) FROM conversation_events \
             WHERE account_id = $1 AND at < $2",
        )
        .bind(account_id)
        .bind(since)
        .fetch_one(self.db.pool())
        .await
    }

    async fn prune_log(&self, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        let accounts: Vec<String> =
            sqlx::query_scalar("SELECT account_id FROM conversation_log_heads")
                .fetch_all(self.db.pool())
                .await?;
        let mut forgotten = 0;
        for account_id in accounts {
            forgotten +=
                sqlx::query("DELETE FROM conversation_events WHERE account_id = $1 AND at < $2")
                    .bind(&account_id)
                    .bind(cutoff)
                    .execute(self.db.pool())
                    .await?
                    .rows_affected();
        }
        Ok(forgotten)
    }

    async fn listen(&self) -> Result<Box<dyn LogNotices>, sqlx::Error> {
        let mut listener = PgListener::connect_with(self.db.pool()).await?;
        listener.listen(CHANNEL).await?;
        Ok(Box::new(PgNotices(listener)))
    }
}

struct PgNotices(PgListener);

#[async_trait]
impl LogNotices for PgNotices {
    async fn recv(&mut self) -> Result<String, sqlx::Error> {
        Ok(self.0.recv().await?.payload().to_owned())
    }

    fn buffered(&mut self) -> Option<String> {
        self.0.next_buffered().map(|n| n.payload().to_owned())
    }
}

struct PgTx(Transaction<'static, Postgres>);

#[async_trait]
impl RoutingTx for PgTx {
    async fn routed(
        &mut self,
        provider_message_id: &str,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT c.conversation_id, c.handoff_id FROM transcript_entries t \
             JOIN conversations c USING (conversation_id) WHERE t.provider_message_id = $1",
        )
        .bind(provider_message_id)
        .fetch_optional(&mut *self.0)
        .await
    }

    async fn open_conversation(
        &mut self,
        account_id: &str,
        consumer: &str,
    ) -> Result<Option<OpenConversation>, sqlx::Error> {
        let row: Option<(String, Option<String>, String)> = sqlx::query_as(
            "SELECT conversation_id, handoff_id, skill_id FROM conversations \
             WHERE account_id = $1 AND consumer_address = $2 AND closed_at IS NULL FOR UPDATE",
        )
        .bind(account_id)
        .bind(consumer)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(
            row.map(|(conversation_id, handoff_id, skill_id)| OpenConversation {
                conversation_id,
                handoff_id,
                skill_id,
            }),
        )
    }

    async fn latest_deflection(
        &mut self,
        account_id: &str,
        consumer: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<Deflection>, sqlx::Error> {
        let Some(row) = sqlx::query(
            "SELECT handoff_id, handoff_config_id, ivr_number, channel, skill_id, first_message, \
             engagement_attributes, sent_at FROM deflections \
             WHERE account_id = $1 AND consumer_phone = $2 AND sent_at >= $3 \
             ORDER BY sent_at DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(consumer)
        .bind(since)
        .fetch_optional(&mut *self.0)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(Deflection {
            handoff_id: row.try_get("handoff_id")?,
            account_id: account_id.to_owned(),
            handoff_config_id: row.try_get("handoff_config_id")?,
            ivr_number: row.try_get("ivr_number")?,
            consumer_phone: consumer.to_owned(),
            channel: row.try_get("channel")?,
            skill_id: row.try_get("skill_id")?,
            first_message: row.try_get("first_message")?,
            engagement_attributes: row.try_get("engagement_attributes")?,
            sent_at: row.try_get("sent_at")?,
        }))
    }

    async fn open(&mut self, c: &NewConversation<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO conversations (conversation_id, account_id, consumer_address, channel, \
             skill_id, handoff_id, handoff_config_id, engagement_attributes, opened_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(c.conversation_id)
        .bind(c.account_id)
        .bind(c.consumer_address)
        .bind(c.channel)
        .bind(c.skill_id)
        .bind(c.handoff_id)
        .bind(c.handoff_config_id)
        .bind(c.engagement_attributes)
        .bind(c.opened_at)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn append(
        &mut self,
        conversation_id: &str,
        entry: &NewEntry<'_>,
    ) -> Result<pb::TranscriptEntry, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO transcript_entries (conversation_id, seq, direction, text, \
                 provider_message_id, at, author, message_id, client_message_id, media_urls, \
                 sending_until) \
             SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, nullif($4, ''), $5, $6, $7, $8, $9, $10 \
             FROM transcript_entries WHERE conversation_id = $1 \
             RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(conversation_id)
        .bind(entry.direction)
        .bind(entry.text)
        .bind(entry.provider_message_id)
        .bind(entry.at)
        .bind(entry.author)
        .bind(entry.message_id)
        .bind(entry.client_message_id)
        .bind(entry.media_urls)
        .bind(entry.sending_until)
        .fetch_one(&mut *self.0)
        .await?;
        sqlx::query(
            "UPDATE conversations SET last_message_at = greatest(last_message_at, $2) \
             WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .bind(entry.at)
        .execute(&mut *self.0)
        .await?;
        transcript_entry(&row)
    }

    async fn load(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        load(&mut self.0, account_id, conversation_id).await
    }

    async fn lock(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations \
             WHERE account_id = $1 AND conversation_id = $2 FOR UPDATE"
        )))
        .bind(account_id)
        .bind(conversation_id)
        .fetch_optional(&mut *self.0)
        .await?
        .as_ref()
        .map(conversation)
        .transpose()
    }

    async fn assign(
        &mut self,
        conversation_id: &str,
        assignee: Option<&str>,
        skill_id: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE conversations SET assignee = $2, skill_id = $3 WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .bind(assignee)
        .bind(skill_id)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn close(&mut self, conversation_id: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE conversations SET closed_at = now(), close_reason = $2, assignee = NULL \
             WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .bind(reason)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn earlier(
        &mut self,
        conversation_id: &str,
        client_message_id: &str,
    ) -> Result<Option<(pb::TranscriptEntry, Option<DateTime<Utc>>)>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS}, sending_until FROM transcript_entries \
             WHERE conversation_id = $1 AND client_message_id = $2"
        )))
        .bind(conversation_id)
        .bind(client_message_id)
        .fetch_optional(&mut *self.0)
        .await?
        .as_ref()
        .map(|row| Ok((transcript_entry(row)?, row.try_get("sending_until")?)))
        .transpose()
    }

    async fn sending(
        &mut self,
        conversation_id: &str,
        seq: i64,
        until: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE transcript_entries SET sending_until = $2 \
             WHERE conversation_id = $1 AND seq = $3",
        )
        .bind(conversation_id)
        .bind(until)
        .bind(i32::try_from(seq).unwrap_or(i32::MAX))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn last_inbound(
        &mut self,
        conversation_id: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT max(at) FROM transcript_entries \
             WHERE conversation_id = $1 AND direction = 'INBOUND'",
        )
        .bind(conversation_id)
        .fetch_one(&mut *self.0)
        .await
    }

    async fn sent(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Option<SentEntry>, sqlx::Error> {
        let columns = ENTRY_COLUMNS
            .split(", ")
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT c.skill_id, c.channel, c.handoff_id, c.opened_at, t.conversation_id, \
                 {columns} \
             FROM transcript_entries t JOIN conversations c USING (conversation_id) \
             WHERE t.message_id = $1 AND c.account_id = $2 FOR UPDATE OF t, c"
        )))
        .bind(message_id)
        .bind(account_id)
        .fetch_optional(&mut *self.0)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(SentEntry {
            entry: transcript_entry(&row)?,
            conversation_id: row.try_get("conversation_id")?,
            skill_id: row.try_get("skill_id")?,
            channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?)
                .unwrap_or_default(),
            handoff_id: row
                .try_get::<Option<String>, _>("handoff_id")?
                .unwrap_or_default(),
            opened_at: row.try_get("opened_at")?,
        }))
    }

    async fn set_stage(
        &mut self,
        message_id: &str,
        stage: FunnelStage,
        error_code: &str,
    ) -> Result<pb::TranscriptEntry, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE transcript_entries SET stage = $2, error_code = nullif($3, '') \
             WHERE message_id = $1 RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(message_id)
        .bind(stage.as_str_name())
        .bind(error_code)
        .fetch_one(&mut *self.0)
        .await?;
        transcript_entry(&row)
    }

    async fn answered_before(
        &mut self,
        conversation_id: &str,
        seq: i64,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM transcript_entries \
                 WHERE conversation_id = $1 AND seq <> $2 \
                 AND direction = 'OUTBOUND' AND author <> 'deflection' \
                 AND stage IN ('FUNNEL_STAGE_SENT', 'FUNNEL_STAGE_DELIVERED', 'FUNNEL_STAGE_READ'))",
        )
        .bind(conversation_id)
        .bind(i32::try_from(seq).unwrap_or(i32::MAX))
        .fetch_one(&mut *self.0)
        .await
    }

    async fn consent(&mut self, c: &Change<'_>) -> Result<bool, sqlx::Error> {
        let (account, phone, channel) = (c.account_id, c.consumer_phone, c.channel.as_str_name());
        let written = if c.opted_in {
            sqlx::query(
                "DELETE FROM opt_outs \
                 WHERE account_id = $1 AND consumer_phone = $2 AND channel = $3",
            )
            .bind(account)
            .bind(phone)
            .bind(channel)
            .execute(&mut *self.0)
            .await?
        } else {
            sqlx::query(
                "INSERT INTO opt_outs (account_id, consumer_phone, channel, source) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (account_id, consumer_phone, channel) DO NOTHING",
            )
            .bind(account)
            .bind(phone)
            .bind(channel)
            .bind(c.source)
            .execute(&mut *self.0)
            .await?
        };
        if written.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO consent_changes (account_id, consumer_phone, channel, opted_in, source) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(account)
        .bind(phone)
        .bind(channel)
        .bind(c.opted_in)
        .bind(c.source)
        .execute(&mut *self.0)
        .await?;
        Ok(true)
    }

    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error> {
        outbox::enqueue(&mut self.0, events).await
    }

    async fn log(
        &mut self,
        account_id: &str,
        events: &[pb::ConversationEvent],
    ) -> Result<(), sqlx::Error> {
        if events.is_empty() {
            return Ok(());
        }
        let count = i64::try_from(events.len()).unwrap_or(i64::MAX);
        let conversations: Vec<&str> = events.iter().map(|e| e.conversation_id.as_str()).collect();
        let payloads: Vec<Vec<u8>> = events.iter().map(Message::encode_to_vec).collect();
        sqlx::query(
            "WITH head AS ( \
                 INSERT INTO conversation_log_heads AS h (account_id, position) VALUES ($1, $2) \
                 ON CONFLICT (account_id) DO UPDATE SET position = h.position + $2 \
                 RETURNING position) \
             INSERT INTO conversation_events (account_id, position, conversation_id, payload) \
             SELECT $1, head.position - $2 + e.n, e.conversation_id, e.payload \
             FROM head, unnest($3::text[], $4::bytea[]) WITH ORDINALITY AS e(conversation_id, payload, n)",
        )
        .bind(account_id)
        .bind(count)
        .bind(&conversations)
        .bind(&payloads)
        .execute(&mut *self.0)
        .await?;
        // Delivered to every replica's feed when (and only if) the change commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(account_id)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
        self.0.commit().await
    }
}
