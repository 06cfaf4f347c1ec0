//! The outbox relay over each place its rows are kept: PostgreSQL (a database of the test's own)
//! and SQLite (a file of the test's own, as the embedded default keeps it). Rows written in a
//! committed transaction reach the destination once each, in order, through an outage; rows of
//! a rolled-back one never do; a row the destination refuses on its own is set aside.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use c2m_proto::v1::{Event, FunnelStage};
use c2m_runtime::{
    auth::TokenKey,
    peers::{PeerSettings, Peers},
};
use c2m_storage::{
    ServiceDb,
    outbox::{self, Destination, OutboxRows, PgOutbox, Relay, RelayError, SqliteOutbox, Timings},
};
use c2m_test_support::{TestDatabase, eventually};
use prost::Message;
use tokio_util::sync::CancellationToken;

static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/outbox/postgres");
static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/outbox/sqlite");

/// What the destination was given, and how it answers.
#[derive(Debug, Clone, Default)]
struct Recorder {
    got: Arc<Mutex<Vec<String>>>,
    away: Arc<AtomicBool>,
    /// An event id it refuses for what the row holds.
    refuses: Arc<Mutex<Option<String>>>,
}

impl Recorder {
    fn got(&self) -> Vec<String> {
        self.got.lock().expect("not poisoned").clone()
    }
}

impl Destination for Recorder {
    const TABLE: &'static str = "outbox";

    async fn deliver(&self, _: &Peers, payloads: Vec<Vec<u8>>) -> Result<(), RelayError> {
        if self.away.load(Ordering::SeqCst) {
            return Err(RelayError::Refused(tonic::Status::unavailable("away")));
        }
        let ids = payloads
            .iter()
            .map(|p| Event::decode(p.as_slice()).map(|e| e.event_id))
            .collect::<Result<Vec<_>, _>>()?;
        let refused = self.refuses.lock().expect("not poisoned").clone();
        if refused.is_some_and(|bad| ids.contains(&bad)) {
            return Err(RelayError::Refused(tonic::Status::invalid_argument(
                "stage is not a funnel stage",
            )));
        }
        self.got.lock().expect("not poisoned").extend(ids);
        Ok(())
    }
}

enum Store {
    Postgres {
        db: Box<ServiceDb>,
        _database: TestDatabase,
    },
    Sqlite {
        pool: sqlx::SqlitePool,
        _dir: tempfile::TempDir,
    },
}

struct Backend {
    store: Store,
    rows: Arc<dyn OutboxRows>,
    relay: Relay<Recorder>,
    destination: Recorder,
}

impl Backend {
    async fn postgres() -> Self {
        let db = TestDatabase::create().await;
        let service = db.migrated("outbox_test", &PG_MIGRATOR).await;
        let destination = Recorder::default();
        let relay = Relay::to(destination.clone(), service.clone(), peers());
        let rows = relay.rows();
        Self {
            store: Store::Postgres {
                db: Box::new(service),
                _database: db,
            },
            rows,
            relay,
            destination,
        }
    }

    async fn sqlite() -> Self {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("outbox.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .expect("opens");
        SQLITE_MIGRATOR.run(&pool).await.expect("migrated");
        let destination = Recorder::default();
        let rows: Arc<dyn OutboxRows> = Arc::new(SqliteOutbox::new(pool.clone()));
        Self {
            relay: Relay::to_over(destination.clone(), rows.clone(), peers()),
            store: Store::Sqlite { pool, _dir: dir },
            rows,
            destination,
        }
    }

    /// Writes `events` in one transaction, committed or rolled back.
    async fn write(&self, events: &[Event], commit: bool) {
        match &self.store {
            Store::Postgres { db, .. } => {
                let mut tx = db.pool().begin().await.expect("begins");
                outbox::enqueue(&mut tx, events).await.expect("written");
                if commit {
                    tx.commit().await.expect("commits");
                }
            }
            Store::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await.expect("begins");
                outbox::enqueue_sqlite(&mut tx, events)
                    .await
                    .expect("written");
                if commit {
                    tx.commit().await.expect("commits");
                }
            }
        }
    }

