//! [`RoutingStore`] on SQLite: the embedded default's conversations, one file, the same answers
//! as PostgreSQL's (`store::tests` runs one suite against both). Times are integer microseconds.
//! A change takes the file's write lock when it begins (`BEGIN IMMEDIATE`), which stands in for
//! PostgreSQL's row locks; the log's notices are this process's, sent once a change commits.

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::{CancellationToken, health::Probe};
use c2m_storage::outbox::{self, SqliteOutbox};
use c2m_storage::sqlite::{micros, now, time};
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{
    Row, Sqlite, SqliteConnection, SqlitePool, Transaction, migrate::Migrator, sqlite::SqliteRow,
};
use tokio::sync::broadcast;

use super::{
    Change, Check, Consumer, Deflection, Listing, LogNotices, NewConversation, NewEntry,
    OpenConversation, RoutingStore, RoutingTx, SentEntry, latest_per_handoff,
};

/// The SQLite schema's migrations (`migrations-sqlite/`).
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations-sqlite");

const ENTRY_COLUMNS: &str = "seq, direction, text, at, author, message_id, client_message_id, \
    stage, error_code, media_urls";

const CONVERSATION_COLUMNS: &str = "conversation_id, account_id, skill_id, channel, handoff_id, \
    handoff_config_id, engagement_attributes, opened_at, closed_at, consumer_address, assignee, \
    close_reason, last_message_at";

#[derive(Debug, Clone)]
pub struct SqliteRoutingStore {
    pool: SqlitePool,
    /// Accounts whose log grew, for this process's feed.
    notices: broadcast::Sender<String>,
}

impl SqliteRoutingStore {
    /// The store over `pool`, its migrations applied.
    pub async fn new(pool: SqlitePool) -> Result<Self, sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            notices: broadcast::channel(1024).0,
        })
    }

    /// The outbox kept in this file (funnel events), for its relay.
    pub fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone())
    }
}

fn transcript_entry(row: &SqliteRow) -> Result<pb::TranscriptEntry, sqlx::Error> {
    let stage: Option<&str> = row.try_get("stage")?;
    let media: &str = row.try_get("media_urls")?;
    Ok(pb::TranscriptEntry {
        seq: row.try_get("seq")?,
        direction: match row.try_get::<&str, _>("direction")? {
            "OUTBOUND" => pb::TranscriptDirection::Outbound,
            _ => pb::TranscriptDirection::Inbound,
        } as i32,
        text: row.try_get("text")?,
        at: Some(c2m_proto::timestamp(time(row.try_get("at")?))),
        author: row.try_get("author")?,
        message_id: row
            .try_get::<Option<String>, _>("message_id")?
            .unwrap_or_default(),
        client_message_id: row
            .try_get::<Option<String>, _>("client_message_id")?
            .unwrap_or_default(),
        stage: stage
            .and_then(FunnelStage::from_str_name)
            .unwrap_or_default() as i32,
        error_code: row
            .try_get::<Option<String>, _>("error_code")?
            .unwrap_or_default(),
        media_urls: serde_json::from_str(media).unwrap_or_default(),
    })
}

fn conversation(row: &SqliteRow) -> Result<pb::Conversation, sqlx::Error> {
    let closed_at: Option<i64> = row.try_get("closed_at")?;
    let attributes: &[u8] = row.try_get("engagement_attributes")?;
    let optional = |column: &str| -> Result<String, sqlx::Error> {
        Ok(row
            .try_get::<Option<String>, _>(column)?
            .unwrap_or_default())
    };
    Ok(pb::Conversation {
        conversation_id: row.try_get("conversation_id")?,
        account_id: row.try_get("account_id")?,
        skill_id: row.try_get("skill_id")?,
        channel: Channel::from_str_name(row.try_get("channel")?).unwrap_or_default() as i32,
        handoff_id: optional("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        state: if closed_at.is_some() {
            pb::ConversationState::Closed
        } else {
            pb::ConversationState::Open
        } as i32,
        engagement_attributes: pb::EngagementAttributes::decode(attributes).ok(),
        transcript: Vec::new(),
        opened_at: Some(c2m_proto::timestamp(time(row.try_get("opened_at")?))),
        closed_at: closed_at.map(|at| c2m_proto::timestamp(time(at))),
        consumer_address: row.try_get("consumer_address")?,
        assignee: optional("assignee")?,
        close_reason: optional("close_reason")?,
        last_message_at: Some(c2m_proto::timestamp(time(row.try_get("last_message_at")?))),
    })
}

