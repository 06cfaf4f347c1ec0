//! Group commit for the hot path: the rows of concurrent callers go to PostgreSQL together, as one
//! statement over arrays, instead of one statement (and, for writes, one commit) each.
//!
//! A statement's fixed cost (the round trip, planning, the transaction, the commit's WAL flush)
//! is most of what a one-row statement costs PostgreSQL, so a batch of ten costs little more than
//! one row. Batches form by themselves: a caller's row leaves at once when a statement slot is
//! free, and rows that arrive while every slot is busy wait for the next free one and leave
//! together. An idle service therefore adds no delay, and a busy one does fewer statements.
//!
//! A statement that fails on a database error (a constraint a row breaks) is run again row by
//! row, so one bad row fails only its own caller. A failure to reach the database fails the whole
//! batch, with the same kind of error for every caller. A caller that stops waiting does not take
//! its row back: a row handed over is written (every write here is idempotent).

use std::{future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// A statement that takes many rows at once.
pub trait Statement: Send + Sync + 'static {
    type Row: Send + 'static;
    type Output: Send + 'static;
    /// Runs the statement for `rows`, returning one output per row, in their order.
    fn run(
        &self,
        rows: &[Self::Row],
    ) -> impl Future<Output = Result<Vec<Self::Output>, sqlx::Error>> + Send;
}

/// Rows waiting for a statement, at most; a caller beyond waits for room.
const QUEUE: usize = 4096;

type Reply<O> = oneshot::Sender<Result<O, sqlx::Error>>;

/// Hands rows to a [`Statement`], batching those of concurrent callers.
pub struct Batcher<S: Statement> {
    queue: mpsc::Sender<(S::Row, Reply<S::Output>)>,
}

impl<S: Statement> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<S: Statement> std::fmt::Debug for Batcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

/// Statements of one kind running at once, by default: one, as in PostgreSQL's own group commit.
/// The rows that arrive while it runs leave together in the next. Measured on the handoff
/// benchmark (two cores), one slot carried 2,600–2,800 handoffs/s where two carried 2,100, at the
/// same latency at 500/s and 1,000/s: the batches are larger, and a round trip saved is worth more
/// than the overlap a second slot buys.
pub const SLOTS: usize = 1;
/// The most rows in one statement, by default.
pub const MAX_ROWS: usize = 64;

impl<S: Statement> Batcher<S> {
    /// A batcher with [`SLOTS`] slots of at most [`MAX_ROWS`] rows.
    pub fn new(statement: S) -> Self {
        Self::spawn(statement, SLOTS, MAX_ROWS)
    }

    /// At most `slots` statements run at once, each with at most `max_rows` rows. The batcher
    /// stops when its last clone is dropped, after the rows already handed over are written.
    pub fn spawn(statement: S, slots: usize, max_rows: usize) -> Self {
        let (queue, mut rows) = mpsc::channel::<(S::Row, Reply<S::Output>)>(QUEUE);
        let statement = Arc::new(statement);
        let slots = Arc::new(Semaphore::new(slots.max(1)));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let mut batch = Vec::with_capacity(max_rows);
                if rows.recv_many(&mut batch, max_rows.max(1)).await == 0 {
                    return;
                }
                let statement = statement.clone();
                tokio::spawn(async move {
                    write(&*statement, batch).await;
                    drop(slot);
                });
            }
        });
        Self { queue }
    }

    /// Runs the statement for `row`, with whatever other rows are waiting.
    pub async fn run(&self, row: S::Row) -> Result<S::Output, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((row, reply))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn write<S: Statement>(statement: &S, batch: Vec<(S::Row, Reply<S::Output>)>) {
    let (rows, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    match statement.run(&rows).await {
        Ok(outputs) if outputs.len() == rows.len() => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        Ok(outputs) => {
            let error = format!(
                "a batch statement returned {} outputs for {} rows",
                outputs.len(),
                rows.len()
            );
            for reply in replies {
                let _ = reply.send(Err(sqlx::Error::Protocol(error.clone())));
            }
        }
        Err(sqlx::Error::Database(_)) if rows.len() > 1 => {
            // Some row broke a constraint: find it by running each on its own.
            let alone = rows
                .iter()
                .map(|row| statement.run(std::slice::from_ref(row)));
            for (reply, result) in replies
                .into_iter()
                .zip(futures::future::join_all(alone).await)
            {
                let _ = reply.send(result.and_then(|mut outputs| {
                    outputs.pop().ok_or_else(|| {
                        sqlx::Error::Protocol("a batch statement returned no output".into())
                    })
                }));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(same_kind(&error)));
            }
        }
    }
}

