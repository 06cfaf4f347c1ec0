//! The event log's storage: one trait ([`EventStore`]), on PostgreSQL (`postgres`, what
//! `c2m serve` runs) and on SQLite (`sqlite`, the embedded default), both checked by one
//! conformance suite (`tests/event_store.rs`).

mod postgres;
mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

pub use postgres::PgEventStore;
pub use sqlite::SqliteEventStore;

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
    /// ANSWERED events: milliseconds from the conversation's opening to the answer.
    pub response_delay_ms: Option<i64>,
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

impl Grouping {
    /// The column rows are grouped by.
    pub(crate) fn column(self) -> &'static str {
        match self {
            Grouping::None => "''",
            Grouping::Channel => "channel",
            Grouping::HandoffConfig => "handoff_config_id",
            Grouping::Skill => "skill_id",
            Grouping::IvrNumber => "ivr_number",
        }
    }
}

#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// The events of up to `limit` handoffs whose first event is in `[start, end)`, handoff ids
    /// after `after`, in handoff id order and, within one, in time order.
    async fn transactions(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error>;
    /// Appends the events not seen before; returns how many were new.
    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error>;
    /// (group, median, 90th percentile) of the times to first response of the conversations
    /// answered in `[start, end)`, in milliseconds.
    async fn first_responses(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error>;
    /// (group, stage name, count) for an account's events in `[start, end)`.
    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error>;
}

/// One row of a transaction page, as both backends read it: event id, stage, time, handoff,
/// channel, skill, conversation, error code, source.
pub(crate) type TransactionRow = (
    String,
    String,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    String,
    String,
);

/// A transaction page's row as a stored event of `account_id` (the fields a page carries).
pub(crate) fn transaction_event(account_id: &str, row: TransactionRow) -> StoredEvent {
    let (
        event_id,
        stage,
        occurred_at,
        handoff_id,
        channel,
        skill_id,
        conversation_id,
        error_code,
        source,
    ) = row;
    StoredEvent {
        event_id,
        account_id: account_id.to_owned(),
        stage: c2m_proto::v1::FunnelStage::from_str_name(&stage)
            .unwrap_or_default()
            .as_str_name(),
        occurred_at,
        handoff_id,
        handoff_config_id: String::new(),
        channel: c2m_proto::v1::Channel::from_str_name(&channel).map_or("", |c| c.as_str_name()),
        skill_id,
        conversation_id,
        ivr_number: String::new(),
        error_code,
        source,
        response_delay_ms: None,
    }
}
