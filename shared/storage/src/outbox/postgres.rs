//! Outbox rows in a service's PostgreSQL schema. A batch is taken out inside a transaction
//! (`DELETE … RETURNING` of locked rows) that commits once the destination has them, or rolls
//! back to put them back; replicas share an outbox by skipping each other's locked rows.
//!
//! **Where a relay starts looking.** A shipped row leaves a dead entry in the primary key's index
//! until the table is vacuumed, and a scan from the start of the index steps over every one of
//! them: measured with no vacuum, 9.9 ms a batch after 650,000 rows had been through. So a relay
//! starts at a *floor*: a sequence number below which no committed row waits. It is not simply
//! past the last row shipped: a transaction can take its number and commit after rows numbered
//! later have been shipped. It is the lower of
//! - the first row its last look found (nothing committed waited before it), and
//! - one past the sequence's value [`Timings::late`] ago: a number taken before then is a
//!   transaction that has committed or rolled back by now, if no transaction writing an outbox
//!   runs longer than that (each is one batch's statement).
//!
//! Whatever breaks that bound, and rows a relay skipped past while another held them and then
//! put back (it died, or its destination refused), are found by a look from the start every
//! [`Timings::full_pass`].

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use sqlx::{Postgres, Transaction};

use super::{Batch, OutboxRows, Taken, Window};
use crate::postgres::ServiceDb;

/// How far a relay trusts its floor; see the module's documentation.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// The longest a transaction that writes an outbox row is taken to run.
    pub late: Duration,
    /// How often a relay looks from the start of the table all the same.
    pub full_pass: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            late: Duration::from_secs(5),
            full_pass: Duration::from_secs(5),
        }
    }
}

/// How often the sequence's value is read for the floor.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// An outbox's rows in PostgreSQL, with where its relay starts looking.
#[derive(Debug)]
pub struct PgOutbox {
    db: ServiceDb,
    timings: Timings,
    floors: Mutex<HashMap<&'static str, Floor>>,
}

/// Where one table's relay starts looking, and what that rests on.
#[derive(Debug)]
struct Floor {
    /// No committed row waits below this sequence number.
    seq: i64,
    /// The sequence's value, read at a time (taken after the read came back), oldest first.
    samples: VecDeque<(Instant, i64)>,
    /// When a look last started from the beginning.
    full_at: Option<Instant>,
}

impl PgOutbox {
    pub fn new(db: ServiceDb) -> Self {
        Self::with_timings(db, Timings::default())
    }

    pub fn with_timings(db: ServiceDb, timings: Timings) -> Self {
        Self {
            db,
            timings,
            floors: Mutex::default(),
        }
    }

    /// Where the relay of `table` starts its next look (unless a look from the start is due).
    pub fn floor(&self, table: &'static str) -> i64 {
        self.floors().get(table).map_or(0, |f| f.seq)
    }

    fn floors(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Floor>> {
        self.floors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a look at `table` starting now begins, whether it is due a sample of the sequence,
    /// and the sequence's value `late` ago (a number above it may not have committed yet).
    fn start(&self, table: &'static str, now: Instant) -> (i64, bool, Option<i64>) {
        let mut floors = self.floors();
        let floor = floors.entry(table).or_insert(Floor {
            seq: 0,
            samples: VecDeque::new(),
            full_at: None,
        });
        let full = floor
            .full_at
            .is_none_or(|at| now.duration_since(at) >= self.timings.full_pass);
        if full {
            floor.full_at = Some(now);
        }
        let due = floor
            .samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= SAMPLE_EVERY);
        // Keep the newest sample old enough, and the ones after it.
        while floor
            .samples
            .get(1)
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.timings.late)
        {
            floor.samples.pop_front();
        }
        let settled = floor
            .samples
            .front()
            .filter(|(at, _)| now.duration_since(*at) >= self.timings.late)
            .map(|(_, seq)| *seq);
        (if full { 0 } else { floor.seq }, due, settled)
    }

    /// After a look from `from` that found `first` as its first row (or nothing): no committed
    /// row waits below the lower of it and one past `settled`.
    fn looked(&self, table: &'static str, from: i64, first: Option<i64>, settled: Option<i64>) {
        let Some(settled) = settled else { return };
        let seen = first.unwrap_or(i64::MAX).min(settled.saturating_add(1));
        if let Some(floor) = self.floors().get_mut(table) {
            floor.seq = from.max(seen);
        }
    }

    /// Reads the sequence of `table`'s `seq` now.
    async fn sample(&self, table: &'static str) -> Result<(), sqlx::Error> {
        let value: Option<i64> = sqlx::query_scalar(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence($1, 'seq')::regclass)",
        )
        .bind(table)
        .fetch_one(self.db.pool())
        .await?;
        let at = Instant::now();
        if let Some(floor) = self.floors().get_mut(table) {
            floor.samples.push_back((at, value.unwrap_or(0)));
        }
        Ok(())
    }
}

