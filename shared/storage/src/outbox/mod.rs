//! The transactional outbox: a service writes its events in the same transaction as the change they
//! describe, and a relay ships them to Reporting, which de-duplicates by event id. A crash between
//! commit and delivery loses nothing; a crash after delivery and before deletion re-sends, which
//! Reporting ignores.
//!
//! Every service with an outbox has the same table in its own schema:
//! `outbox (seq bigserial primary key, event_id uuid, payload bytea, created_at timestamptz)`.
//! Event ids are UUIDv7, so Reporting's primary key takes them in order, at the right edge of
//! its index.
//! A service can have other outboxes for other destinations (Handoff ships deflections to Routing
//! this way): a [`Destination`] names the table and delivers its rows.
//!
//! The rows live in PostgreSQL (`postgres`, what `c2m serve` runs) or in SQLite (`sqlite`, the
//! embedded default), behind [`OutboxRows`]; the relay is the same over both.

mod postgres;
mod sqlite;

pub use postgres::{PgOutbox, Timings};
pub use sqlite::{SqliteOutbox, enqueue_sqlite};

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use c2m_proto::v1::{Event, RecordEventsRequest};
use c2m_runtime::{metrics::OutboxLabels, peers::Peers};
use prost::Message;
use sqlx::PgConnection;

use crate::postgres::ServiceDb;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows shipped per call to the destination, at most.
const BATCH: i64 = 500;
/// Payload bytes shipped per call, at most (a single larger row goes alone): well under the
/// 4 MiB a gRPC peer takes, so a batch is never refused for its size.
const BATCH_BYTES: i64 = 1024 * 1024;
/// The longest pause between tries while the destination (or PostgreSQL) keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often the relay looks for rows nobody told it about (other replicas' writes).
const POLL: Duration = Duration::from_millis(100);
/// The least time between two batches that are not full: under load, the rows of many commits
/// leave together (one statement, one call) instead of a batch per commit; when idle, a row
/// still leaves at once. Each batch costs four PostgreSQL round trips (begin, take, the
/// destination's write, commit); at 1,000 handoffs/s, going from 10 ms to 50 ms cut PostgreSQL's
/// CPU per handoff by a quarter. Nothing waits on a relay: a funnel is 50 ms later at worst, and
/// a reply that overtakes its deflection has Handoff flush (`Relay::flush`).
const LINGER: Duration = Duration::from_millis(50);

/// The outbox's columns for `events`: their ids and encodings, to bind as `uuid[]` and `bytea[]`
/// (for a caller that writes its change and its events in one statement).
pub fn rows(events: &[Event]) -> Result<(Vec<uuid::Uuid>, Vec<Vec<u8>>), sqlx::Error> {
    let ids = events
        .iter()
        .map(|e| e.event_id.parse::<uuid::Uuid>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| sqlx::Error::Protocol(format!("event id is not a uuid: {e}")))?;
    Ok((ids, events.iter().map(Message::encode_to_vec).collect()))
}