async fn load(
    conn: &mut SqliteConnection,
    account_id: &str,
    conversation_id: &str,
) -> Result<Option<pb::Conversation>, sqlx::Error> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations \
         WHERE account_id = ?1 AND conversation_id = ?2"
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
        "SELECT {ENTRY_COLUMNS} FROM transcript_entries WHERE conversation_id = ?1 ORDER BY seq"
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
impl RoutingStore for SqliteRoutingStore {
    fn probe(&self) -> Arc<dyn Probe> {
        c2m_storage::sqlite::probe(self.pool.clone(), "routing")
    }

    async fn until_ready(&self, _: &CancellationToken) -> bool {
        // Migrated when it was made.
        true
    }

    async fn begin(&self) -> Result<Box<dyn RoutingTx>, sqlx::Error> {
        Ok(Box::new(SqliteTx {
            tx: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            notices: self.notices.clone(),
            logged: Vec::new(),
        }))
    }

    async fn check_consumers(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let mut consumers = Vec::with_capacity(checks.len());
        for (account_id, phone, hours) in checks {
            let conversation: Option<String> = sqlx::query_scalar(
                "SELECT conversation_id FROM conversations \
                 WHERE account_id = ?1 AND consumer_address = ?2 AND closed_at IS NULL",
            )
            .bind(account_id)
            .bind(phone)
            .fetch_optional(&mut *conn)
            .await?;
            let opted_out: Vec<String> = sqlx::query_scalar(
                "SELECT channel FROM opt_outs WHERE account_id = ?1 AND consumer_phone = ?2",
            )
            .bind(account_id)
            .bind(phone)
            .fetch_all(&mut *conn)
            .await?;
            let pending_invite: Option<String> = sqlx::query_scalar(
                "SELECT d.handoff_id FROM deflections d \
                 WHERE ?3 > 0 AND d.account_id = ?1 AND d.consumer_phone = ?2 \
                   AND d.channel = 'CHANNEL_APPLE_MESSAGES' AND d.sent_at > ?4 \
                   AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.handoff_id = d.handoff_id) \
                 ORDER BY d.sent_at DESC LIMIT 1",
            )
            .bind(account_id)
            .bind(phone)
            .bind(hours)
            .bind(now().saturating_sub(i64::from(*hours) * 3_600_000_000))
            .fetch_optional(&mut *conn)
            .await?;
            consumers.push(Consumer {
                conversation,
                opted_out,
                pending_invite,
            });
        }
        Ok(consumers)
    }