#[async_trait]
impl OutboxRows for PgOutbox {
    fn is_ready(&self) -> bool {
        self.db.is_migrated()
    }

    async fn newest(&self, table: &'static str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(seq) FROM {table}")))
            .fetch_one(self.db.pool())
            .await
    }

    async fn any_up_to(&self, table: &'static str, newest: i64) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE seq <= $1)"
        )))
        .bind(newest)
        .fetch_one(self.db.pool())
        .await
    }

    async fn take(
        &self,
        table: &'static str,
        window: Window,
        taken: Taken,
    ) -> Result<Box<dyn Batch>, sqlx::Error> {
        // A flush waits for every row up to its newest, from the start: it is rare, and what
        // it answers for is every row committed before it.
        let (from, due, settled) = match taken {
            Taken::Skip => self.start(table, Instant::now()),
            Taken::Wait => (0, false, None),
        };
        if due && let Err(error) = self.sample(table).await {
            tracing::debug!(%error, outbox = table, "outbox sequence not read; the floor stays");
        }
        let mut tx = self.db.pool().begin().await?;
        // Taken out in the transaction, put back by its rollback if the destination does not
        // take them. SKIP LOCKED: replicas share the outbox without shipping the same batch twice
        // at once. `= ANY(ARRAY(…))` finds the rows by the primary key: `IN (…)` was planned as a
        // hash join over a scan of the whole table, dead rows included, which cost 2 ms a batch
        // once a run had put a hundred thousand events through. The window over the locked rows
        // keeps the batch within its bytes. `seq >= $4`: the floor (see the module).
        let lock = match taken {
            Taken::Skip => "FOR UPDATE SKIP LOCKED",
            Taken::Wait => "FOR UPDATE",
        };
        let mut rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH locked AS ( \
                 SELECT seq, octet_length(payload) AS size FROM {table} \
                 WHERE seq >= $4 AND seq <= $2 ORDER BY seq LIMIT $1 {lock}), \
             running AS ( \
                 SELECT seq, sum(size) OVER (ORDER BY seq) AS bytes, \
                     row_number() OVER (ORDER BY seq) AS n \
                 FROM locked) \
             DELETE FROM {table} WHERE seq = ANY(ARRAY( \
                 SELECT seq FROM running WHERE bytes <= $3 OR n = 1)) \
             RETURNING seq, payload"
        )))
        .bind(window.rows)
        .bind(window.newest)
        .bind(window.bytes)
        .bind(from)
        .fetch_all(&mut *tx)
        .await?;
        rows.sort_unstable_by_key(|(seq, _)| *seq);
        if taken == Taken::Skip {
            self.looked(table, from, rows.first().map(|(seq, _)| *seq), settled);
        }
        Ok(Box::new(PgBatch { tx, rows }))
    }
}

struct PgBatch {
    tx: Transaction<'static, Postgres>,
    rows: Vec<(i64, Vec<u8>)>,
}

#[async_trait]
impl Batch for PgBatch {
    fn rows(&self) -> &[(i64, Vec<u8>)] {
        &self.rows
    }

    async fn done(
        self: Box<Self>,
        table: &'static str,
        dead: &[(i64, Vec<u8>, String)],
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.tx;
        set_aside(&mut tx, table, dead).await?;
        tx.commit().await
    }

    /// Rolled back now: a dropped transaction is rolled back only when the pool next hands its
    /// connection out, and until then the rows stay locked, so another replica (or the next
    /// round, on another connection) would skip them.
    async fn put_back(self: Box<Self>) {
        if let Err(rollback) = self.tx.rollback().await {
            tracing::debug!(%rollback, "outbox batch not rolled back at once");
        }
    }
}

/// Sets `dead` aside in `outbox_dead_letters`, in the batch's transaction.
async fn set_aside(
    tx: &mut Transaction<'static, Postgres>,
    table: &'static str,
    dead: &[(i64, Vec<u8>, String)],
) -> Result<(), sqlx::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = dead.iter().map(|(seq, _, _)| *seq).collect();
    let payloads: Vec<&[u8]> = dead.iter().map(|(_, p, _)| p.as_slice()).collect();
    let errors: Vec<&str> = dead.iter().map(|(_, _, e)| e.as_str()).collect();
    sqlx::query(
        "INSERT INTO outbox_dead_letters (outbox, seq, payload, error) \
         SELECT $1, * FROM unnest($2::bigint[], $3::bytea[], $4::text[]) \
         ON CONFLICT (outbox, seq) DO NOTHING",
    )
    .bind(table)
    .bind(&seqs)
    .bind(&payloads)
    .bind(&errors)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
