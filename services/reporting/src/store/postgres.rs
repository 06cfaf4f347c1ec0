//! [`EventStore`] on PostgreSQL.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{
    ANY_EVENT_COLUMNS, EXPORT_COLUMNS, EventStore, Grouping, LOGGED_COLUMNS, MAX_ASKED_ZONES,
    Maintenance, SeriesQuery, StoredEvent, Tallies, Tally, TransactionRow, ZoneState, logged_event,
    rollup::{self, Attempt, Rollup, Step},
    transaction_event,
};

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
    /// Zones every account's rollups are kept in from its first event.
    zones: Vec<Tz>,
}

impl PgEventStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            zones: Vec::new(),
        }
    }

    /// Keeps every account's rollups in `zones` (besides those queries ask for), from the
    /// account's next event on; what it logged before is tallied by the builder.
    pub fn rolling_up(mut self, zones: impl IntoIterator<Item = Tz>) -> Self {
        self.zones = zones.into_iter().collect();
        self
    }

    /// A transaction for a query over many events, with PostgreSQL's JIT off: compiling the
    /// plan took longer than running it in every such query measured (600 of 960 ms).
    async fn analytic(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        Ok(tx)
    }

    /// Tallies the new events of a batch (`new`, of `batch`) into the rollups of their
    /// accounts' zones, asking first for the configured zones an account is not kept in yet.
    async fn roll_up(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        batch: &[StoredEvent],
        new: &[&StoredEvent],
    ) -> Result<(), sqlx::Error> {
        let accounts: BTreeSet<&str> = new.iter().map(|e| e.account_id.as_str()).collect();
        if accounts.is_empty() {
            return Ok(());
        }
        let listed: Vec<&str> = accounts.iter().copied().collect();
        let mut zones: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (account_id, zone) in sqlx::query_as::<_, (String, String)>(
            "SELECT account_id, time_zone FROM funnel_zones WHERE account_id = ANY($1)",
        )
        .bind(&listed)
        .fetch_all(&mut **tx)
        .await?
        {
            zones.entry(account_id).or_default().push(zone);
        }
        for account_id in &accounts {
            let kept = zones.entry((*account_id).to_owned()).or_default();
            let missing: Vec<Tz> = self
                .zones
                .iter()
                .filter(|z| !kept.iter().any(|k| k == z.name()))
                .copied()
                .collect();
            if missing.is_empty() {
                continue;
            }
            // Split before this batch: its events are the append's, not the builder's.
            let head: i64 =
                sqlx::query_scalar("SELECT position FROM event_log_heads WHERE account_id = $1")
                    .bind(account_id)
                    .fetch_one(&mut **tx)
                    .await?;
            let taken = batch.iter().filter(|e| e.account_id == *account_id).count() as i64;
            register(tx, account_id, &missing, head - taken).await?;
            kept.extend(missing.iter().map(|z| z.name().to_owned()));
        }
        for (account_id, kept) in zones {
            if kept.is_empty() {
                continue;
            }
            let mine: Vec<&StoredEvent> = new
                .iter()
                .filter(|e| e.account_id == account_id && !e.handoff_id.is_empty())
                .copied()
                .collect();
            let handoffs: Vec<String> = mine
                .iter()
                .map(|e| e.handoff_id.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let attempts: Vec<AttemptRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {ATTEMPT_COLUMNS} FROM events WHERE account_id = $1 \
                     AND handoff_id = ANY($2) AND handoff_id <> '' \
                     AND stage = 'FUNNEL_STAGE_ATTEMPTED'"
            )))
            .bind(&account_id)
            .bind(&handoffs)
            .fetch_all(&mut **tx)
            .await?;
            let attempts: HashMap<String, Attempt> = attempts
                .into_iter()
                .map(|row| {
                    let a = attempt(row);
                    (a.handoff_id.clone(), a)
                })
                .collect();
            // A handoff attempted in this batch counts all its events now (those that came
            // before it waited for it); one attempted before counts only the new ones.
            let fresh: Vec<String> = mine
                .iter()
                .filter(|e| e.stage == "FUNNEL_STAGE_ATTEMPTED")
                .map(|e| e.handoff_id.clone())
                .collect();
            let mut steps = steps_of(&mut **tx, &account_id, &fresh, None).await?;
            steps.extend(
                mine.iter()
                    .filter(|e| !fresh.contains(&e.handoff_id))
                    .map(|e| step(e)),
            );
            // Repeat gaps: the new attempts', and those of the consumers' later attempts that
            // a new one now comes just before. Around each new attempt, its consumer's
            // attempts from the one before it to the one after it (within a repeat window) are
            // all `gap_changes` needs; a consumer called thousands of times costs no more.
            let consumers: Vec<&Attempt> = fresh
                .iter()
                .filter_map(|h| attempts.get(h))
                .filter(|a| !a.consumer_id.is_empty())
                .collect();
            let mut around: Vec<Attempt> = Vec::new();
            if !consumers.is_empty() {
                let rows: Vec<AttemptRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "WITH new AS (SELECT * FROM unnest($2::text[], $3::timestamptz[]) AS n(c, t)), \
                     bounds AS MATERIALIZED ( \
                         SELECT n.c, \
                             coalesce((SELECT occurred_at FROM events {of_consumer} \
                                 AND occurred_at < n.t AND occurred_at >= n.t - $4 * interval '1 hour' \
                                 ORDER BY occurred_at DESC LIMIT 1), n.t) AS lo, \
                             coalesce((SELECT occurred_at FROM events {of_consumer} \
                                 AND occurred_at > n.t AND occurred_at <= n.t + $4 * interval '1 hour' \
                                 ORDER BY occurred_at LIMIT 1), n.t) AS hi \
                         FROM new n) \
                     SELECT DISTINCT e.* FROM bounds b, LATERAL ( \
                         SELECT {ATTEMPT_COLUMNS} FROM events WHERE account_id = $1 \
                             AND stage = 'FUNNEL_STAGE_ATTEMPTED' AND consumer_id = b.c \
                             AND consumer_id <> '' AND handoff_id <> '' \
                             AND occurred_at >= b.lo AND occurred_at <= b.hi) e",
                    of_consumer = "WHERE account_id = $1 AND stage = 'FUNNEL_STAGE_ATTEMPTED' \
                        AND consumer_id = n.c AND consumer_id <> ''",
                )))
                .bind(&account_id)
                .bind(consumers.iter().map(|a| a.consumer_id.clone()).collect::<Vec<_>>())
                .bind(consumers.iter().map(|a| a.occurred_at).collect::<Vec<_>>())
                .bind(rollup::MAX_REPEAT_HOURS as f64)
                .fetch_all(&mut **tx)
                .await?;
                around = rows.into_iter().map(attempt).collect();
            }
            let mut by_consumer: BTreeMap<&str, Vec<&Attempt>> = BTreeMap::new();
            for a in &around {
                by_consumer
                    .entry(a.consumer_id.as_str())
                    .or_default()
                    .push(a);
            }
            for zone in kept {
                let zone_tz: Tz = zone.parse().unwrap_or(Tz::UTC);
                let mut tallied = Rollup::default();
                for s in &steps {
                    if let Some(attempt) = attempts.get(&s.handoff_id) {
                        tallied.add_step(zone_tz, attempt, s);
                    }
                }
                for list in by_consumer.values() {
                    let marked: Vec<_> = list
                        .iter()
                        .map(|a| {
                            (
                                a.occurred_at,
                                a.handoff_id.clone(),
                                fresh.contains(&a.handoff_id),
                            )
                        })
                        .collect();
                    for (i, from, to) in rollup::gap_changes(&marked) {
                        tallied.move_gap(zone_tz, list[i], from, to);
                    }
                }
                merge(tx, &account_id, &zone, tallied).await?;
            }
        }
        Ok(())
    }
}