    async fn record_deflections(&self, deflections: Vec<Deflection>) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for d in latest_per_handoff(deflections) {
            sqlx::query(
                "INSERT INTO deflections (handoff_id, account_id, handoff_config_id, ivr_number, \
                     consumer_phone, channel, skill_id, first_message, engagement_attributes, \
                     sent_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (handoff_id) DO UPDATE SET channel = excluded.channel, \
                     first_message = excluded.first_message, sent_at = excluded.sent_at \
                 WHERE deflections.sent_at <= excluded.sent_at",
            )
            .bind(&d.handoff_id)
            .bind(&d.account_id)
            .bind(&d.handoff_config_id)
            .bind(&d.ivr_number)
            .bind(&d.consumer_phone)
            .bind(&d.channel)
            .bind(&d.skill_id)
            .bind(&d.first_message)
            .bind(&d.engagement_attributes)
            .bind(micros(d.sent_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
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
             WHERE account_id = ?1 AND id > ?2 \
             AND (?3 IS NULL OR consumer_phone = ?3) AND (?4 IS NULL OR channel = ?4) \
             ORDER BY id LIMIT ?5",
        )
        .bind(account_id)
        .bind(after)
        .bind(consumer_phone)
        .bind(channel.map(|c| c.as_str_name()))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("id")?,
                    pb::ConsentChange {
                        consumer_phone: row.try_get("consumer_phone")?,
                        channel: Channel::from_str_name(row.try_get("channel")?).unwrap_or_default()
                            as i32,
                        opted_in: row.try_get("opted_in")?,
                        source: row.try_get("source")?,
                        at: Some(c2m_proto::timestamp(time(row.try_get("at")?))),
                    },
                ))
            })
            .collect()
    }

    async fn conversations(&self, l: &Listing) -> Result<Vec<pb::Conversation>, sqlx::Error> {
        let skills = l
            .skills
            .as_ref()
            .map(|s| serde_json::to_string(s).unwrap_or_else(|_| "[]".into()));
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE account_id = ?1 \
             AND (?2 IS NULL OR (closed_at IS NULL) = ?2) \
             AND (?3 IS NULL OR skill_id = ?3) \
             AND (?4 IS NULL OR skill_id IN (SELECT value FROM json_each(?4))) \
             AND (?5 IS NULL OR channel = ?5) \
             AND (?6 IS NULL OR consumer_address = ?6) \
             AND (?7 IS NULL OR assignee = ?7) \
             AND (?8 IS NULL OR opened_at >= ?8) \
             AND (?9 IS NULL OR (opened_at, conversation_id) < (?9, ?10)) \
             ORDER BY opened_at DESC, conversation_id DESC LIMIT ?11"
        )))
        .bind(&l.account_id)
        .bind(l.open)
        .bind(&l.skill_id)
        .bind(skills)
        .bind(l.channel.map(|c| c.as_str_name()))
        .bind(&l.consumer)
        .bind(&l.assignee)
        .bind(l.opened_after.map(micros))
        .bind(l.after.as_ref().map(|a| micros(a.0)))
        .bind(l.after.as_ref().map(|a| a.1.as_str()))
        .bind(l.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(conversation).collect()
    }

    async fn conversation(
        &self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        load(&mut conn, account_id, conversation_id).await
    }

    async fn accounts_with_open_conversations(&self) -> Result<Vec<String>, sqlx::Error> {
        sqlx::query_scalar("SELECT DISTINCT account_id FROM conversations WHERE closed_at IS NULL")
            .fetch_all(&self.pool)
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
             WHERE account_id = ?1 AND closed_at IS NULL AND last_message_at <= ?2 \
             ORDER BY last_message_at LIMIT ?3",
        )
        .bind(account_id)
        .bind(micros(idle_since))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    async fn log_head(&self, account_id: &str) -> Result<i64, sqlx::Error> {
        Ok(
            sqlx::query_scalar("SELECT position FROM conversation_log_heads WHERE account_id = ?1")
                .bind(account_id)
                .fetch_optional(&self.pool)
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
             WHERE account_id = ?1 AND position > ?2 ORDER BY position LIMIT ?3",
        )
        .bind(account_id)
        .bind(position)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
    }

    async fn log_oldest_kept(&self, account_id: &str) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce( \
                 (SELECT min(position) FROM conversation_events WHERE account_id = ?1), \
                 (SELECT position + 1 FROM conversation_log_heads WHERE account_id = ?1), 1)",
        )
        .bind(account_id)
        .fetch_one(&self.pool)
        .await
    }

    async fn log_before(&self, account_id: &str, since: DateTime<Utc>) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT coalesce(max(position), 0) FROM conversation_events \
             WHERE account_id = ?1 AND at < ?2",
        )
        .bind(account_id)
        .bind(micros(since))
        .fetch_one(&self.pool)
        .await
    }

    async fn prune_log(&self, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query("DELETE FROM conversation_events WHERE at < ?1")
            .bind(micros(cutoff))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn listen(&self) -> Result<Box<dyn LogNotices>, sqlx::Error> {
        Ok(Box::new(SqliteNotices(self.notices.subscribe())))
    }
}

struct SqliteNotices(broadcast::Receiver<String>);

#[async_trait]
impl LogNotices for SqliteNotices {
    async fn recv(&mut self) -> Result<String, sqlx::Error> {
        self.0.recv().await.map_err(|e| {
            // Lagged: notices were missed; listening again and the feed's sweep read the log.
            sqlx::Error::Protocol(format!("conversation log notices: {e}"))
        })
    }

    fn buffered(&mut self) -> Option<String> {
        self.0.try_recv().ok()
    }
}

struct SqliteTx {
    tx: Transaction<'static, Sqlite>,
    notices: broadcast::Sender<String>,
    /// Accounts whose log this change grows, told once it commits.
    logged: Vec<String>,
}

