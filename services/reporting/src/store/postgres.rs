//! [`EventStore`] on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use std::collections::BTreeMap;

use super::{
    ANY_EVENT_COLUMNS, Durations, EXPORT_COLUMNS, EventStore, Grouping, LOGGED_COLUMNS,
    SeriesQuery, SeriesRow, StoredEvent, TransactionRow, logged_event, transaction_event,
};

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
    async fn transactions(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows: Vec<TransactionRow> = sqlx::query_as(
            "WITH page AS ( \
                   SELECT handoff_id FROM events \
                   WHERE account_id = $1 AND handoff_id > $4 AND handoff_id <> '' \
                   GROUP BY handoff_id HAVING min(occurred_at) >= $2 AND min(occurred_at) < $3 \
                   ORDER BY handoff_id LIMIT $5) \
                 SELECT e.event_id, e.stage, e.occurred_at, e.handoff_id, e.channel, e.skill_id, \
                        e.conversation_id, e.error_code, e.source \
                 FROM events e JOIN page USING (handoff_id) WHERE e.account_id = $1 \
                 ORDER BY e.handoff_id, e.occurred_at, e.event_id",
        )
        .bind(account_id)
        .bind(start)
        .bind(end)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| transaction_event(account_id, row))
            .collect())
    }

    async fn handoff_events(
        &self,
        account_id: &str,
        handoff_id: &str,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ANY_EVENT_COLUMNS} FROM events \
             WHERE account_id = $1 AND handoff_id = $2 AND handoff_id <> '' \
             ORDER BY occurred_at, event_id"
        )))
        .bind(account_id)
        .bind(handoff_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok(logged_event(row, account_id, row.try_get("occurred_at")?)?.1))
            .collect()
    }

    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error> {
        let column = |f: fn(&StoredEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        // Each account's head moves by its share of the batch (heads taken in account order, so
        // two batches never wait on each other's heads in a cycle), and its events take the
        // positions in between, in the batch's order.
        let done = sqlx::query(
            "WITH batch AS ( \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], \
                     $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                     $11::text[], $12::text[], $13::bigint[], $14::text[]) WITH ORDINALITY \
                 AS e(event_id, account_id, stage, occurred_at, handoff_id, handoff_config_id, \
                     channel, skill_id, conversation_id, ivr_number, error_code, source, \
                     response_delay_ms, consumer_id, n)), \
             shares AS (SELECT account_id, count(*) AS taken FROM batch GROUP BY account_id), \
             heads AS ( \
                 INSERT INTO event_log_heads AS h (account_id, position) \
                 SELECT account_id, taken FROM shares ORDER BY account_id \
                 ON CONFLICT (account_id) DO UPDATE SET position = h.position + excluded.position \
                 RETURNING account_id, position) \
             INSERT INTO events (event_id, account_id, stage, occurred_at, handoff_id, \
                 handoff_config_id, channel, skill_id, conversation_id, ivr_number, error_code, \
                 source, response_delay_ms, consumer_id, position) \
             SELECT b.event_id, b.account_id, b.stage, b.occurred_at, b.handoff_id, \
                 b.handoff_config_id, b.channel, b.skill_id, b.conversation_id, b.ivr_number, \
                 b.error_code, b.source, b.response_delay_ms, b.consumer_id, \
                 heads.position - shares.taken \
                     + row_number() OVER (PARTITION BY b.account_id ORDER BY b.n) \
             FROM batch b JOIN shares USING (account_id) JOIN heads USING (account_id) \
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
        .bind(
            events
                .iter()
                .map(|e| e.response_delay_ms)
                .collect::<Vec<_>>(),
        )
        .bind(column(|e| e.consumer_id.clone()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn events_after(
        &self,
        account_id: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<(i64, StoredEvent)>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {LOGGED_COLUMNS} FROM events \
             WHERE account_id = $1 AND position > $2 ORDER BY position LIMIT $3"
        )))
        .bind(account_id)
        .bind(position)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| logged_event(row, account_id, row.try_get("occurred_at")?))
            .collect()
    }

    async fn position_before(
        &self,
        account_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT min(position) - 1 FROM events \
             WHERE account_id = $1 AND occurred_at >= $2 AND position IS NOT NULL",
        )
        .bind(account_id)
        .bind(since)
        .fetch_one(&self.pool)
        .await
    }

    async fn series(&self, q: &SeriesQuery) -> Result<Vec<SeriesRow>, sqlx::Error> {
        // The cohort (attempts in the period) joined to every event of its handoffs, counted
        // and timed in the database; local buckets by `date_trunc` of the attempt's local time.
        let groups: String = q
            .group_by
            .iter()
            .map(|g| format!(", {}::text", g.series_column()))
            .collect();
        let keys: String = (0..q.group_by.len())
            .map(|i| format!(", {}", i + 2))
            .collect();
        let cohort = "FROM events a JOIN events e \
                 ON e.account_id = a.account_id AND e.handoff_id = a.handoff_id AND e.handoff_id <> '' \
             WHERE a.account_id = $1 AND a.stage = 'FUNNEL_STAGE_ATTEMPTED' AND a.handoff_id <> '' \
                 AND a.occurred_at >= $2 AND a.occurred_at < $3";
        let bucket = "date_trunc($4, a.occurred_at AT TIME ZONE $5)";
        let counts = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {bucket} AS bucket{groups}, e.stage, count(*) AS n {cohort} \
             GROUP BY 1{keys}, e.stage"
        )))
        .bind(&q.account_id)
        .bind(q.start)
        .bind(q.end)
        .bind(q.bucket.unit())
        .bind(q.time_zone.name())
        .fetch_all(&self.pool)
        .await?;
        let reply_ms = "floor(extract(epoch FROM e.occurred_at - a.occurred_at) * 1000)::bigint";
        let percentiles = |value: &str, stage: &str| {
            [0.5, 0.9, 0.99]
                .iter()
                .map(|p| {
                    format!(
                        ", percentile_disc({p}) WITHIN GROUP (ORDER BY {value}) \
                         FILTER (WHERE e.stage = '{stage}' AND {value} IS NOT NULL)"
                    )
                })
                .collect::<String>()
        };
        let durations = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {bucket} AS bucket{groups}, \
                 count(*) FILTER (WHERE e.stage = 'FUNNEL_STAGE_RESPONDED') AS replies \
                 {reply}, \
                 count(*) FILTER (WHERE e.stage = 'FUNNEL_STAGE_ANSWERED' \
                     AND e.response_delay_ms IS NOT NULL) AS answers \
                 {answer} \
             {cohort} AND e.stage IN ('FUNNEL_STAGE_RESPONDED', 'FUNNEL_STAGE_ANSWERED') \
             GROUP BY 1{keys}",
            reply = percentiles(reply_ms, "FUNNEL_STAGE_RESPONDED"),
            answer = percentiles("e.response_delay_ms", "FUNNEL_STAGE_ANSWERED"),
        )))
        .bind(&q.account_id)
        .bind(q.start)
        .bind(q.end)
        .bind(q.bucket.unit())
        .bind(q.time_zone.name())
        .fetch_all(&self.pool)
        .await?;
        // Attempts whose consumer was attempted before, within the window (the grouping's
        // channel is the attempt's own: `e` is the attempt here).
        let repeat_groups: String = q
            .group_by
            .iter()
            .map(|g| format!(", {}::text", g.series_column()))
            .collect();
        let repeats = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {bucket} AS bucket{repeat_groups}, count(*) AS repeats \
             FROM events a, LATERAL (SELECT a.channel) e \
             WHERE a.account_id = $1 AND a.stage = 'FUNNEL_STAGE_ATTEMPTED' AND a.handoff_id <> '' \
                 AND a.occurred_at >= $2 AND a.occurred_at < $3 AND a.consumer_id <> '' \
                 AND EXISTS (SELECT 1 FROM events p \
                     WHERE p.account_id = a.account_id AND p.stage = 'FUNNEL_STAGE_ATTEMPTED' \
                         AND p.consumer_id = a.consumer_id AND p.handoff_id <> a.handoff_id \
                         AND p.occurred_at < a.occurred_at \
                         AND p.occurred_at >= a.occurred_at - $6 * interval '1 millisecond') \
             GROUP BY 1{keys}"
        )))
        .bind(&q.account_id)
        .bind(q.start)
        .bind(q.end)
        .bind(q.bucket.unit())
        .bind(q.time_zone.name())
        .bind(q.repeat_window.num_milliseconds() as f64)
        .fetch_all(&self.pool)
        .await?;
        let width = q.group_by.len();
        let key = |row: &sqlx::postgres::PgRow| -> Result<_, sqlx::Error> {
            let bucket: chrono::NaiveDateTime = row.try_get("bucket")?;
            let groups = (0..width)
                .map(|i| row.try_get::<String, _>(1 + i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((bucket, groups))
        };
        let mut rows: BTreeMap<(chrono::NaiveDateTime, Vec<String>), SeriesRow> = BTreeMap::new();
        for row in &counts {
            let (bucket, groups) = key(row)?;
            rows.entry((bucket, groups.clone()))
                .or_insert_with(|| SeriesRow {
                    bucket,
                    groups,
                    counts: Vec::new(),
                    time_to_reply: Durations::default(),
                    time_to_first_response: Durations::default(),
                    repeats: 0,
                })
                .counts
                .push((row.try_get("stage")?, row.try_get("n")?));
        }
        for row in &durations {
            let Some(series) = rows.get_mut(&key(row)?) else {
                continue;
            };
            let at = |i: usize| -> Result<i64, sqlx::Error> {
                Ok(row
                    .try_get::<Option<i64>, _>(1 + width + i)?
                    .unwrap_or_default())
            };
            let count = |name: &str| -> Result<u64, sqlx::Error> {
                Ok(u64::try_from(row.try_get::<i64, _>(name)?).unwrap_or_default())
            };
            series.time_to_reply = Durations {
                count: count("replies")?,
                p50: at(1)?,
                p90: at(2)?,
                p99: at(3)?,
            };
            series.time_to_first_response = Durations {
                count: count("answers")?,
                p50: at(5)?,
                p90: at(6)?,
                p99: at(7)?,
            };
        }
        for row in &repeats {
            if let Some(series) = rows.get_mut(&key(row)?) {
                series.repeats =
                    u64::try_from(row.try_get::<i64, _>("repeats")?).unwrap_or_default();
            }
        }
        Ok(rows
            .into_values()
            .map(|mut row| {
                row.counts.sort();
                row
            })
            .collect())
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
                 WHERE account_id = $1 AND stage = 'FUNNEL_STAGE_ATTEMPTED' AND handoff_id <> '' \
                     AND occurred_at >= $2 AND occurred_at < $3 \
                     AND (occurred_at, handoff_id) > ($4, $5) \
                 ORDER BY occurred_at, handoff_id LIMIT $6) \
             SELECT {EXPORT_COLUMNS} FROM page \
                 JOIN events e ON e.account_id = $1 AND e.handoff_id = page.handoff_id AND e.handoff_id <> '' \
             ORDER BY page.attempted_at, page.handoff_id, e.occurred_at, e.event_id"
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .bind(after_at)
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let (_, event) = logged_event(row, account_id, row.try_get("occurred_at")?)?;
                Ok((row.try_get("attempted_at")?, event))
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
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {group}::text, \
                 percentile_disc(0.5) WITHIN GROUP (ORDER BY response_delay_ms), \
                 percentile_disc(0.9) WITHIN GROUP (ORDER BY response_delay_ms) \
             FROM events WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                 AND stage = 'FUNNEL_STAGE_ANSWERED' AND response_delay_ms IS NOT NULL \
             GROUP BY 1 ORDER BY 1",
            group = grouping.column()
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
    }

    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        let group = grouping.column();
        // A handoff's events come from three services through three outboxes, so the gateway's
        // DELIVERED can arrive before Handoff's SENT. An event about a handoff is counted once
        // Handoff's own events for it (its ATTEMPTED, written with its SENT or its refusal) are
        // here: no funnel shows a later stage of a handoff without its earlier ones.
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {group}::text, stage, count(*) FROM events e \
             WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                 AND (handoff_id = '' OR stage = 'FUNNEL_STAGE_ATTEMPTED' OR EXISTS ( \
                     SELECT 1 FROM events a WHERE a.handoff_id <> '' AND a.handoff_id = e.handoff_id \
                         AND a.stage = 'FUNNEL_STAGE_ATTEMPTED')) \
             GROUP BY 1, 2 ORDER BY 1, 2"
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
    }
}
