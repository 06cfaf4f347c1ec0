//! Outbox rows in a service's SQLite file, the embedded default. One process holds the file, so
//! the relays of one table take turns under a lock of this process instead of row locks: a batch
//! is read, delivered, then deleted in a short write transaction (a write transaction held
//! across the destination's call would stop every other writer of the file meanwhile). A crash
//! between delivery and deletion ships the batch again, which destinations take as a no-op.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use c2m_proto::v1::Event;
use prost::Message;
use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::OwnedMutexGuard;

use super::{Batch, OutboxRows, Taken, Window};

/// Writes `events` into the `outbox` table inside the caller's SQLite transaction.
pub async fn enqueue_sqlite(
    tx: &mut SqliteConnection,
    events: &[Event],
) -> Result<(), sqlx::Error> {
    for event in events {
        sqlx::query("INSERT INTO outbox (event_id, payload) VALUES (?1, ?2)")
            .bind(&event.event_id)
            .bind(event.encode_to_vec())
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// The right to ship from one table, held by one relay at a time.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// A service's SQLite file as the keeper of its outboxes. Each outbox table is
/// `(seq INTEGER PRIMARY KEY AUTOINCREMENT, payload BLOB, …)`, beside `outbox_dead_letters`.
#[derive(Debug, Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    /// One lock per table: held by the relay shipping from it.
    turns: Arc<Mutex<HashMap<&'static str, Turn>>>,
}

impl SqliteOutbox {
    /// Over a migrated file.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            turns: Arc::default(),
        }
    }

    fn turn(&self, table: &'static str) -> Turn {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        turns.entry(table).or_default().clone()
    }
}

#[async_trait]
impl OutboxRows for SqliteOutbox {
    fn is_ready(&self) -> bool {
        true
    }

    async fn newest(&self, table: &'static str) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT max(seq) FROM {table}")))
            .fetch_one(&self.pool)
            .await
    }

    async fn any_up_to(&self, table: &'static str, newest: i64) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE seq <= ?1)"
        )))
        .bind(newest)
        .fetch_one(&self.pool)
        .await
    }

    async fn take(
        &self,
        table: &'static str,
        window: Window,
        taken: Taken,
    ) -> Result<Box<dyn Batch>, sqlx::Error> {
        let turn = self.turn(table);
        let guard = match taken {
            Taken::Wait => turn.lock_owned().await,
            Taken::Skip => match turn.try_lock_owned() {
                Ok(guard) => guard,
                // Another relay of this process is shipping from the table: leave it the rows.
                Err(_) => {
                    return Ok(Box::new(SqliteBatch {
                        pool: self.pool.clone(),
                        rows: Vec::new(),
                        _turn: None,
                    }));
                }
            },
        };
        let oldest: Vec<(i64, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT seq, payload FROM {table} WHERE seq <= ?1 ORDER BY seq LIMIT ?2"
        )))
        .bind(window.newest)
        .bind(window.rows)
        .fetch_all(&self.pool)
        .await?;
        let mut bytes = 0;
        let rows = oldest
            .into_iter()
            .enumerate()
            .take_while(|(n, (_, payload))| {
                bytes += payload.len() as i64;
                *n == 0 || bytes <= window.bytes
            })
            .map(|(_, row)| row)
            .collect();
        Ok(Box::new(SqliteBatch {
            pool: self.pool.clone(),
            rows,
            _turn: Some(guard),
        }))
    }
}

struct SqliteBatch {
    pool: SqlitePool,
    rows: Vec<(i64, Vec<u8>)>,
    /// The table's turn, given back with the batch.
    _turn: Option<OwnedMutexGuard<()>>,
}

#[async_trait]
impl Batch for SqliteBatch {
    fn rows(&self) -> &[(i64, Vec<u8>)] {
        &self.rows
    }

    async fn done(
        self: Box<Self>,
        table: &'static str,
        dead: &[(i64, Vec<u8>, String)],
    ) -> Result<(), sqlx::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for (seq, payload, error) in dead {
            sqlx::query(
                "INSERT INTO outbox_dead_letters (outbox, seq, payload, error) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (outbox, seq) DO NOTHING",
            )
            .bind(table)
            .bind(seq)
            .bind(payload)
            .bind(error)
            .execute(&mut *tx)
            .await?;
        }
        let seqs: Vec<i64> = self.rows.iter().map(|(seq, _)| *seq).collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE seq IN (SELECT value FROM json_each(?1))"
        )))
        .bind(serde_json::to_string(&seqs).unwrap_or_else(|_| "[]".into()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }

    async fn put_back(self: Box<Self>) {}
}