    async fn dead_letters(&self) -> Vec<(i64, String)> {
        let query = "SELECT seq, error FROM outbox_dead_letters ORDER BY seq";
        match &self.store {
            Store::Postgres { db, .. } => sqlx::query_as(query).fetch_all(db.pool()).await,
            Store::Sqlite { pool, .. } => sqlx::query_as(query).fetch_all(pool).await,
        }
        .expect("read")
    }

    async fn waiting(&self) -> bool {
        self.rows
            .any_up_to("outbox", i64::MAX)
            .await
            .expect("answered")
    }
}

/// Peers nobody calls: the recorder is the destination.
fn peers() -> Peers {
    Peers::new(
        &PeerSettings::default(),
        TokenKey::new(b"outbox test"),
        "test",
    )
    .expect("valid settings")
}

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|_| outbox::event("acme", FunnelStage::Attempted))
        .collect()
}

fn ids(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

c2m_test_support::conformance!(
    committed_rows_arrive_once_in_order_and_rolled_back_ones_never,
    rows_wait_out_an_outage,
    a_row_refused_on_its_own_is_set_aside,
    a_batch_stays_within_its_bytes,
    a_flush_ships_every_row_committed_before_it_while_the_relay_runs,
);

async fn committed_rows_arrive_once_in_order_and_rolled_back_ones_never(b: &Backend) {
    let (first, lost, second) = (events(3), events(2), events(4));
    b.write(&first, true).await;
    b.write(&lost, false).await;
    b.write(&second, true).await;
    let shipped = b.relay.ship_batch().await.expect("shipped");
    assert_eq!((shipped.rows, shipped.full), (7, false));
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 0);
    assert_eq!(b.destination.got(), [ids(&first), ids(&second)].concat());
    assert!(!b.waiting().await);
}

async fn rows_wait_out_an_outage(b: &Backend) {
    let written = events(5);
    b.write(&written, true).await;
    b.destination.away.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert!(b.relay.ship_batch().await.is_err());
    }
    assert!(b.waiting().await, "rows the destination did not take stay");
    assert!(
        b.dead_letters().await.is_empty(),
        "an outage is not the rows' fault"
    );
    b.destination.away.store(false, Ordering::SeqCst);
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 5);
    assert_eq!(b.destination.got(), ids(&written));
}

async fn a_row_refused_on_its_own_is_set_aside(b: &Backend) {
    let written = events(5);
    *b.destination.refuses.lock().expect("not poisoned") = Some(written[2].event_id.clone());
    b.write(&written, true).await;
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 5);
    let mut delivered = ids(&written);
    delivered.remove(2);
    assert_eq!(b.destination.got(), delivered);
    let dead = b.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].1.contains("stage is not a funnel stage"),
        "{dead:?}"
    );
    assert!(!b.waiting().await);
}

async fn a_batch_stays_within_its_bytes(b: &Backend) {
    // Three rows of 600 kB: one fits a batch of 1 MiB, two do not.
    let large: Vec<Event> = events(3)
        .into_iter()
        .map(|e| Event {
            error_code: "x".repeat(600_000),
            ..e
        })
        .collect();
    b.write(&large, true).await;
    for n in 1..=3 {
        let shipped = b.relay.ship_batch().await.expect("shipped");
        assert_eq!((shipped.rows, shipped.full), (1, true), "batch {n}");
        assert_eq!(b.destination.got(), ids(&large[..n]));
    }
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 0);
}

