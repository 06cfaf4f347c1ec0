//! [`EventStore`] on SQLite: the embedded default's event log, one file, the same answers as
//! PostgreSQL's (the conformance suite checks both). Times are integer microseconds.

use async_trait::async_trait;
use c2m_storage::sqlite::{micros, time};
use chrono::{DateTime, Utc};
use sqlx::{Row, SqlitePool, migrate::Migrator};

use super::{
    ANY_EVENT_COLUMNS, EXPORT_COLUMNS, EventStore, Grouping, LOGGED_COLUMNS, Maintenance,
    SeriesQuery, StoredEvent, Tallies, logged_event, percentile_disc, rollup, transaction_event,
};

/// The SQLite schema's migrations (`migrations-sqlite/`).
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations-sqlite");

#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    pool: SqlitePool,
}

impl SqliteEventStore {
    /// The store over `pool`, its migrations applied.
    pub async fn new(pool: SqlitePool) -> Result<Self, sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn transactions(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        type Row = (
            String,
            String,
            i64,
            String,
            String,
            String,
            String,
            String,
            String,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "WITH page AS ( \
                   SELECT handoff_id FROM events \
                   WHERE account_id = ?1 AND handoff_id > ?4 AND handoff_id <> '' \
                   GROUP BY handoff_id HAVING min(occurred_at) >= ?2 AND min(occurred_at) < ?3 \
                   ORDER BY handoff_id LIMIT ?5) \
                 SELECT e.event_id, e.stage, e.occurred_at, e.handoff_id, e.channel, e.skill_id, \
                        e.conversation_id, e.error_code, e.source \
                 FROM events e JOIN page USING (handoff_id) WHERE e.account_id = ?1 \
                 ORDER BY e.handoff_id, e.occurred_at, e.event_id",
        )
        .bind(account_id)
        .bind(micros(start))
        .bind(micros(end))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, stage, at, handoff, channel, skill, conversation, code, source)| {
                    let row = (
                        id,
                        stage,
                        time(at),
                        handoff,
                        channel,
                        skill,
                        conversation,
                        code,
                        source,
                    );
                    transaction_event(account_id, row)
                },
            )
            .collect())
    }

    async fn handoff_events(
        &self,
        account_id: &str,
        handoff_id: &str,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ANY_EVENT_COLUMNS} FROM events \
             WHERE account_id = ?1 AND handoff_id = ?2 AND handoff_id <> '' \
             ORDER BY occurred_at, event_id"
        )))
        .bind(account_id)
        .bind(handoff_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(logged_event(row, account_id, time(row.try_get("occurred_at")?))?.1))
            .collect()
    }

    /// One transaction for the batch: the events are counted once each, whoever sent them twice.
    /// Each takes its account's next position, as in PostgreSQL (a re-sent one burns it).
    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut new = 0;
        for e in events {
            let position: i64 = sqlx::query_scalar(
                "INSERT INTO event_log_heads AS h (account_id, position) VALUES (?1, 1) \
                 ON CONFLICT (account_id) DO UPDATE SET position = h.position + 1 \
                 RETURNING position",
            )
            .bind(&e.account_id)
            .fetch_one(&mut *tx)
            .await?;
            let done = sqlx::query(
                "INSERT INTO events (event_id, account_id, stage, occurred_at, handoff_id, \
                 handoff_config_id, channel, skill_id, conversation_id, ivr_number, error_code, \
                 source, response_delay_ms, position, consumer_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(&e.event_id)
            .bind(&e.account_id)
            .bind(e.stage)
            .bind(micros(e.occurred_at))
            .bind(&e.handoff_id)
            .bind(&e.handoff_config_id)
            .bind(e.channel)
            .bind(&e.skill_id)
            .bind(&e.conversation_id)
            .bind(&e.ivr_number)
            .bind(&e.error_code)
            .bind(&e.source)
            .bind(e.response_delay_ms)
            .bind(position)
            .bind(&e.consumer_id)
            .execute(&mut *tx)
            .await?;
            new += done.rows_affected();
        }
        tx.commit().await?;
        Ok(new)
    }

    async fn events_after(
        &self,
        account_id: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StoredEvent)>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LOGGED_COLUMNS} FROM events \
             WHERE account_id = ?1 AND position > ?2 ORDER BY position LIMIT ?3"
        )))
        .bind(account_id)
        .bind(position)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| logged_event(row, account_id, time(row.try_get("occurred_at")?)))
            .collect()
    }

    async fn position_before(
        &self,
        account_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT min(position) - 1 FROM events \
             WHERE account_id = ?1 AND occurred_at >= ?2 AND position IS NOT NULL",
        )
        .bind(account_id)
        .bind(micros(since))
        .fetch_one(&self.pool)
        .await
    }

    async fn tallies(&self, q: &SeriesQuery) -> Result<Tallies, sqlx::Error> {
        // SQLite knows no time zones: the cohort's events come here and are bucketed in Rust,
        // as PostgreSQL's `date_trunc(unit, t AT TIME ZONE tz)` would.
        let columns: Vec<String> = q
            .group_by
            .iter()
            .map(|g| format!("CAST({} AS TEXT)", g.series_column()))
            .collect();
        let groups = if columns.is_empty() {
            String::new()
        } else {
            format!(", {}", columns.join(", "))
        };
        // Repeat gaps: attempts (from the longest window before the period on) by consumer, in
        // time order; an attempt's gap is to the consumer's latest one strictly before it.
        let window = chrono::Duration::hours(rollup::MAX_REPEAT_HOURS)
            .num_microseconds()
            .unwrap_or(i64::MAX);
        let attempts: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT consumer_id, handoff_id, occurred_at FROM events \
             WHERE account_id = ?1 AND stage = 'FUNNEL_STAGE_ATTEMPTED' AND consumer_id <> '' \
                 AND handoff_id <> '' AND occurred_at >= ?2 AND occurred_at < ?3 \
             ORDER BY consumer_id, occurred_at, handoff_id",
        )
        .bind(&q.account_id)
        .bind(micros(q.start).saturating_sub(window))
        .bind(micros(q.end))
        .fetch_all(&self.pool)
        .await?;
        let mut gaps: std::collections::HashMap<&str, i32> = std::collections::HashMap::new();
        for consumer in attempts.chunk_by(|a, b| a.0 == b.0) {
            let (mut earlier, mut at_previous): (Option<i64>, Option<i64>) = (None, None);
            for (_, handoff_id, at) in consumer {
                if at_previous.is_some_and(|p| p < *at) {
                    earlier = at_previous;
                }
                if let Some(hours) = earlier.and_then(|e| rollup::gap_hours(at - e)) {
                    gaps.insert(handoff_id, hours);
                }
                at_previous = Some(*at);
            }
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT a.occurred_at AS attempted_at, e.stage, e.occurred_at, e.response_delay_ms, \
                 e.handoff_id \
                 {groups} \
             FROM events a JOIN events e ON e.account_id = a.account_id AND e.handoff_id = a.handoff_id AND e.handoff_id <> '' \
             WHERE a.account_id = ?1 AND a.stage = 'FUNNEL_STAGE_ATTEMPTED' AND a.handoff_id <> '' \
                 AND a.occurred_at >= ?2 AND a.occurred_at < ?3"
        )))
        .bind(&q.account_id)
        .bind(micros(q.start))
        .bind(micros(q.end))
        .fetch_all(&self.pool)
        .await?;
        let mut tallies = Tallies::new();
        for row in rows {
            let attempted: i64 = row.try_get("attempted_at")?;
            let local = time(attempted).with_timezone(&q.time_zone).naive_local();
            let stage: String = row.try_get("stage")?;
            let groups = (0..q.group_by.len())
                .map(|i| row.try_get::<String, _>(5 + i))
                .collect::<Result<_, _>>()?;
            let tally = tallies
                .entry((q.bucket.truncate(local), groups))
                .or_default();
            let number = rollup::stage_number(&stage);
            *tally.stages.entry(number).or_default() += 1;
            match stage.as_str() {
                "FUNNEL_STAGE_RESPONDED" => {
                    let at: i64 = row.try_get("occurred_at")?;
                    let ms = (at - attempted).div_euclid(1000);
                    *tally.replies.entry(rollup::bin(ms)).or_default() += 1;
                }
                "FUNNEL_STAGE_ANSWERED" => {
                    if let Some(ms) = row.try_get::<Option<i64>, _>("response_delay_ms")? {
                        *tally.answers.entry(rollup::bin(ms)).or_default() += 1;
                    }
                }
                "FUNNEL_STAGE_ATTEMPTED" => {
                    let handoff_id: String = row.try_get("handoff_id")?;
                    if let Some(hours) = gaps.get(handoff_id.as_str()) {
                        *tally.gaps.entry(*hours).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        Ok(tallies)
    }

    async fn maintain(
        &self,
        _now: DateTime<Utc>,
        horizon: Option<DateTime<Utc>>,
    ) -> Result<Maintenance, sqlx::Error> {
        // One file, no partitions: what is before the horizon is deleted.
        let Some(horizon) = horizon else {
            return Ok(Maintenance::default());
        };
        let deleted = sqlx::query("DELETE FROM events WHERE occurred_at < ?1")
            .bind(micros(horizon))
            .execute(&self.pool)
            .await?;
        Ok(Maintenance {
            events_deleted: deleted.rows_affected(),
            ..Maintenance::default()
        })
    }

    async fn export_page(
        &self,
        account_id: &str,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        after: Option<&(DateTime<Utc>, String)>,
        limit: i64,
    ) -> Result<Vec<(DateTime<Utc>, StoredEvent)>, sqlx::Error> {
        let (after_at, after_id) = after.cloned().unwrap_or((start, String::new()));
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH page AS ( \
                 SELECT occurred_at AS attempted_at, handoff_id FROM events \
                 WHERE account_id = ?1 AND stage = 'FUNNEL_STAGE_ATTEMPTED' AND handoff_id <> '' \
                     AND occurred_at >= ?2 AND occurred_at < ?3 \
                     AND (occurred_at, handoff_id) > (?4, ?5) \
                 ORDER BY occurred_at, handoff_id LIMIT ?6) \
             SELECT {EXPORT_COLUMNS} FROM page \
                 JOIN events e ON e.account_id = ?1 AND e.handoff_id = page.handoff_id AND e.handoff_id <> '' \
             ORDER BY page.attempted_at, page.handoff_id, e.occurred_at, e.event_id"
        )))
        .bind(account_id)
        .bind(micros(start))
        .bind(micros(end))
        .bind(micros(after_at))
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let (_, event) = logged_event(row, account_id, time(row.try_get("occurred_at")?))?;
                Ok((time(row.try_get("attempted_at")?), event))
            })
            .collect()
    }

    async fn first_responses(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        // SQLite has no percentile aggregate: the delays come sorted, by group, and are read here.
        let delays: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT CAST({group} AS TEXT), response_delay_ms \
             FROM events WHERE account_id = ?1 AND occurred_at >= ?2 AND occurred_at < ?3 \
                 AND stage = 'FUNNEL_STAGE_ANSWERED' AND response_delay_ms IS NOT NULL \
             ORDER BY 1, 2",
            group = grouping.column()
        )))
        .bind(account_id)
        .bind(micros(start))
        .bind(micros(end))
        .fetch_all(&self.pool)
        .await?;
        let mut rows = Vec::new();
        for group in delays.chunk_by(|a, b| a.0 == b.0) {
            let sorted: Vec<i64> = group.iter().map(|(_, delay)| *delay).collect();
            rows.push((
                group[0].0.clone(),
                percentile_disc(&sorted, 0.5),
                percentile_disc(&sorted, 0.9),
            ));
        }
        Ok(rows)
    }

    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        // Counted as in PostgreSQL: an event about a handoff once its ATTEMPTED is here.
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT CAST({group} AS TEXT), stage, count(*) FROM events e \
             WHERE account_id = ?1 AND occurred_at >= ?2 AND occurred_at < ?3 \
                 AND (handoff_id = '' OR stage = 'FUNNEL_STAGE_ATTEMPTED' OR EXISTS ( \
                     SELECT 1 FROM events a WHERE a.handoff_id <> '' AND a.handoff_id = e.handoff_id \
                         AND a.stage = 'FUNNEL_STAGE_ATTEMPTED')) \
             GROUP BY 1, 2 ORDER BY 1, 2",
            group = grouping.column()
        )))
        .bind(account_id)
        .bind(micros(start))
        .bind(micros(end))
        .fetch_all(&self.pool)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::percentile_disc;

    /// PostgreSQL's answers for the same values (`percentile_disc(p) WITHIN GROUP (ORDER BY v)`).
    #[test]
    fn percentiles_are_postgresqls_discrete_ones() {
        assert_eq!(percentile_disc(&[7], 0.5), 7);
        assert_eq!(percentile_disc(&[1, 2], 0.5), 1);
        assert_eq!(percentile_disc(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile_disc(&[1, 2, 3, 4], 0.9), 4);
        let ten: Vec<i64> = (1..=10).collect();
        assert_eq!(percentile_disc(&ten, 0.9), 9);
        assert_eq!(percentile_disc(&ten, 0.5), 5);
    }
}