/// The first instant of the UTC month `months` after the one `t` is in.
fn month_start(t: DateTime<Utc>, months: u32) -> DateTime<Utc> {
    use chrono::Datelike;

    let first = t
        .date_naive()
        .with_day(1)
        .and_then(|d| d.checked_add_months(chrono::Months::new(months)))
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .unwrap_or_default();
    first.and_utc()
}

/// The columns an [`AttemptRow`] is read from.
const ATTEMPT_COLUMNS: &str = "handoff_id, occurred_at, channel, handoff_config_id, skill_id, \
    ivr_number, consumer_id";

type AttemptRow = (
    String,
    DateTime<Utc>,
    String,
    String,
    String,
    String,
    String,
);

fn attempt(
    (handoff_id, occurred_at, channel, handoff_config_id, skill_id, ivr_number, consumer_id): AttemptRow,
) -> Attempt {
    Attempt {
        handoff_id,
        occurred_at,
        channel,
        handoff_config_id,
        skill_id,
        ivr_number,
        consumer_id,
    }
}

fn step(e: &StoredEvent) -> Step {
    Step {
        handoff_id: e.handoff_id.clone(),
        stage: rollup::stage_number(e.stage),
        occurred_at: e.occurred_at,
        channel: e.channel.to_owned(),
        response_delay_ms: e.response_delay_ms,
    }
}

