//! Outbox rows in a service's PostgreSQL schema. A batch is taken out inside a transaction
//! (`DELETE … RETURNING` of locked rows) that commits once the destination has them, or rolls
//! back to put them back; replicas share an outbox by skipping each other's locked rows.

use async_trait::async_trait;
use sqlx::{Postgres, Transaction};

use super::{Batch, OutboxRows, Taken, Window};
use crate::postgres::ServiceDb;

#[derive(Debug, Clone)]
pub(super) struct PgOutbox(pub ServiceDb);

#[async_trait]
impl OutboxRows for PgOutbox {
    fn is_ready(&self) -> bool {
        self.0.is_migrated()
    }

    async fn newest(&self, table: &'static str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(seq) FROM {table}")))
            .fetch_one(self.0.pool())
            .await
    }

    async fn any_up_to(&self, table: &'static str, newest: i64) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE seq <= $1)"
        )))
        .bind(newest)
        .fetch_one(self.0.pool())
        .await
    }

    async fn take(
        &self,
        table: &'static str,
        window: Window,
        taken: Taken,
    ) -> Result<Box<dyn Batch>, sqlx::Error> {
        let mut tx = self.0.pool().begin().await?;
        // Taken out in the transaction, put back by its rollback if the destination does not
        // take them. SKIP LOCKED: replicas share the outbox without shipping the same batch twice
        // at once. `= ANY(ARRAY(…))` finds the rows by the primary key: `IN (…)` was planned as a
        // hash join over a scan of the whole table, dead rows included, which cost 2 ms a batch
        // once a run had put a hundred thousand events through. The window over the locked rows
        // keeps the batch within its bytes.
        let lock = match taken {
            Taken::Skip => "FOR UPDATE SKIP LOCKED",
            Taken::Wait => "FOR UPDATE",
        };
        let mut rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "WITH locked AS ( \
                 SELECT seq, octet_length(payload) AS size FROM {table} \
                 WHERE seq <= $2 ORDER BY seq LIMIT $1 {lock}), \
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
        .fetch_all(&mut *tx)
        .await?;
        rows.sort_unstable_by_key(|(seq, _)| *seq);
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
        if !dead.is_empty() {
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
            .execute(&mut *tx)
            .await?;
        }
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
