//! Group commit for the hot path: the rows of concurrent callers go to PostgreSQL together, as one
//! statement over arrays, instead of one statement (and, for writes, one commit) each.
//!
//! A statement's fixed cost (the round trip, the wake-ups on both sides, the transaction, the
//! commit's WAL flush) is most of what a one-row statement costs, so a batch of ten costs little
//! more than one row. Batches form by themselves: a row leaves at once when no statement of its
//! kind is running, and rows that arrive while one runs leave together in the next. An idle
//! service therefore adds no delay, and a busy one does fewer statements.
//!
//! A statement that fails on a database error (a constraint a row breaks) is run again row by
//! row, so one bad row fails only its own caller. A statement whose connection broke is run once
//! more; a failure to reach the database after that fails the whole batch, with the same kind of
//! error for every caller. A caller that goes away never cancels
//! another's row; its own row, if the statement carried nothing else, is cancelled with it, as
//! any query would be (every write here is idempotent, so a retry is safe either way).

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

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

type Reply<O> = oneshot::Sender<Result<O, sqlx::Error>>;
/// A row and where its caller waits for the output.
type Waiting<S> = (<S as Statement>::Row, Reply<<S as Statement>::Output>);

/// The most rows in one statement, by default.
pub const MAX_ROWS: usize = 64;

/// Hands rows to a [`Statement`], batching those of concurrent callers. One statement runs at a
/// time, as in PostgreSQL's own group commit; the rows that arrive meanwhile leave together in
/// the next. (Measured on the handoff benchmark, two statements at once carried a fifth fewer
/// handoffs a second: smaller batches, and a round trip saved is worth more than the overlap.)
pub struct Batcher<S: Statement> {
    inner: Arc<Inner<S>>,
}

struct Inner<S: Statement> {
    statement: S,
    waiting: Mutex<VecDeque<Waiting<S>>>,
    /// Whether a statement is running (someone holds the [`Lead`]).
    busy: AtomicBool,
    max_rows: usize,
}

impl<S: Statement> Clone for Batcher<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S: Statement> std::fmt::Debug for Batcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<S: Statement> Batcher<S> {
    /// A batcher of at most [`MAX_ROWS`] rows a statement.
    pub fn new(statement: S) -> Self {
        Self::with_max_rows(statement, MAX_ROWS)
    }

    pub fn with_max_rows(statement: S, max_rows: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                statement,
                waiting: Mutex::default(),
                busy: AtomicBool::new(false),
                max_rows: max_rows.max(1),
            }),
        }
    }

    /// Runs the statement for `row`, with whatever other rows are waiting.
    ///
    /// The caller that finds no statement running runs one itself: when its row is alone, right
    /// here (an idle service pays no hand-over to another task); when it carries others' rows, in
    /// a task of its own, so that this caller going away cannot cancel their writes.
    pub async fn run(&self, row: S::Row) -> Result<S::Output, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.inner.waiting().push_back((row, reply));
        if let Some(lead) = Lead::take(&self.inner) {
            let batch = lead.batch();
            if batch.len() <= 1 {
                write(&lead.inner.statement, batch).await;
                drop(lead);
            } else {
                tokio::spawn(async move {
                    write(&lead.inner.statement, batch).await;
                    drop(lead);
                });
            }
        }
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

impl<S: Statement> Batcher<S>
where
    S::Row: Clone,
{
    /// [`run`](Self::run), offered again while the statement fails (PostgreSQL restarting or
    /// failing over), after a pause that doubles from 50 ms to a second, until `give_up`; the
    /// last error then. `retrying` hears each error that is followed by another try, and the
    /// pause before it. For writes that must not be lost once something has been done that
    /// depends on them (a message sent).
    pub async fn run_until(
        &self,
        row: S::Row,
        give_up: Instant,
        mut retrying: impl FnMut(&sqlx::Error, Duration),
    ) -> Result<S::Output, sqlx::Error> {
        let pauses =
            c2m_runtime::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        for retry in 0.. {
            let pause = pauses.delay(retry);
            match self.run(row.clone()).await {
                Err(error) if Instant::now() + pause < give_up => {
                    retrying(&error, pause);
                    tokio::time::sleep(pause).await;
                }
                answer => return answer,
            }
        }
        unreachable!("the tries end with an answer")
    }
}

impl<S: Statement> Inner<S> {
    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting<S>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The right to run the statement. Whoever drops it (a finished statement, or a caller that
/// went away mid-statement) hands the rows that arrived meanwhile to a task of their own.
struct Lead<S: Statement> {
    inner: Arc<Inner<S>>,
}

impl<S: Statement> Lead<S> {
    fn take(inner: &Arc<Inner<S>>) -> Option<Self> {
        inner
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            .then(|| Self {
                inner: inner.clone(),
            })
    }

    fn batch(&self) -> Vec<Waiting<S>> {
        let mut waiting = self.inner.waiting();
        let n = waiting.len().min(self.inner.max_rows);
        waiting.drain(..n).collect()
    }
}

impl<S: Statement> Drop for Lead<S> {
    fn drop(&mut self) {
        self.inner.busy.store(false, Ordering::SeqCst);
        // A caller that queued while the statement ran found it busy and is waiting: unless
        // another caller has taken the lead since, the next batch is ours to start.
        if !self.inner.waiting().is_empty()
            && let Some(next) = Lead::take(&self.inner)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let batch = next.batch();
                write(&next.inner.statement, batch).await;
                drop(next);
            });
        }
    }
}

