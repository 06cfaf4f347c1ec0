//! The event log's contract (`EventStore`), one suite run against every backend: PostgreSQL (a
//! database of the test's own) and SQLite (a file of the test's own, as the embedded default
//! keeps it). A backend that passes here answers GetFunnel and ListTransactions as the other.

use std::sync::Arc;

use c2m_reporting::store::{EventStore, Grouping, PgEventStore, SqliteEventStore, StoredEvent};
use c2m_test_support::TestDatabase;
use chrono::{DateTime, Duration, TimeZone, Utc};

/// A backend under test, with what it needs kept alive.
struct Backend {
    store: Arc<dyn EventStore>,
    _db: Option<TestDatabase>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    async fn postgres() -> Self {
        let db = TestDatabase::create().await;
        let service = db
            .migrated(c2m_reporting::SCHEMA, &c2m_reporting::MIGRATOR)
            .await;
        Self {
            store: Arc::new(PgEventStore::new(service.pool().clone())),
            _db: Some(db),
            _dir: None,
        }
    }

    async fn sqlite() -> Self {
        use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("reporting.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .connect_with(options)
            .await
            .expect("opens");
        Self {
            store: Arc::new(SqliteEventStore::new(pool).await.expect("migrated")),
            _db: None,
            _dir: Some(dir),
        }
    }
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::Backend::postgres().await;
                    super::$test(&*backend.store).await;
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::Backend::sqlite().await;
                    super::$test(&*backend.store).await;
                }
            )*
        }
    };
}

conformance!(
    an_event_sent_again_counts_once,
    a_handoffs_later_stages_count_once_its_attempt_is_here,
    a_period_holds_its_start_and_not_its_end,
    rows_are_grouped_by_the_dimension_asked,
    first_responses_are_the_median_and_90th_percentile,
    transactions_are_paged_by_handoff_with_their_events_in_order,
);

fn at(minute: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
        .single()
        .expect("a time")
        + Duration::minutes(minute)
}

fn event(id: &str, handoff: &str, stage: &'static str, minute: i64) -> StoredEvent {
    StoredEvent {
        event_id: id.to_owned(),
        account_id: "acme".to_owned(),
        stage,
        occurred_at: at(minute),
        handoff_id: handoff.to_owned(),
        handoff_config_id: "billing".to_owned(),
        channel: "CHANNEL_SMS",
        skill_id: "billing-agents".to_owned(),
        conversation_id: String::new(),
        ivr_number: String::new(),
        error_code: String::new(),
        source: "handoff".to_owned(),
        response_delay_ms: None,
    }
}

const ATTEMPTED: &str = "FUNNEL_STAGE_ATTEMPTED";
const SENT: &str = "FUNNEL_STAGE_SENT";
const DELIVERED: &str = "FUNNEL_STAGE_DELIVERED";
const OPENED: &str = "FUNNEL_STAGE_CONVERSATION_OPENED";
const ANSWERED: &str = "FUNNEL_STAGE_ANSWERED";

/// The whole day's funnel, as (group, stage, count).
async fn day(store: &dyn EventStore, grouping: Grouping) -> Vec<(String, String, i64)> {
    store
        .funnel("acme", at(-60), at(24 * 60), grouping)
        .await
        .expect("answers")
}

fn rows(rows: &[(&str, &str, i64)]) -> Vec<(String, String, i64)> {
    rows.iter()
        .map(|(g, s, n)| ((*g).to_owned(), (*s).to_owned(), *n))
        .collect()
}

async fn an_event_sent_again_counts_once(store: &dyn EventStore) {
    let [a, b, c] = ["e1", "e2", "e3"].map(|id| event(id, "h1", ATTEMPTED, 0));
    assert_eq!(store.append(&[a, b.clone()]).await.expect("ok"), 2);
    assert_eq!(store.append(&[b, c.clone()]).await.expect("ok"), 1);
    assert_eq!(store.append(&[c.clone(), c]).await.expect("ok"), 0);
    assert_eq!(
        day(store, Grouping::None).await,
        rows(&[("", ATTEMPTED, 3)])
    );
}