/// An error of the same kind as `error`, for each caller of a failed batch (sqlx's errors cannot
/// be cloned): what the caller decides on is whether the database was reachable.
fn same_kind(error: &sqlx::Error) -> sqlx::Error {
    match error {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(e) => sqlx::Error::Io(std::io::Error::new(e.kind(), e.to_string())),
        sqlx::Error::RowNotFound => sqlx::Error::RowNotFound,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Doubles each row; a row of 13 breaks a "constraint"; records the batch sizes it saw.
    #[derive(Default)]
    struct Doubling {
        batches: Mutex<Vec<usize>>,
        gate: tokio::sync::Notify,
        hold_first: std::sync::atomic::AtomicBool,
    }

    impl Statement for Arc<Doubling> {
        type Row = u32;
        type Output = u32;
        async fn run(&self, rows: &[u32]) -> Result<Vec<u32>, sqlx::Error> {
            self.batches.lock().unwrap().push(rows.len());
            if self
                .hold_first
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                self.gate.notified().await;
            }
            if rows.contains(&13) {
                return Err(sqlx::Error::Database(Box::new(Broken)));
            }
            Ok(rows.iter().map(|r| r * 2).collect())
        }
    }

    #[derive(Debug)]
    struct Broken;
    impl std::fmt::Display for Broken {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("row 13 breaks a constraint")
        }
    }
    impl std::error::Error for Broken {}
    impl sqlx::error::DatabaseError for Broken {
        fn message(&self) -> &str {
            "row 13 breaks a constraint"
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::UniqueViolation
        }
    }

    /// Rows that arrive while the only slot is busy leave together, each caller gets its own
    /// row's output, and a row that breaks a constraint fails alone.
    #[tokio::test]
    async fn rows_waiting_for_a_slot_leave_together_and_a_bad_row_fails_alone() {
        let statement = Arc::new(Doubling {
            hold_first: true.into(),
            ..Default::default()
        });
        let batcher = Batcher::spawn(statement.clone(), 1, 64);
        // The first row takes the only slot and is held there.
        let first = tokio::spawn({
            let batcher = batcher.clone();
            async move { batcher.run(1).await }
        });
        until(|| statement.batches.lock().unwrap().len() == 1).await;
        // These queue behind it.
        let waiting: Vec<_> = [2, 13, 4]
            .into_iter()
            .map(|row| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.run(row).await })
            })
            .collect();
        until(|| batcher.queue.max_capacity() - batcher.queue.capacity() == 3).await;
        statement.gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        let answers: Vec<_> = futures::future::join_all(waiting)
            .await
            .into_iter()
            .map(|r| r.unwrap().map_err(|e| e.to_string()))
            .collect();
        assert_eq!(answers[0], Ok(4));
        assert!(answers[1].as_ref().unwrap_err().contains("row 13"));
        assert_eq!(answers[2], Ok(8));
        // One batch for the first row, one of three for those that waited, then each alone.
        assert_eq!(*statement.batches.lock().unwrap(), vec![1, 3, 1, 1, 1]);
    }

    async fn until(condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not met in 5 s"
            );
            tokio::task::yield_now().await;
        }
    }
}