async fn write<S: Statement>(statement: &S, batch: Vec<Waiting<S>>) {
    let (rows, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
    let mut result = statement.run(&rows).await;
    if let Err(error) = &result
        && connection_lost(error)
    {
        // A connection PostgreSQL closed (a restart, a failover) fails its next statement once
        // and is discarded; the batch would fail every caller in it for that. Once more on a
        // fresh connection: every batched statement is safe to repeat (reads, upserts, and a
        // save whose idempotency claim makes a repeat of a committed save a harmless race).
        tracing::warn!(%error, rows = rows.len(), "batched statement lost its connection, once more");
        result = statement.run(&rows).await;
    }
    match result {
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

/// The connection broke under the statement: PostgreSQL went away (an I/O error) or told its
/// connections it was shutting down (SQLSTATE 57P01–57P03).
fn connection_lost(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(e) => e.code().is_some_and(|code| code.starts_with("57P0")),
        _ => false,
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
        /// Statements that fail as if their connection broke, before the others succeed.
        broken_connections: std::sync::atomic::AtomicUsize,
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
            if self
                .broken_connections
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                return Err(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()));
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

    type Answer = tokio::task::JoinHandle<Result<u32, sqlx::Error>>;

    /// A batcher whose first statement (row 1) is running and held, with `queued` waiting
    /// behind it: the statement, the batcher, the first caller and the queued callers.
    async fn held_with(
        queued: &[u32],
    ) -> (Arc<Doubling>, Batcher<Arc<Doubling>>, Answer, Vec<Answer>) {
        let statement = Arc::new(Doubling {
            hold_first: true.into(),
            ..Default::default()
        });
        let batcher = Batcher::new(statement.clone());
        let call = |row: u32| {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.run(row).await })
        };
        let first = call(1);
        until(|| statement.batches.lock().unwrap().len() == 1).await;
        let waiting = queued.iter().map(|row| call(*row)).collect();
        until(|| batcher.inner.waiting().len() == queued.len()).await;
        (statement, batcher, first, waiting)
    }

    async fn answers(waiting: Vec<Answer>) -> Vec<Result<u32, String>> {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            futures::future::join_all(waiting),
        )
        .await
        .expect("every caller is answered within 5 s")
        .into_iter()
        .map(|r| r.unwrap().map_err(|e| e.to_string()))
        .collect()
    }

    /// Rows that arrive while a statement runs leave together in the next, each caller gets its
    /// own row's output, and a row that breaks a constraint fails alone.
    #[tokio::test]
    async fn rows_waiting_for_a_statement_leave_together_and_a_bad_row_fails_alone() {
        let (statement, _batcher, first, waiting) = held_with(&[2, 13, 4]).await;
        statement.gate.notify_one();
        assert_eq!(first.await.unwrap().unwrap(), 2);
        let answers = answers(waiting).await;
        assert_eq!(answers[0], Ok(4));
        assert!(answers[1].as_ref().unwrap_err().contains("row 13"));
        assert_eq!(answers[2], Ok(8));
        // One batch for the first row, one of three for those that waited, then each alone.
        assert_eq!(*statement.batches.lock().unwrap(), vec![1, 3, 1, 1, 1]);
    }

    /// A caller that goes away while its statement runs does not strand the rows queued behind
    /// it: they leave in the next statement.
    #[tokio::test]
    async fn rows_queued_behind_a_caller_that_went_away_are_still_written() {
        let (statement, _batcher, first, waiting) = held_with(&[2, 4]).await;
        first.abort();
        assert_eq!(answers(waiting).await, [Ok(4), Ok(8)]);
        assert_eq!(*statement.batches.lock().unwrap(), vec![1, 2]);
    }

    /// A statement whose connection broke is run once more, and its callers do not notice; a
    /// second break in a row fails them, as an unreachable database.
    #[tokio::test]
    async fn a_broken_connection_costs_one_more_statement_not_the_batch() {
        let statement = Arc::new(Doubling {
            broken_connections: 1.into(),
            ..Default::default()
        });
        let batcher = Batcher::new(statement.clone());
        assert_eq!(batcher.run(3).await.expect("run again"), 6);
        assert_eq!(*statement.batches.lock().unwrap(), vec![1, 1]);

        statement
            .broken_connections
            .store(2, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(batcher.run(3).await, Err(sqlx::Error::Io(_))));
    }

    /// A row whose statement keeps failing is offered again until it is written; each retry is
    /// heard, and past the deadline the error is the caller's.
    #[tokio::test]
    async fn run_until_offers_a_row_again_until_it_is_written_or_time_is_up() {
        let statement = Arc::new(Doubling {
            // Each run retries a broken connection once itself: three breaks fail one run.
            broken_connections: 3.into(),
            ..Default::default()
        });
        let batcher = Batcher::new(statement.clone());
        let mut heard = Vec::new();
        let far = Instant::now() + Duration::from_secs(30);
        let written = batcher
            .run_until(3, far, |error, pause| {
                heard.push((error.to_string(), pause))
            })
            .await;
        assert_eq!(written.expect("written on the second run"), 6);
        assert_eq!(heard.len(), 1, "{heard:?}");
        assert_eq!(heard[0].1, Duration::from_millis(50));

        statement
            .broken_connections
            .store(2, std::sync::atomic::Ordering::SeqCst);
        let past = Instant::now();
        let failed = batcher
            .run_until(3, past, |_, _| panic!("no time to retry"))
            .await;
        assert!(matches!(failed, Err(sqlx::Error::Io(_))));
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