async fn a_handoffs_later_stages_count_once_its_attempt_is_here(store: &dyn EventStore) {
    // The gateway's and Routing's events overtook Handoff's.
    store
        .append(&[
            event("d1", "h1", DELIVERED, 2),
            event("s1", "h1", SENT, 1),
            event("o1", "", OPENED, 3),
        ])
        .await
        .expect("ok");
    assert_eq!(
        day(store, Grouping::None).await,
        rows(&[("", OPENED, 1)]),
        "nothing of h1 before its attempt; an event of no handoff at once"
    );
    store
        .append(&[event("a1", "h1", ATTEMPTED, 0)])
        .await
        .expect("ok");
    assert_eq!(
        day(store, Grouping::None).await,
        rows(&[
            ("", ATTEMPTED, 1),
            ("", OPENED, 1),
            ("", DELIVERED, 1),
            ("", SENT, 1)
        ])
    );
}

async fn a_period_holds_its_start_and_not_its_end(store: &dyn EventStore) {
    store
        .append(&[
            event("before", "h0", ATTEMPTED, -1),
            event("start", "h1", ATTEMPTED, 0),
            event("inside", "h2", ATTEMPTED, 30),
            event("end", "h3", ATTEMPTED, 60),
        ])
        .await
        .expect("ok");
    let hour = store
        .funnel("acme", at(0), at(60), Grouping::None)
        .await
        .expect("answers");
    assert_eq!(hour, rows(&[("", ATTEMPTED, 2)]));
    let other = store
        .funnel("globex", at(-60), at(120), Grouping::None)
        .await
        .expect("answers");
    assert!(other.is_empty(), "another account's: {other:?}");
}

async fn rows_are_grouped_by_the_dimension_asked(store: &dyn EventStore) {
    let whatsapp = StoredEvent {
        channel: "CHANNEL_WHATSAPP",
        skill_id: "sales".to_owned(),
        ..event("w1", "h2", ATTEMPTED, 5)
    };
    store
        .append(&[event("s1", "h1", ATTEMPTED, 0), whatsapp])
        .await
        .expect("ok");
    assert_eq!(
        day(store, Grouping::Channel).await,
        rows(&[
            ("CHANNEL_SMS", ATTEMPTED, 1),
            ("CHANNEL_WHATSAPP", ATTEMPTED, 1)
        ])
    );
    assert_eq!(
        day(store, Grouping::Skill).await,
        rows(&[("billing-agents", ATTEMPTED, 1), ("sales", ATTEMPTED, 1)])
    );
    assert_eq!(
        day(store, Grouping::None).await,
        rows(&[("", ATTEMPTED, 2)])
    );
}

async fn first_responses_are_the_median_and_90th_percentile(store: &dyn EventStore) {
    let answered: Vec<StoredEvent> = (1..=10)
        .map(|i| StoredEvent {
            response_delay_ms: Some(i * 1000),
            ..event(&format!("a{i}"), "", ANSWERED, i)
        })
        .chain([StoredEvent {
            skill_id: "sales".to_owned(),
            response_delay_ms: Some(42),
            ..event("s1", "", ANSWERED, 1)
        }])
        .collect();
    store.append(&answered).await.expect("ok");
    let responses = store
        .first_responses("acme", at(-60), at(24 * 60), Grouping::Skill)
        .await
        .expect("answers");
    assert_eq!(
        responses,
        [
            ("billing-agents".to_owned(), 5000, 9000),
            ("sales".to_owned(), 42, 42)
        ]
    );
}

async fn transactions_are_paged_by_handoff_with_their_events_in_order(store: &dyn EventStore) {
    store
        .append(&[
            event("h2-sent", "h2", SENT, 11),
            event("h1-sent", "h1", SENT, 2),
            event("h3-attempt", "h3", ATTEMPTED, 20),
            event("h1-attempt", "h1", ATTEMPTED, 1),
            event("h2-attempt", "h2", ATTEMPTED, 10),
            // Began before the period: not one of its transactions, whatever came later.
            event("h0-attempt", "h0", ATTEMPTED, -5),
            event("h0-sent", "h0", SENT, 5),
        ])
        .await
        .expect("ok");
    let ids = |events: Vec<StoredEvent>| -> Vec<String> {
        events.into_iter().map(|e| e.event_id).collect()
    };
    let first = store
        .transactions("acme", at(0), at(60), "", 2)
        .await
        .expect("answers");
    assert_eq!(first[0].occurred_at, at(1), "times come back as written");
    assert_eq!(first[0].stage, ATTEMPTED);
    assert_eq!(
        ids(first),
        ["h1-attempt", "h1-sent", "h2-attempt", "h2-sent"]
    );
    let rest = store
        .transactions("acme", at(0), at(60), "h2", 2)
        .await
        .expect("answers");
    assert_eq!(ids(rest), ["h3-attempt"]);
}
