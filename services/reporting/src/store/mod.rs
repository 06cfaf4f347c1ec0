//! The event log's storage: one trait ([`EventStore`]), on PostgreSQL (`postgres`, what
//! `c2m serve` runs) and on SQLite (`sqlite`, the embedded default), both checked by one
//! conformance suite (`tests/event_store.rs`).

mod postgres;
pub mod rollup;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};

pub use postgres::PgEventStore;
pub use rollup::Tally;
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
    /// ATTEMPTED events: the consumer's opaque id; empty otherwise.
    pub consumer_id: String,
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
    /// A series' value for the grouping, from the cohort's attempt (`a`) and the event (`e`).
    pub(crate) fn series_column(self) -> &'static str {
        match self {
            Grouping::None => "''",
            Grouping::Channel => "coalesce(nullif(e.channel, ''), a.channel)",
            Grouping::HandoffConfig => "a.handoff_config_id",
            Grouping::Skill => "a.skill_id",
            Grouping::IvrNumber => "a.ivr_number",
        }
    }

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

/// How long a series bucket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Hour,
    Day,
    /// From Monday.
    Week,
}

impl Bucket {
    /// PostgreSQL's `date_trunc` unit.
    pub(crate) fn unit(self) -> &'static str {
        match self {
            Bucket::Hour => "hour",
            Bucket::Day => "day",
            Bucket::Week => "week",
        }
    }

    /// The local time `local` falls in the bucket starting at, as `date_trunc` has it.
    pub fn truncate(self, local: NaiveDateTime) -> NaiveDateTime {
        let midnight = local.date().and_hms_opt(0, 0, 0).unwrap_or(local);
        match self {
            Bucket::Hour => midnight + Duration::hours(i64::from(local.hour())),
            Bucket::Day => midnight,
            Bucket::Week => {
                midnight - Duration::days(i64::from(local.weekday().num_days_from_monday()))
            }
        }
    }
}

/// What a funnel series is asked for.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    pub account_id: String,
    /// Handoffs attempted in `[start, end)`.
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub bucket: Bucket,
    pub time_zone: chrono_tz::Tz,
    /// At most two; `Grouping::None` is not one.
    pub group_by: Vec<Grouping>,
    /// An earlier attempt of the same consumer this recent makes an attempt a repeat.
    pub repeat_window: Duration,
}

/// Percentiles of durations in milliseconds: PostgreSQL's `percentile_disc` of the values, each
/// rounded down to its histogram bin ([`rollup::bin`]: exact under 256 ms, less than 0.8 % low
/// above).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Durations {
    pub count: u64,
    pub p50: i64,
    pub p90: i64,
    pub p99: i64,
}

/// PostgreSQL's `percentile_disc(p)`: the first value whose place in the sorted values reaches
/// the fraction `p` of them.
pub(crate) fn percentile_disc(sorted: &[i64], p: f64) -> i64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One bucket and group of a funnel series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesRow {
    /// The bucket's start in the query's time zone.
    pub bucket: NaiveDateTime,
    /// One value per grouping, in the query's order.
    pub groups: Vec<String>,
    /// (stage name, count), by stage name.
    pub counts: Vec<(String, i64)>,
    /// From the handoff's ATTEMPTED to its RESPONDED.
    pub time_to_reply: Durations,
    /// ANSWERED events' delays.
    pub time_to_first_response: Durations,
    /// Attempts whose consumer had an earlier attempt within the query's repeat window.
    pub repeats: u64,
}

/// Tallies by bucket (local start) and groups (in the query's order).
pub type Tallies = BTreeMap<(NaiveDateTime, Vec<String>), Tally>;

/// Where an account's rollups in one time zone stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneState {
    /// This backend keeps none: every series is read from the events.
    Unsupported,
    /// Not asked for (or refused: an account has at most [`MAX_ASKED_ZONES`] asked for).
    Absent,
    /// The events logged before it was asked for are still being tallied.
    Building,
    /// Every event is in it.
    Ready,
}

