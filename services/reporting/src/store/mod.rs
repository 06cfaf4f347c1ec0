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
    /// Appends the events not seen before, each at its account's next position; returns how many
    /// were new. An account's events become visible in position order.
    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error>;
    /// Up to `limit` of the account's events after `position`, in position order.
    async fn events_after(
        &self,
        account_id: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StoredEvent)>, sqlx::Error>;
    /// The position just before the account's first event (by position) that occurred at or
    /// after `since`; `None` while there is none.
    async fn position_before(
        &self,
        account_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<i64>, sqlx::Error>;
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

/// The columns [`EventStore::events_after`] reads, in [`logged_event`]'s order.
pub(crate) const LOGGED_COLUMNS: &str = "position, event_id, stage, occurred_at, handoff_id, \
    handoff_config_id, channel, skill_id, conversation_id, ivr_number, error_code, source, \
    response_delay_ms";

/// A row of [`LOGGED_COLUMNS`] as its position and event; `occurred_at` is read by the backend
/// (PostgreSQL has timestamps, SQLite integers).
pub(crate) fn logged_event<R>(
    row: &R,
    account_id: &str,
    occurred_at: DateTime<Utc>,
) -> Result<(i64, StoredEvent), sqlx::Error>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database>,
{
    let stage: String = row.try_get("stage")?;
    let channel: String = row.try_get("channel")?;
    Ok((
        row.try_get("position")?,
        StoredEvent {
            event_id: row.try_get("event_id")?,
            account_id: account_id.to_owned(),
            stage: c2m_proto::v1::FunnelStage::from_str_name(&stage)
                .unwrap_or_default()
                .as_str_name(),
            occurred_at,
            handoff_id: row.try_get("handoff_id")?,
            handoff_config_id: row.try_get("handoff_config_id")?,
            channel: c2m_proto::v1::Channel::from_str_name(&channel)
                .map_or("", |c| c.as_str_name()),
            skill_id: row.try_get("skill_id")?,
            conversation_id: row.try_get("conversation_id")?,
            ivr_number: row.try_get("ivr_number")?,
            error_code: row.try_get("error_code")?,
            source: row.try_get("source")?,
            response_delay_ms: row.try_get("response_delay_ms")?,
        },
    ))
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