#[async_trait]
impl RoutingTx for SqliteTx {
    async fn routed(
        &mut self,
        provider_message_id: &str,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT c.conversation_id, c.handoff_id FROM transcript_entries t \
             JOIN conversations c USING (conversation_id) WHERE t.provider_message_id = ?1",
        )
        .bind(provider_message_id)
        .fetch_optional(&mut *self.tx)
        .await
    }

    async fn open_conversation(
        &mut self,
        account_id: &str,
        consumer: &str,
    ) -> Result<Option<OpenConversation>, sqlx::Error> {
        let row: Option<(String, Option<String>, String)> = sqlx::query_as(
            "SELECT conversation_id, handoff_id, skill_id FROM conversations \
             WHERE account_id = ?1 AND consumer_address = ?2 AND closed_at IS NULL",
        )
        .bind(account_id)
        .bind(consumer)
        .fetch_optional(&mut *self.tx)
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
             WHERE account_id = ?1 AND consumer_phone = ?2 AND sent_at >= ?3 \
             ORDER BY sent_at DESC LIMIT 1",
        )
        .bind(account_id)
        .bind(consumer)
        .bind(micros(since))
        .fetch_optional(&mut *self.tx)
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
            sent_at: time(row.try_get("sent_at")?),
        }))
    }

    async fn open(&mut self, c: &NewConversation<'_>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO conversations (conversation_id, account_id, consumer_address, channel, \
             skill_id, handoff_id, handoff_config_id, engagement_attributes, opened_at, \
             last_message_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .bind(c.conversation_id)
        .bind(c.account_id)
        .bind(c.consumer_address)
        .bind(c.channel)
        .bind(c.skill_id)
        .bind(c.handoff_id)
        .bind(c.handoff_config_id)
        .bind(c.engagement_attributes)
        .bind(micros(c.opened_at))
        .bind(now())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn append(
        &mut self,
        conversation_id: &str,
        entry: &NewEntry<'_>,
    ) -> Result<pb::TranscriptEntry, sqlx::Error> {
        let media = serde_json::to_string(entry.media_urls).unwrap_or_else(|_| "[]".into());
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO transcript_entries (conversation_id, seq, direction, text, \
                 provider_message_id, at, author, message_id, client_message_id, media_urls, \
                 sending_until) \
             SELECT ?1, coalesce(max(seq), 0) + 1, ?2, ?3, nullif(?4, ''), ?5, ?6, ?7, ?8, ?9, \
                 ?10 \
             FROM transcript_entries WHERE conversation_id = ?1 \
             RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(conversation_id)
        .bind(entry.direction)
        .bind(entry.text)
        .bind(entry.provider_message_id)
        .bind(micros(entry.at))
        .bind(entry.author)
        .bind(entry.message_id)
        .bind(entry.client_message_id)
        .bind(media)
        .bind(entry.sending_until.map(micros))
        .fetch_one(&mut *self.tx)
        .await?;
        sqlx::query(
            "UPDATE conversations SET last_message_at = max(last_message_at, ?2) \
             WHERE conversation_id = ?1",
        )
        .bind(conversation_id)
        .bind(micros(entry.at))
        .execute(&mut *self.tx)
        .await?;
        transcript_entry(&row)
    }

    async fn load(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        load(&mut self.tx, account_id, conversation_id).await
    }

    async fn lock(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CONVERSATION_COLUMNS} FROM conversations \
             WHERE account_id = ?1 AND conversation_id = ?2"
        )))
        .bind(account_id)
        .bind(conversation_id)
        .fetch_optional(&mut *self.tx)
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
            "UPDATE conversations SET assignee = ?2, skill_id = ?3 WHERE conversation_id = ?1",
        )
        .bind(conversation_id)
        .bind(assignee)
        .bind(skill_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn close(&mut self, conversation_id: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE conversations SET closed_at = ?3, close_reason = ?2, assignee = NULL \
             WHERE conversation_id = ?1",
        )
        .bind(conversation_id)
        .bind(reason)
        .bind(now())
        .execute(&mut *self.tx)
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
             WHERE conversation_id = ?1 AND client_message_id = ?2"
        )))
        .bind(conversation_id)
        .bind(client_message_id)
        .fetch_optional(&mut *self.tx)
        .await?
        .as_ref()
        .map(|row| {
            let until: Option<i64> = row.try_get("sending_until")?;
            Ok((transcript_entry(row)?, until.map(time)))
        })
        .transpose()
    }

    async fn sending(
        &mut self,
        conversation_id: &str,
        seq: i64,
        until: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE transcript_entries SET sending_until = ?2 \
             WHERE conversation_id = ?1 AND seq = ?3",
        )
        .bind(conversation_id)
        .bind(micros(until))
        .bind(seq)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn last_inbound(
        &mut self,
        conversation_id: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT max(at) FROM transcript_entries \
             WHERE conversation_id = ?1 AND direction = 'INBOUND'",
        )
        .bind(conversation_id)
        .fetch_one(&mut *self.tx)
        .await?;
        Ok(last.map(time))
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
             WHERE t.message_id = ?1 AND c.account_id = ?2"
        )))
        .bind(message_id)
        .bind(account_id)
        .fetch_optional(&mut *self.tx)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(SentEntry {
            entry: transcript_entry(&row)?,
            conversation_id: row.try_get("conversation_id")?,
            skill_id: row.try_get("skill_id")?,
            channel: Channel::from_str_name(row.try_get("channel")?).unwrap_or_default(),
            handoff_id: row
                .try_get::<Option<String>, _>("handoff_id")?
                .unwrap_or_default(),
            opened_at: time(row.try_get("opened_at")?),
        }))
    }

    async fn set_stage(
        &mut self,
        message_id: &str,
        stage: FunnelStage,
        error_code: &str,
    ) -> Result<pb::TranscriptEntry, sqlx::Error> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE transcript_entries SET stage = ?2, error_code = nullif(?3, '') \
             WHERE message_id = ?1 RETURNING {ENTRY_COLUMNS}"
        )))
        .bind(message_id)
        .bind(stage.as_str_name())
        .bind(error_code)
        .fetch_one(&mut *self.tx)
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
                 WHERE conversation_id = ?1 AND seq <> ?2 \
                 AND direction = 'OUTBOUND' AND author <> 'deflection' \
                 AND stage IN ('FUNNEL_STAGE_SENT', 'FUNNEL_STAGE_DELIVERED', 'FUNNEL_STAGE_READ'))",
        )
        .bind(conversation_id)
        .bind(seq)
        .fetch_one(&mut *self.tx)
        .await
    }

    async fn consent(&mut self, c: &Change<'_>) -> Result<bool, sqlx::Error> {
        let (account, phone, channel) = (c.account_id, c.consumer_phone, c.channel.as_str_name());
        let written = if c.opted_in {
            sqlx::query(
                "DELETE FROM opt_outs \
                 WHERE account_id = ?1 AND consumer_phone = ?2 AND channel = ?3",
            )
            .bind(account)
            .bind(phone)
            .bind(channel)
            .execute(&mut *self.tx)
            .await?
        } else {
            sqlx::query(
                "INSERT INTO opt_outs (account_id, consumer_phone, channel, source, opted_out_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (account_id, consumer_phone, channel) DO NOTHING",
            )
            .bind(account)
            .bind(phone)
            .bind(channel)
            .bind(c.source)
            .bind(now())
            .execute(&mut *self.tx)
            .await?
        };
        if written.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO consent_changes (account_id, consumer_phone, channel, opted_in, source, \
             at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(account)
        .bind(phone)
        .bind(channel)
        .bind(c.opted_in)
        .bind(c.source)
        .bind(now())
        .execute(&mut *self.tx)
        .await?;
        Ok(true)
    }

    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error> {
        outbox::enqueue_sqlite(&mut self.tx, events).await
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
        let head: i64 = sqlx::query_scalar(
            "INSERT INTO conversation_log_heads (account_id, position) VALUES (?1, ?2) \
             ON CONFLICT (account_id) DO UPDATE SET position = position + excluded.position \
             RETURNING position",
        )
        .bind(account_id)
        .bind(count)
        .fetch_one(&mut *self.tx)
        .await?;
        let at = now();
        for (n, event) in (1..).zip(events) {
            sqlx::query(
                "INSERT INTO conversation_events (account_id, position, conversation_id, \
                 payload, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(account_id)
            .bind(head - count + n)
            .bind(&event.conversation_id)
            .bind(event.encode_to_vec())
            .bind(at)
            .execute(&mut *self.tx)
            .await?;
        }
        self.logged.push(account_id.to_owned());
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error> {
        let SqliteTx {
            tx,
            notices,
            logged,
        } = *self;
        tx.commit().await?;
        for account_id in logged {
            // No receivers: no feed is running.
            let _ = notices.send(account_id);
        }
        Ok(())
    }
}