/// What [`EventStore::maintain`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub months_made: u64,
    pub months_dropped: u64,
    /// Events deleted one by one (outside a whole month).
    pub events_deleted: u64,
    pub days_deleted: u64,
}

/// Time zones an account's queries can have rollups made for, besides the configured ones.
pub const MAX_ASKED_ZONES: i64 = 4;

/// The first instant of local `day` in `zone`; `None` where the day starts in a gap.
pub fn start_of(zone: chrono_tz::Tz, day: NaiveDate) -> Option<DateTime<Utc>> {
    zone.from_local_datetime(&day.and_hms_opt(0, 0, 0)?)
        .earliest()
        .map(|t| t.with_timezone(&Utc))
}

/// A query's rows from its tallies.
fn finish(q: &SeriesQuery, tallies: Tallies) -> Vec<SeriesRow> {
    let hours = q.repeat_window.num_hours();
    tallies
        .into_iter()
        .map(|((bucket, groups), tally)| {
            let mut counts: Vec<(String, i64)> = tally
                .stages
                .iter()
                .filter(|(_, n)| **n != 0)
                .map(|(stage, n)| {
                    let name = c2m_proto::v1::FunnelStage::try_from(*stage)
                        .unwrap_or_default()
                        .as_str_name();
                    (name.to_owned(), *n)
                })
                .collect();
            counts.sort();
            SeriesRow {
                bucket,
                groups,
                counts,
                time_to_reply: rollup::durations(&tally.replies),
                time_to_first_response: rollup::durations(&tally.answers),
                repeats: tally.repeats(hours),
            }
        })
        .collect()
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
    /// One handoff's events, in time order.
    async fn handoff_events(
        &self,
        account_id: &str,
        handoff_id: &str,
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
    /// The funnel of the handoffs attempted in the query's period, read from the events, by
    /// bucket (of the attempt's local time) and groups: every event of a handoff counts in its
    /// attempt's row. A group's value is the handoff's (its ATTEMPTED event's), except the
    /// channel, which is the event's own when it has one (a fallback's stages count on the
    /// channel they happened on). An attempt's repeat gap is to the latest attempt of the same
    /// consumer (another handoff) strictly before it, if within [`rollup::MAX_REPEAT_HOURS`].
    async fn tallies(&self, query: &SeriesQuery) -> Result<Tallies, sqlx::Error>;
    /// Where the account's rollups in `zone` stand.
    async fn rollup_zone(
        &self,
        _account_id: &str,
        _zone: chrono_tz::Tz,
    ) -> Result<ZoneState, sqlx::Error> {
        Ok(ZoneState::Unsupported)
    }
    /// Asks for the account's rollups in `zone`: from now on every append keeps them, and
    /// [`EventStore::build_rollups`] tallies what was logged before. Its state after.
    async fn ask_zone(
        &self,
        _account_id: &str,
        _zone: chrono_tz::Tz,
    ) -> Result<ZoneState, sqlx::Error> {
        Ok(ZoneState::Unsupported)
    }
    /// The rollup rows of local days `[from, to)` in one grouping set ([`rollup::SETS`]):
    /// (day, first value, second value, tally).
    async fn rolled_up_days(
        &self,
        _account_id: &str,
        _zone: chrono_tz::Tz,
        _set: i16,
        _days: (NaiveDate, NaiveDate),
    ) -> Result<Vec<(NaiveDate, String, String, Tally)>, sqlx::Error> {
        Ok(Vec::new())
    }
    /// Makes the log's partitions for the months to come (from `now`) and, with a `horizon`,
    /// drops what is wholly before it: the rollups' days, and the events' months that end a
    /// repeat window ([`rollup::MAX_REPEAT_HOURS`]) before it, so that a period from the
    /// horizon on is answered as before. Queries are to start at the horizon.
    async fn maintain(
        &self,
        now: DateTime<Utc>,
        horizon: Option<DateTime<Utc>>,
    ) -> Result<Maintenance, sqlx::Error>;
    /// Tallies up to `limit` more attempts logged before a zone was asked for; how many (0 when
    /// no zone is building).
    async fn build_rollups(&self, _limit: i64) -> Result<u64, sqlx::Error> {
        Ok(0)
    }
    /// The query's rows: whole local days (and weeks made of them) from the rollups when the
    /// account's are ready in the query's zone, what is left of the period from the events.
    /// Asking for a zone without rollups asks for them, for the next query.
    async fn series(&self, q: &SeriesQuery) -> Result<Vec<SeriesRow>, sqlx::Error> {
        let zone = q.time_zone;
        let plan = match (q.bucket, rollup::set_of(&q.group_by)) {
            (Bucket::Day | Bucket::Week, Some(set)) => {
                let first = q.start.with_timezone(&zone).date_naive();
                let first = match start_of(zone, first) {
                    Some(t) if t < q.start => first.succ_opt(),
                    _ => Some(first),
                };
                let last = q.end.with_timezone(&zone).date_naive();
                first.filter(|first| *first < last).and_then(|first| {
                    Some((
                        first,
                        last,
                        start_of(zone, first)?,
                        start_of(zone, last)?,
                        set,
                    ))
                })
            }
            _ => None,
        };
        let Some((first, last, from, to, (set, swapped))) = plan else {
            return Ok(finish(q, self.tallies(q).await?));
        };
        match self.rollup_zone(&q.account_id, zone).await? {
            ZoneState::Ready => {}
            ZoneState::Absent => {
                self.ask_zone(&q.account_id, zone).await?;
                return Ok(finish(q, self.tallies(q).await?));
            }
            ZoneState::Building | ZoneState::Unsupported => {
                return Ok(finish(q, self.tallies(q).await?));
            }
        }
        let mut tallies = Tallies::new();
        let width = q.group_by.len();
        for (day, g1, g2, tally) in self
            .rolled_up_days(&q.account_id, zone, set, (first, last))
            .await?
        {
            let mut groups = vec![g1, g2];
            if swapped {
                groups.swap(0, 1);
            }
            groups.truncate(width);
            let bucket = q
                .bucket
                .truncate(day.and_hms_opt(0, 0, 0).unwrap_or_default());
            tallies.entry((bucket, groups)).or_default().merge(&tally);
        }
        for (start, end) in [(q.start, from), (to, q.end)] {
            if start < end {
                let edge = SeriesQuery {
                    start,
                    end,
                    ..q.clone()
                };
                for (key, tally) in self.tallies(&edge).await? {
                    tallies.entry(key).or_default().merge(&tally);
                }
            }
        }
        Ok(finish(q, tallies))
    }
    /// The events of up to `limit` handoffs attempted in `[start, end)` after `after` (an attempt
    /// time and handoff id), in attempt order and, within a handoff, in time order, each with its
    /// handoff's attempt time.
    async fn export_page(
        &self,
        account_id: &str,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        after: Option<&(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<(DateTime<Utc>, StoredEvent)>, sqlx::Error>;
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
    response_delay_ms, consumer_id";

/// [`LOGGED_COLUMNS`] for events that may have no position (recorded before positions were).
pub(crate) const ANY_EVENT_COLUMNS: &str = "coalesce(position, 0) AS position, event_id, stage, \
    occurred_at, handoff_id, handoff_config_id, channel, skill_id, conversation_id, ivr_number, \
    error_code, source, response_delay_ms, consumer_id";

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
            consumer_id: row.try_get("consumer_id")?,
        },
    ))
}

/// An export page's columns: the attempt's time, then [`LOGGED_COLUMNS`] of the event (`e`,
/// with 0 for a position it has none of).
pub(crate) const EXPORT_COLUMNS: &str = "page.attempted_at, coalesce(e.position, 0) AS position, \
    e.event_id, e.stage, e.occurred_at, e.handoff_id, e.handoff_config_id, e.channel, e.skill_id, \
    e.conversation_id, e.ivr_number, e.error_code, e.source, e.response_delay_ms, e.consumer_id";

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
        consumer_id: String::new(),
    }
}
