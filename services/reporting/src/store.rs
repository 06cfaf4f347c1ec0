//! The event log's storage.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

/// One event as stored: the wire event with its enums as names.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event_id: String,
    pub account_id: String,
    pub stage: &'static str,
    pub occurred_at: DateTime<Utc>,
    pub handoff_id: String,
    pub handoff_config_id: String,
    pub channel: &'static str,
    pub skill_id: String,
    pub conversation_id: String,
    pub ivr_number: String,
    pub error_code: String,
    pub source: String,
}

/// What funnel rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    None,
    Channel,
    HandoffConfig,
    Skill,
    IvrNumber,
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends the events not seen before; returns how many were new.
    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error>;
    /// (group, stage name, count) for an account's events in `[start, end)`.
    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error>;
}

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
}

impl PgEventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error> {
        let column = |f: fn(&StoredEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        let done = sqlx::query(
            "INSERT INTO events (event_id, account_id, stage, occurred_at, handoff_id, \
             handoff_config_id, channel, skill_id, conversation_id, ivr_number, error_code, source) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[]) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(column(|e| e.event_id.clone()))
        .bind(column(|e| e.account_id.clone()))
        .bind(column(|e| e.stage.to_owned()))
        .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(column(|e| e.handoff_id.clone()))
        .bind(column(|e| e.handoff_config_id.clone()))
        .bind(column(|e| e.channel.to_owned()))
        .bind(column(|e| e.skill_id.clone()))
        .bind(column(|e| e.conversation_id.clone()))
        .bind(column(|e| e.ivr_number.clone()))
        .bind(column(|e| e.error_code.clone()))
        .bind(column(|e| e.source.clone()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        let group = match grouping {
            Grouping::None => "''",
            Grouping::Channel => "channel",
            Grouping::HandoffConfig => "handoff_config_id",
            Grouping::Skill => "skill_id",
            Grouping::IvrNumber => "ivr_number",
        };
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {group}::text, stage, count(*) FROM events \
             WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
             GROUP BY 1, 2 ORDER BY 1, 2"
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
    }
}