async fn a_flush_ships_every_row_committed_before_it_while_the_relay_runs(b: &Backend) {
    let running = CancellationToken::new();
    let relay = tokio::spawn(b.relay.clone().run(running.clone()));
    let mut written = Vec::new();
    for round in 0..50 {
        let batch = events(1 + round % 7);
        b.write(&batch, true).await;
        written.extend(ids(&batch));
        // The running relay and the flush go for the same rows.
        b.relay.wake();
        b.relay.flush().await.expect("flushed");
        let got: HashSet<String> = b.destination.got().into_iter().collect();
        let missing = written.iter().filter(|id| !got.contains(*id)).count();
        assert_eq!(
            missing, 0,
            "round {round}: rows committed before the flush not shipped"
        );
    }
    eventually("the relay is idle", Duration::from_secs(10), || async {
        !b.waiting().await
    })
    .await;
    running.cancel();
    relay.await.expect("the relay stops");
    let got = b.destination.got();
    let unique: HashSet<&String> = got.iter().collect();
    assert_eq!(unique.len(), got.len(), "a row was shipped twice");
    assert_eq!(got.len(), written.len());
}

/// A relay over a PostgreSQL outbox of its own, whose floor trusts `timings`.
struct PgFloor {
    _database: TestDatabase,
    db: ServiceDb,
    rows: Arc<PgOutbox>,
    relay: Relay<Recorder>,
    destination: Recorder,
}

impl PgFloor {
    async fn new(timings: Timings) -> Self {
        let database = TestDatabase::create().await;
        let db = database.migrated("outbox_test", &PG_MIGRATOR).await;
        let rows = Arc::new(PgOutbox::with_timings(db.clone(), timings));
        let destination = Recorder::default();
        let relay = Relay::to_over(destination.clone(), rows.clone(), peers());
        Self {
            _database: database,
            db,
            rows,
            relay,
            destination,
        }
    }

    /// A transaction that has written `events` (their numbers taken) and not committed.
    async fn uncommitted(&self, events: &[Event]) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut tx = self.db.pool().begin().await.expect("begins");
        outbox::enqueue(&mut tx, events).await.expect("written");
        tx
    }

    async fn commit(&self, events: &[Event]) {
        self.uncommitted(events)
            .await
            .commit()
            .await
            .expect("commits");
    }

    /// Ships until the relay's floor is past `seq`.
    async fn floor_past(&self, seq: i64) {
        eventually(
            "the floor passes the rows shipped",
            Duration::from_secs(10),
            || async {
                self.relay.ship_batch().await.expect("shipped");
                self.rows.floor("outbox") > seq
            },
        )
        .await;
    }
}

/// PostgreSQL keeps a shipped row's index entry until a vacuum, so the relay starts past the rows
/// it shipped; yet a row whose transaction took its number before a later row was shipped, and
/// committed after, is shipped too.
#[tokio::test]
async fn a_relay_starts_past_the_rows_it_shipped_and_still_finds_one_committed_late() {
    let b = PgFloor::new(Timings {
        late: Duration::from_millis(200),
        full_pass: Duration::from_secs(3600),
    })
    .await;
    let (early, late, later) = (events(3), events(1), events(2));
    b.commit(&early).await;
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 3);
    b.floor_past(3).await;

    let taken_early = b.uncommitted(&late).await;
    b.commit(&later).await;
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 2);
    taken_early.commit().await.expect("commits");
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 1);
    assert_eq!(
        b.destination.got(),
        [ids(&early), ids(&later), ids(&late)].concat()
    );
}

/// A transaction that outlasts what the floor trusts commits below it: a look from the start
/// finds its row.
#[tokio::test]
async fn a_row_committed_below_the_floor_is_found_by_a_look_from_the_start() {
    let b = PgFloor::new(Timings {
        late: Duration::from_millis(100),
        full_pass: Duration::from_secs(1),
    })
    .await;
    let (slow, early) = (events(1), events(2));
    let taken_first = b.uncommitted(&slow).await;
    b.commit(&early).await;
    assert_eq!(b.relay.ship_batch().await.expect("shipped").rows, 2);
    b.floor_past(3).await;
    taken_first.commit().await.expect("commits");
    eventually(
        "the slow row is shipped",
        Duration::from_secs(10),
        || async {
            b.relay.ship_batch().await.expect("shipped");
            b.destination.got().len() == 3
        },
    )
    .await;
    assert_eq!(b.destination.got(), [ids(&early), ids(&slow)].concat());
}