/// Every event of `handoffs` (only those at or before `split`, when given).
async fn steps_of<'c>(
    db: impl sqlx::PgExecutor<'c>,
    account_id: &str,
    handoffs: &[String],
    split: Option<i64>,
) -> Result<Vec<Step>, sqlx::Error> {
    if handoffs.is_empty() {
        return Ok(Vec::new());
    }
    type StepRow = (String, String, DateTime<Utc>, String, Option<i64>);
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT handoff_id, stage, occurred_at, channel, response_delay_ms FROM events \
         WHERE account_id = $1 AND handoff_id = ANY($2) AND handoff_id <> '' \
             AND ($3::bigint IS NULL OR coalesce(position, 0) <= $3)",
    )
    .bind(account_id)
    .bind(handoffs)
    .bind(split)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(handoff_id, stage, occurred_at, channel, response_delay_ms)| Step {
                handoff_id,
                stage: rollup::stage_number(&stage),
                occurred_at,
                channel,
                response_delay_ms,
            },
        )
        .collect())
}

/// Records that the account's rollups are kept in `zones` from `split` on (the caller holds
/// the account's head). Whether there was nothing before to build (ready at once).
async fn register(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    zones: &[Tz],
    split: i64,
) -> Result<bool, sqlx::Error> {
    let before: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM events WHERE account_id = $1 AND position <= $2) \
             OR EXISTS (SELECT 1 FROM events WHERE account_id = $1 AND position IS NULL)",
    )
    .bind(account_id)
    .bind(split)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO funnel_zones (account_id, time_zone, split_position, ready) \
         SELECT $1, zone, $2, $3 FROM unnest($4::text[]) AS zone \
         ON CONFLICT (account_id, time_zone) DO NOTHING",
    )
    .bind(account_id)
    .bind(split)
    .bind(!before)
    .bind(zones.iter().map(|z| z.name()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(!before)
}

/// Adds `tallied` to the account's rows in `zone` (the caller holds the account's head).
async fn merge(
    tx: &mut Transaction<'_, Postgres>,
    account_id: &str,
    zone: &str,
    tallied: Rollup,
) -> Result<(), sqlx::Error> {
    if tallied.rows.is_empty() {
        return Ok(());
    }
    let mut rows = tallied.rows;
    let column = |f: fn(&rollup::Key) -> String, rows: &BTreeMap<rollup::Key, Tally>| {
        rows.keys().map(f).collect::<Vec<_>>()
    };
    let sets: Vec<i16> = rows.keys().map(|k| k.1).collect();
    let days: Vec<NaiveDate> = rows.keys().map(|k| k.0).collect();
    let (first, second) = (
        column(|k| k.2.clone(), &rows),
        column(|k| k.3.clone(), &rows),
    );
    // One primary-key lookup per row (OFFSET 0 keeps the planner from turning the lookups into
    // a scan of the account's rows, which it does while the table's statistics are young).
    let stored: Vec<(i16, NaiveDate, String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT d.grouping, d.day, d.group1, d.group2, d.tally \
         FROM unnest($3::smallint[], $4::date[], $5::text[], $6::text[]) \
                 AS k(grouping, day, group1, group2), \
             LATERAL (SELECT * FROM funnel_days d WHERE d.account_id = $1 AND d.time_zone = $2 \
                 AND d.grouping = k.grouping AND d.day = k.day AND d.group1 = k.group1 \
                 AND d.group2 = k.group2 OFFSET 0) d",
    )
    .bind(account_id)
    .bind(zone)
    .bind(&sets)
    .bind(&days)
    .bind(&first)
    .bind(&second)
    .fetch_all(&mut **tx)
    .await?;
    for (set, day, g1, g2, tally) in stored {
        if let Some(row) = rows.get_mut(&(day, set, g1, g2)) {
            row.merge(&Tally::decoded(&tally)?);
        }
    }
    sqlx::query(
        "INSERT INTO funnel_days (account_id, time_zone, grouping, day, group1, group2, tally) \
         SELECT $1, $2, * FROM unnest($3::smallint[], $4::date[], $5::text[], $6::text[], \
             $7::bytea[]) \
         ON CONFLICT (account_id, time_zone, grouping, day, group1, group2) \
         DO UPDATE SET tally = excluded.tally",
    )
    .bind(account_id)
    .bind(zone)
    .bind(&sets)
    .bind(&days)
    .bind(&first)
    .bind(&second)
    .bind(rows.values().map(Tally::encoded).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    Ok(())
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
        let mut tx = self.pool.begin().await?;
        let added: Vec<String> = sqlx::query_scalar(
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
             ON CONFLICT (event_id, occurred_at) DO NOTHING RETURNING event_id",
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
        .fetch_all(&mut *tx)
        .await?;
        // The rollups, in the same transaction, in statements that start after the heads were
        // taken: they see every event of the account committed before this one.
        let mut added: HashSet<String> = added.into_iter().collect();
        let new: Vec<&StoredEvent> = events
            .iter()
            .filter(|e| added.remove(&e.event_id))
            .collect();
        self.roll_up(&mut tx, events, &new).await?;
        tx.commit().await?;
        Ok(new.len() as u64)
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

    async fn tallies(&self, q: &SeriesQuery) -> Result<Tallies, sqlx::Error> {
        // The cohort (attempts in the period, each with its consumer's previous attempt) joined
        // to every event of its handoffs, binned and counted in the database; local buckets by
        // `date_trunc` of the attempt's local time. Bins as rollup::bin: a duration's bit
        // length less 8 is how many low bits it loses.
        let groups: String = q
            .group_by
            .iter()
            .enumerate()
            .map(|(i, g)| format!(", {}::text AS g{i}", g.series_column()))
            .collect();
        let keys: String = (0..q.group_by.len()).map(|i| format!(", g{i}")).collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "WITH cohort AS ( \
                 SELECT a.*, (SELECT max(p.occurred_at) FROM events p \
                     WHERE a.consumer_id <> '' AND p.account_id = a.account_id \
                         AND p.stage = 'FUNNEL_STAGE_ATTEMPTED' AND p.consumer_id = a.consumer_id AND p.consumer_id <> '' \
                         AND p.handoff_id <> a.handoff_id AND p.occurred_at < a.occurred_at \
                         AND p.occurred_at >= a.occurred_at - $6 * interval '1 hour') AS previous \
                 FROM events a \
                 WHERE a.account_id = $1 AND a.stage = 'FUNNEL_STAGE_ATTEMPTED' AND a.handoff_id <> '' \
                     AND a.occurred_at >= $2 AND a.occurred_at < $3), \
             steps AS ( \
                 SELECT date_trunc($4, a.occurred_at AT TIME ZONE $5) AS bucket{groups}, e.stage, \
                     CASE e.stage \
                         WHEN 'FUNNEL_STAGE_RESPONDED' THEN \
                             floor(extract(epoch FROM e.occurred_at - a.occurred_at) * 1000)::bigint \
                         WHEN 'FUNNEL_STAGE_ANSWERED' THEN e.response_delay_ms END AS ms, \
                     CASE WHEN e.stage = 'FUNNEL_STAGE_ATTEMPTED' AND a.previous IS NOT NULL THEN \
                         ceil(extract(epoch FROM a.occurred_at - a.previous) / 3600)::int END AS gap \
                 FROM cohort a JOIN events e ON e.account_id = a.account_id \
                     AND e.handoff_id = a.handoff_id AND e.handoff_id <> ''), \
             lost AS ( \
                 SELECT *, length(ltrim(ms::bit(64)::text, '0')) - 8 AS lost FROM steps), \
             binned AS ( \
                 SELECT *, CASE WHEN ms < {exact} THEN ms ELSE (ms >> lost) << lost END AS bin \
                 FROM lost) \
             SELECT bucket{keys}, stage, bin, gap, count(*) AS n \
             FROM binned GROUP BY bucket{keys}, stage, bin, gap",
            exact = rollup::EXACT_BELOW,
        )))
        .bind(&q.account_id)
        .bind(q.start)
        .bind(q.end)
        .bind(q.bucket.unit())
        .bind(q.time_zone.name())
        .bind(rollup::MAX_REPEAT_HOURS as f64)
        .fetch_all(&mut *self.analytic().await?)
        .await?;
        let mut tallies = Tallies::new();
        for row in &rows {
            let bucket: chrono::NaiveDateTime = row.try_get("bucket")?;
            let groups = (0..q.group_by.len())
                .map(|i| row.try_get::<String, _>(1 + i))
                .collect::<Result<Vec<_>, _>>()?;
            let stage: String = row.try_get("stage")?;
            let n: i64 = row.try_get("n")?;
            let tally = tallies.entry((bucket, groups)).or_default();
            let number = rollup::stage_number(&stage);
            *tally.stages.entry(number).or_default() += n;
            if let Some(bin) = row.try_get::<Option<i64>, _>("bin")? {
                let histogram = match stage.as_str() {
                    "FUNNEL_STAGE_RESPONDED" => &mut tally.replies,
                    _ => &mut tally.answers,
                };
                *histogram.entry(bin).or_default() += n;
            }
            if let Some(gap) = row.try_get::<Option<i32>, _>("gap")? {
                *tally.gaps.entry(gap).or_default() += n;
            }
        }
        Ok(tallies)
    }

    async fn rollup_zone(&self, account_id: &str, zone: Tz) -> Result<ZoneState, sqlx::Error> {
        let ready: Option<bool> = sqlx::query_scalar(
            "SELECT ready FROM funnel_zones WHERE account_id = $1 AND time_zone = $2",
        )
        .bind(account_id)
        .bind(zone.name())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match ready {
            None => ZoneState::Absent,
            Some(false) => ZoneState::Building,
            Some(true) => ZoneState::Ready,
        })
    }

    async fn ask_zone(&self, account_id: &str, zone: Tz) -> Result<ZoneState, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let asked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM funnel_zones WHERE account_id = $1")
                .bind(account_id)
                .fetch_one(&mut *tx)
                .await?;
        if asked >= MAX_ASKED_ZONES + self.zones.len() as i64 {
            return self.rollup_zone(account_id, zone).await;
        }
        // The head, taken (or made) and held until commit: no append is half done.
        let split: i64 = sqlx::query_scalar(
            "INSERT INTO event_log_heads AS h (account_id, position) VALUES ($1, 0) \
             ON CONFLICT (account_id) DO UPDATE SET position = h.position RETURNING position",
        )
        .bind(account_id)
        .fetch_one(&mut *tx)
        .await?;
        let ready = register(&mut tx, account_id, &[zone], split).await?;
        tx.commit().await?;
        Ok(if ready {
            ZoneState::Ready
        } else {
            self.rollup_zone(account_id, zone).await?
        })
    }

    async fn maintain(
        &self,
        now: DateTime<Utc>,
        horizon: Option<DateTime<Utc>>,
    ) -> Result<Maintenance, sqlx::Error> {
        let mut done = Maintenance::default();
        // Months from the end of the last one made to two after the current one, one
        // transaction each, under a lock of the schema's own (replicas take turns).
        let ends: DateTime<Utc> = sqlx::query_scalar("SELECT max(ends) FROM event_months")
            .fetch_one(&self.pool)
            .await?;
        let mut starts = ends;
        let until = month_start(now, 3);
        while starts < until {
            let ends = month_start(starts, 1);
            let name = format!("events_{}", starts.format("%Y_%m"));
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.event_months'))",
            )
            .execute(&mut *tx)
            .await?;
            let made: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_months WHERE name = $1)")
                    .bind(&name)
                    .fetch_one(&mut *tx)
                    .await?;
            if !made {
                // Events of the month that came before it was made wait in the default
                // partition; they move in with it.
                let range = format!(
                    "occurred_at >= '{}' AND occurred_at < '{}'",
                    starts.to_rfc3339(),
                    ends.to_rfc3339()
                );
                for statement in [
                    format!("CREATE TABLE {name} (LIKE events INCLUDING DEFAULTS)"),
                    format!("INSERT INTO {name} SELECT * FROM events_default WHERE {range}"),
                    format!("DELETE FROM events_default WHERE {range}"),
                    format!(
                        "ALTER TABLE events ATTACH PARTITION {name} FOR VALUES FROM ('{}') TO ('{}')",
                        starts.to_rfc3339(),
                        ends.to_rfc3339()
                    ),
                ] {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                        .execute(&mut *tx)
                        .await?;
                }
                sqlx::query("INSERT INTO event_months (name, starts, ends) VALUES ($1, $2, $3)")
                    .bind(&name)
                    .bind(starts)
                    .bind(ends)
                    .execute(&mut *tx)
                    .await?;
                done.months_made += 1;
            }
            tx.commit().await?;
            starts = ends;
        }
        let Some(horizon) = horizon else {
            return Ok(done);
        };
        // Whole months go once they end a repeat window before the horizon: a period from the
        // horizon on still finds every consumer's previous attempt. What is left before the
        // horizon is only hidden by it.
        let keep_from = horizon - chrono::Duration::hours(rollup::MAX_REPEAT_HOURS);
        let old: Vec<String> =
            sqlx::query_scalar("SELECT name FROM event_months WHERE ends <= $1 ORDER BY ends")
                .bind(keep_from)
                .fetch_all(&self.pool)
                .await?;
        for name in old {
            let mut tx = self.pool.begin().await?;
            sqlx::query(
                "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.event_months'))",
            )
            .execute(&mut *tx)
            .await?;
            let gone = sqlx::query("DELETE FROM event_months WHERE name = $1")
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            if gone.rows_affected() == 1 {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {name}")))
                    .execute(&mut *tx)
                    .await?;
                done.months_dropped += 1;
            }
            tx.commit().await?;
        }
        done.events_deleted = sqlx::query("DELETE FROM events_default WHERE occurred_at < $1")
            .bind(keep_from)
            .execute(&self.pool)
            .await?
            .rows_affected();
        // Rollup days wholly before the horizon, in each row's own zone.
        done.days_deleted = sqlx::query(
            "DELETE FROM funnel_days WHERE day < ($1::timestamptz AT TIME ZONE time_zone)::date",
        )
        .bind(horizon)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done)
    }

    async fn rolled_up_days(
        &self,
        account_id: &str,
        zone: Tz,
        set: i16,
        (from, to): (NaiveDate, NaiveDate),
    ) -> Result<Vec<(NaiveDate, String, String, Tally)>, sqlx::Error> {
        let rows: Vec<(NaiveDate, String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT day, group1, group2, tally FROM funnel_days \
             WHERE account_id = $1 AND time_zone = $2 AND grouping = $3 AND day >= $4 AND day < $5",
        )
        .bind(account_id)
        .bind(zone.name())
        .bind(set)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(day, g1, g2, tally)| Ok((day, g1, g2, Tally::decoded(&tally)?)))
            .collect()
    }

    async fn build_rollups(&self, limit: i64) -> Result<u64, sqlx::Error> {
        type Zone = (String, String, i64, Option<DateTime<Utc>>, String);
        let Some((account_id, zone_name, split, built_at, built_handoff)): Option<Zone> =
            sqlx::query_as(
                "SELECT account_id, time_zone, split_position, built_at, built_handoff \
                 FROM funnel_zones WHERE NOT ready ORDER BY asked_at LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(0);
        };
        let zone: Tz = zone_name.parse().unwrap_or(Tz::UTC);
        // The builder's part of the log: events at or before the split (or from before
        // positions were), which no append tallies for this zone. These never change, so they
        // are read without the head.
        let attempts: Vec<AttemptRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM events \
             WHERE account_id = $1 AND stage = 'FUNNEL_STAGE_ATTEMPTED' AND handoff_id <> '' \
                 AND coalesce(position, 0) <= $2 \
                 AND ($3::timestamptz IS NULL OR (occurred_at, handoff_id) > ($3, $4)) \
             ORDER BY occurred_at, handoff_id LIMIT $5"
        )))
        .bind(&account_id)
        .bind(split)
        .bind(built_at)
        .bind(&built_handoff)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let attempts: Vec<Attempt> = attempts.into_iter().map(attempt).collect();
        let handoffs: Vec<String> = attempts.iter().map(|a| a.handoff_id.clone()).collect();
        let steps = steps_of(&self.pool, &account_id, &handoffs, Some(split)).await?;
        let previous: Vec<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT a.handoff_id, (SELECT max(p.occurred_at) FROM events p \
                 WHERE p.account_id = $1 AND p.stage = 'FUNNEL_STAGE_ATTEMPTED' \
                     AND p.consumer_id = a.consumer_id AND p.consumer_id <> '' AND p.handoff_id <> a.handoff_id \
                     AND p.occurred_at < a.occurred_at \
                     AND p.occurred_at >= a.occurred_at - $5 * interval '1 hour' \
                     AND coalesce(p.position, 0) <= $2) \
             FROM unnest($3::text[], $4::text[], $6::timestamptz[]) AS a(handoff_id, consumer_id, occurred_at) \
             WHERE a.consumer_id <> ''",
        )
        .bind(&account_id)
        .bind(split)
        .bind(&handoffs)
        .bind(attempts.iter().map(|a| a.consumer_id.clone()).collect::<Vec<_>>())
        .bind(rollup::MAX_REPEAT_HOURS as f64)
        .bind(attempts.iter().map(|a| a.occurred_at).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        let by_handoff: HashMap<&str, &Attempt> = attempts
            .iter()
            .map(|a| (a.handoff_id.as_str(), a))
            .collect();
        let mut tallied = Rollup::default();
        for step in &steps {
            if let Some(attempt) = by_handoff.get(step.handoff_id.as_str()) {
                tallied.add_step(zone, attempt, step);
            }
        }
        for (handoff_id, previous) in previous {
            if let (Some(attempt), Some(previous)) = (by_handoff.get(handoff_id.as_str()), previous)
            {
                let gap = (attempt.occurred_at - previous).num_microseconds();
                tallied.move_gap(zone, attempt, None, gap.and_then(rollup::gap_hours));
            }
        }
        let done = attempts.len() < usize::try_from(limit).unwrap_or(usize::MAX);
        let (next_at, next_handoff) = attempts
            .last()
            .map_or((built_at, built_handoff.clone()), |a| {
                (Some(a.occurred_at), a.handoff_id.clone())
            });
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM event_log_heads WHERE account_id = $1 FOR UPDATE")
            .bind(&account_id)
            .execute(&mut *tx)
            .await?;
        // Another builder may have taken the same chunk: only the one that moves the cursor
        // from where both read it tallies it.
        let moved = sqlx::query(
            "UPDATE funnel_zones SET built_at = $3, built_handoff = $4, ready = $5 \
             WHERE account_id = $1 AND time_zone = $2 AND built_at IS NOT DISTINCT FROM $6 \
                 AND built_handoff = $7 \
                 AND NOT ready",
        )
        .bind(&account_id)
        .bind(&zone_name)
        .bind(next_at)
        .bind(&next_handoff)
        .bind(done)
        .bind(built_at)
        .bind(&built_handoff)
        .execute(&mut *tx)
        .await?;
        if moved.rows_affected() == 0 {
            return Ok(0);
        }
        merge(&mut tx, &account_id, &zone_name, tallied).await?;
        tx.commit().await?;
        Ok(attempts.len().max(1) as u64)
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
        .fetch_all(&mut *self.analytic().await?)
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
        .fetch_all(&mut *self.analytic().await?)
        .await
    }
}