/// Writes `events` into the outbox inside the caller's transaction.
pub async fn enqueue(tx: &mut PgConnection, events: &[Event]) -> Result<(), sqlx::Error> {
    let (ids, payloads) = rows(events)?;
    sqlx::query(
        "INSERT INTO outbox (event_id, payload) SELECT * FROM unnest($1::uuid[], $2::bytea[])",
    )
    .bind(&ids)
    .bind(&payloads)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Where an outbox's rows go, and the table they wait in.
pub trait Destination: Clone + Send + Sync + 'static {
    /// The outbox table in the service's schema: at least `seq bigserial primary key` and
    /// `payload bytea`.
    const TABLE: &'static str;

    /// Delivers `payloads`, in the order they were written. An error leaves them in the outbox,
    /// to be delivered again: a destination must take a repeat as a no-op.
    fn deliver(
        &self,
        peers: &Peers,
        payloads: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<(), RelayError>> + Send;
}

/// Funnel events (`c2m.v1.Event`, in the `outbox` table), to Reporting, which counts each event
/// id once.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToReporting;

impl Destination for ToReporting {
    const TABLE: &'static str = "outbox";

    async fn deliver(&self, peers: &Peers, payloads: Vec<Vec<u8>>) -> Result<(), RelayError> {
        let events = payloads
            .iter()
            .map(|payload| Event::decode(payload.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        peers
            .reporting()
            .record_events(RecordEventsRequest { events })
            .await?;
        Ok(())
    }
}

/// Ships a service's outbox to its destination (Reporting, unless said otherwise).
#[derive(Debug, Clone)]
pub struct Relay<D = ToReporting> {
    rows: Arc<dyn OutboxRows>,
    peers: Peers,
    wake: Arc<Notify>,
    destination: D,
    flushes: Arc<Flushes>,
}

/// Calls to [`Relay::flush`], so that concurrent ones share one flush.
#[derive(Debug, Default)]
struct Flushes {
    /// Calls made so far, numbered from 1.
    asked: AtomicU64,
    /// Held while a flush runs: the calls the last completed flush answered (each call up to
    /// that number had been made before it started).
    covered: tokio::sync::Mutex<u64>,
}

impl Relay {
    /// A relay of the service's funnel events to Reporting.
    pub fn new(db: ServiceDb, peers: Peers) -> Self {
        Self::to(ToReporting, db, peers)
    }

    /// A relay of funnel events kept in another store (the embedded default's SQLite file).
    pub fn over(rows: Arc<dyn OutboxRows>, peers: Peers) -> Self {
        Self::to_over(ToReporting, rows, peers)
    }
}

/// Whether a batch waits for rows another transaction has taken out, or leaves them to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Skip,
    Wait,
}

/// Which rows a batch may take: the oldest, up to `newest`, at most `rows` of them and `bytes` of
/// payload (one row, however large).
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub newest: i64,
    pub rows: i64,
    pub bytes: i64,
}

/// Where a service's outbox rows are kept.
#[async_trait]
pub trait OutboxRows: std::fmt::Debug + Send + Sync + 'static {
    /// The schema is migrated: the outbox tables are there.
    fn is_ready(&self) -> bool;
    /// The newest row's sequence number, if any row waits.
    async fn newest(&self, table: &'static str) -> Result<Option<i64>, sqlx::Error>;
    /// Whether rows up to `newest` still wait.
    async fn any_up_to(&self, table: &'static str, newest: i64) -> Result<bool, sqlx::Error>;
    /// Takes the window's rows out, in order, so that no other relay ships them meanwhile;
    /// `Taken::Skip` passes over rows another relay holds, `Taken::Wait` waits for them.
    async fn take(
        &self,
        table: &'static str,
        window: Window,
        taken: Taken,
    ) -> Result<Box<dyn Batch>, sqlx::Error>;
}

/// Rows taken out of an outbox: gone once [`Batch::done`], back for the next relay after
/// [`Batch::put_back`] (or when dropped).
#[async_trait]
pub trait Batch: Send {
    /// (sequence number, payload), in order.
    fn rows(&self) -> &[(i64, Vec<u8>)];
    /// The rows left: delivered, and `dead` (sequence number, payload, why) set aside in
    /// `outbox_dead_letters`.
    async fn done(
        self: Box<Self>,
        table: &'static str,
        dead: &[(i64, Vec<u8>, String)],
    ) -> Result<(), sqlx::Error>;
    /// The rows go back now, to be shipped again.
    async fn put_back(self: Box<Self>);
}

impl<D: Destination> Relay<D> {
    pub fn to(destination: D, db: ServiceDb, peers: Peers) -> Self {
        Self::to_over(destination, Arc::new(PgOutbox::new(db)), peers)
    }

    /// A relay to `destination` of the rows kept in `rows`.
    pub fn to_over(destination: D, rows: Arc<dyn OutboxRows>, peers: Peers) -> Self {
        Self {
            rows,
            peers,
            wake: Arc::new(Notify::new()),
            destination,
            flushes: Arc::default(),
        }
    }

    /// Where this relay's rows are kept.
    pub fn rows(&self) -> Arc<dyn OutboxRows> {
        self.rows.clone()
    }

    /// Call after committing rows, so they leave now rather than at the next poll.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Ships batches until `shutdown`. Errors (the destination or PostgreSQL down) are logged and
    /// retried; the rows stay in the outbox meanwhile.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut failing = false;
        // Consecutive failed rounds: the pause before the next grows with them (POLL, doubled
        // each time, at most MAX_BACKOFF), so a destination that is down costs little.
        let mut failures: u32 = 0;
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            if let Some(wait) = last.map(|at| LINGER.saturating_sub(at.elapsed()))
                && !wait.is_zero()
            {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            last = Some(tokio::time::Instant::now());
            let shipped = self.ship_batch().await;
            if shipped.is_ok() {
                failures = 0;
                if failing {
                    tracing::info!(outbox = D::TABLE, "outbox relay recovered");
                    failing = false;
                }
            }
            match shipped {
                // A full batch (by rows or by bytes): more are waiting.
                Ok(Shipped { full: true, .. }) => {
                    last = None;
                    continue;
                }
                Ok(_) => {}
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if !failing {
                        tracing::warn!(outbox = D::TABLE, %error, "outbox relay failing, will retry");
                        failing = true;
                    }
                }
            }
            let pause = if failures == 0 {
                POLL
            } else {
                c2m_runtime::backoff::Backoff::new(POLL, MAX_BACKOFF).delay(failures)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified(), if failures == 0 => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Ships one batch; returns how many rows left the outbox (delivered or set aside).
    pub async fn ship_batch(&self) -> Result<Shipped, RelayError> {
        self.ship(Taken::Skip, i64::MAX).await
    }

    /// Ships every row committed before this call, and returns how many it shipped itself. Rows
    /// another relay has taken out meanwhile are waited for: when this returns, each of them has
    /// been delivered, or been put back and delivered here. Concurrent calls share the work: a
    /// call that finds a flush running waits for it and, unless that flush started after the
    /// call was made, runs one more for every call waiting, so a burst of replies that find no
    /// deflection costs two flushes, not one each.
    pub async fn flush(&self) -> Result<usize, RelayError> {
        let ticket = self.flushes.asked.fetch_add(1, Ordering::SeqCst) + 1;
        let mut covered = self.flushes.covered.lock().await;
        if *covered >= ticket {
            return Ok(0);
        }
        // Every call made by now is answered by a flush that starts now.
        let covers = self.flushes.asked.load(Ordering::SeqCst);
        let shipped = self.flush_now().await?;
        *covered = covers;
        c2m_runtime::metrics::metrics()
            .outbox_flushes
            .get_or_create(&OutboxLabels { outbox: D::TABLE })
            .inc();
        Ok(shipped)
    }

    async fn flush_now(&self) -> Result<usize, RelayError> {
        if !self.rows.is_ready() {
            return Ok(0);
        }
        let Some(newest) = self.rows.newest(D::TABLE).await? else {
            return Ok(0);
        };
        let mut shipped = 0;
        loop {
            let n = self.ship(Taken::Wait, newest).await?.rows;
            shipped += n;
            if n > 0 {
                continue;
            }
            // Nothing came out: the rows we waited for were shipped by whoever held them. Done
            // unless rows beyond the batch we looked at are still there.
            if !self.rows.any_up_to(D::TABLE, newest).await? {
                return Ok(shipped);
            }
        }
    }

    /// Ships one batch of rows up to `newest`: at most [`BATCH`] rows and [`BATCH_BYTES`] of
    /// payload (one row, however large). A batch the destination refuses for what it holds is
    /// tried row by row, and a row refused on its own is set aside in `outbox_dead_letters`, so
    /// that one bad row does not hold back every row behind it.
    async fn ship(&self, taken: Taken, newest: i64) -> Result<Shipped, RelayError> {
        // Until the health probe has migrated the schema there is no outbox to read.
        if !self.rows.is_ready() {
            return Ok(Shipped::default());
        }
        let batch = self
            .rows
            .take(
                D::TABLE,
                Window {
                    newest,
                    rows: BATCH,
                    bytes: BATCH_BYTES,
                },
                taken,
            )
            .await?;
        let rows = batch.rows().to_vec();
        if rows.is_empty() {
            return Ok(Shipped::default());
        }
        let n = rows.len();
        let full = n as i64 == BATCH
            || rows.iter().map(|(_, p)| p.len() as i64).sum::<i64>() * 2 > BATCH_BYTES;
        let delivered = self
            .destination
            .deliver(&self.peers, rows.iter().map(|(_, p)| p.clone()).collect())
            .await;
        let dead = match delivered {
            Ok(()) => Vec::new(),
            Err(error) if error.is_about_the_rows() => match self.isolate(rows).await {
                Ok(dead) => dead,
                Err(error) => {
                    batch.put_back().await;
                    return Err(error);
                }
            },
            Err(error) => {
                batch.put_back().await;
                return Err(error);
            }
        };
        batch.done(D::TABLE, &dead).await?;
        for (seq, payload, error) in &dead {
            tracing::error!(
                outbox = D::TABLE,
                seq,
                bytes = payload.len(),
                %error,
                "outbox row can never be delivered: set aside in outbox_dead_letters"
            );
            c2m_runtime::metrics::metrics()
                .outbox_dead_letters
                .get_or_create(&OutboxLabels { outbox: D::TABLE })
                .inc();
        }
        Ok(Shipped { rows: n, full })
    }

    /// Delivers a refused batch's rows one by one; returns the rows refused on their own, with
    /// why. A failure that is not about a row (the destination away) stops it: the whole batch
    /// is then put back and tried again later (a destination takes a repeat as a no-op).
    async fn isolate(
        &self,
        rows: Vec<(i64, Vec<u8>)>,
    ) -> Result<Vec<(i64, Vec<u8>, String)>, RelayError> {
        let mut dead = Vec::new();
        for (seq, payload) in rows {
            match self
                .destination
                .deliver(&self.peers, vec![payload.clone()])
                .await
            {
                Ok(()) => {}
                Err(error) if error.is_about_the_rows() => {
                    dead.push((seq, payload, error.to_string()));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(dead)
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shipped {
    /// Rows that left the outbox: delivered, or set aside as undeliverable.
    pub rows: usize,
    /// The batch was as large as batches get (in rows, or near it in bytes): more may wait.
    pub full: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox query failed: {0}")]
    Db(#[from] sqlx::Error),
    #[error("outbox holds an undecodable row: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the destination refused the batch: {0}")]
    Refused(#[from] tonic::Status),
}

impl RelayError {
    /// Whether the failure is about what the rows hold (a row that cannot be decoded, a batch
    /// the destination finds invalid or too large), which trying again cannot fix, rather than
    /// about the destination or PostgreSQL being away.
    pub fn is_about_the_rows(&self) -> bool {
        match self {
            RelayError::Decode(_) => true,
            RelayError::Refused(status) => matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange
            ),
            RelayError::Db(_) => false,
        }
    }
}

/// A new event for `account_id` at `stage`, with a fresh id and the current time; set the other
/// fields with struct update syntax.
pub fn event(account_id: &str, stage: c2m_proto::v1::FunnelStage) -> Event {
    Event {
        event_id: uuid::Uuid::now_v7().to_string(),
        account_id: account_id.to_owned(),
        stage: stage as i32,
        occurred_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
        source: "C2M".to_owned(),
        ..Event::default()
    }
}
