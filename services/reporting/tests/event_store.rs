//! The event log's contract (`EventStore`), one suite run against every backend: PostgreSQL (a
//! database of the test's own) and SQLite (a file of the test's own, as the embedded default
//! keeps it), and PostgreSQL again with rollups kept from the first event. A backend that passes
//! here answers GetFunnel, GetFunnelSeries and ListTransactions as the others.

use std::{collections::BTreeMap, sync::Arc};

use c2m_reporting::store::{
    Bucket, Durations, EventStore, Grouping, Maintenance, PgEventStore, SeriesQuery, SeriesRow,
    SqliteEventStore, StoredEvent, ZoneState, rollup::bin,
};
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

    /// PostgreSQL keeping every account's rollups in the zones the suite asks in, from its first
    /// event: day and week series then come from the rollups (and the period's partial days
    /// from the events).
    async fn postgres_rolled_up() -> Self {
        let db = TestDatabase::create().await;
        let service = db
            .migrated(c2m_reporting::SCHEMA, &c2m_reporting::MIGRATOR)
            .await;
        let zones = ["UTC", "America/New_York", "Asia/Kolkata"].map(|z| z.parse().expect("a zone"));
        Self {
            store: Arc::new(PgEventStore::new(service.pool().clone()).rolling_up(zones)),
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
        mod on_postgres_rolled_up {
            $(
                #[tokio::test]
                async fn $test() {
                    let backend = super::Backend::postgres_rolled_up().await;
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
    the_log_is_read_in_the_order_it_was_written_once_each_and_per_account,
    a_reader_starts_from_the_first_event_that_occurred_since_a_time,
    a_reader_following_concurrent_writers_misses_nothing,
    a_series_counts_each_handoff_in_its_attempts_bucket_with_every_stage,
    days_and_hours_follow_the_time_zone_across_a_dst_change,
    an_export_pages_through_handoffs_in_attempt_order_each_once,
    a_handoffs_events_are_read_in_time_order,
    a_repeat_is_an_attempt_whose_consumer_was_attempted_within_the_window,
    a_randomized_load_gives_every_bucket_and_group_its_ground_truth,
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
        consumer_id: String::new(),
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

/// The account's whole log after `position`, read a page of `page` at a time: (position, id).
async fn follow(
    store: &dyn EventStore,
    account: &str,
    mut position: i64,
    page: i64,
) -> Vec<(i64, String)> {
    let mut read = Vec::new();
    loop {
        let events = store
            .events_after(account, position, page)
            .await
            .expect("reads");
        let Some((last, _)) = events.last() else {
            return read;
        };
        position = *last;
        read.extend(events.into_iter().map(|(p, e)| (p, e.event_id)));
    }
}

async fn the_log_is_read_in_the_order_it_was_written_once_each_and_per_account(
    store: &dyn EventStore,
) {
    let globex = |id: &str| StoredEvent {
        account_id: "globex".to_owned(),
        ..event(id, "g1", ATTEMPTED, 0)
    };
    let mut answered = event("e4", "h2", ANSWERED, 3);
    answered.response_delay_ms = Some(42_000);
    answered.ivr_number = "+18005550100".to_owned();
    // Written late, occurred early: the log is in the order written, not the order occurred.
    store
        .append(&[
            event("e3", "h1", SENT, 5),
            globex("g-a"),
            event("e1", "h1", ATTEMPTED, 0),
        ])
        .await
        .expect("appends");
    store
        .append(&[
            event("e1", "h1", ATTEMPTED, 0),
            answered.clone(),
            globex("g-b"),
        ])
        .await
        .expect("appends");
    let read = follow(store, "acme", 0, 2).await;
    let ids: Vec<&str> = read.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["e3", "e1", "e4"],
        "in the order written, the repeat once"
    );
    assert!(
        read.windows(2).all(|w| w[0].0 < w[1].0),
        "positions increase: {read:?}"
    );
    let globex_ids: Vec<String> = follow(store, "globex", 0, 10)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(globex_ids, ["g-a", "g-b"]);
    // From a position on: only what came after it, every field as written.
    let after = store
        .events_after("acme", read[1].0, 10)
        .await
        .expect("reads");
    assert_eq!(after, vec![(read[2].0, answered)]);
}

async fn a_reader_starts_from_the_first_event_that_occurred_since_a_time(store: &dyn EventStore) {
    assert_eq!(
        store.position_before("acme", at(0)).await.expect("answers"),
        None,
        "an empty log has no start"
    );
    store
        .append(&[event("old", "h1", ATTEMPTED, -10)])
        .await
        .expect("appends");
    assert_eq!(
        store.position_before("acme", at(0)).await.expect("answers"),
        None,
        "nothing occurred since"
    );
    store
        .append(&[
            event("new", "h2", ATTEMPTED, 1),
            event("late", "h3", ATTEMPTED, -5),
        ])
        .await
        .expect("appends");
    let before = store
        .position_before("acme", at(0))
        .await
        .expect("answers")
        .expect("a start");
    let ids: Vec<String> = follow(store, "acme", before, 10)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    // From the first that occurred since on; one written after it is read even if it occurred
    // before (it arrived late).
    assert_eq!(ids, ["new", "late"]);
}

/// Writers append at once while a reader follows the log: whatever the order they commit in, the
/// reader, which never goes back, gets every event exactly once.
async fn a_reader_following_concurrent_writers_misses_nothing(store: &dyn EventStore) {
    const WRITERS: usize = 6;
    const BATCHES: usize = 40;
    let written = std::sync::atomic::AtomicBool::new(false);
    let writers = async {
        futures::future::join_all((0..WRITERS).map(|w| async move {
            for b in 0..BATCHES {
                let batch: Vec<StoredEvent> = (0..3)
                    .map(|i| event(&format!("w{w}-b{b}-{i}"), &format!("h{w}"), ATTEMPTED, 0))
                    .collect();
                store.append(&batch).await.expect("appends");
            }
        }))
        .await;
        written.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let reader = async {
        let mut position = 0;
        let mut read: Vec<String> = Vec::new();
        loop {
            // Checked before reading: a read after every writer finished is the last one.
            let last = written.load(std::sync::atomic::Ordering::SeqCst);
            let events = store
                .events_after("acme", position, 7)
                .await
                .expect("reads");
            match events.last() {
                Some((at, _)) => position = *at,
                None if last => break read,
                None => tokio::task::yield_now().await,
            }
            read.extend(events.into_iter().map(|(_, e)| e.event_id));
        }
    };
    let (_, read) = tokio::join!(writers, reader);
    let mut unique = read.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), read.len(), "nothing twice");
    assert_eq!(read.len(), WRITERS * BATCHES * 3, "nothing missed");
}

fn series_query(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    bucket: Bucket,
    tz: &str,
    group_by: &[Grouping],
) -> SeriesQuery {
    SeriesQuery {
        account_id: "acme".to_owned(),
        start,
        end,
        bucket,
        time_zone: tz.parse().expect("a time zone"),
        group_by: group_by.to_vec(),
        repeat_window: Duration::hours(24),
    }
}

/// A row's counts as (stage without its prefix, count).
fn counts(row: &SeriesRow) -> Vec<(String, i64)> {
    row.counts
        .iter()
        .map(|(stage, n)| (stage.trim_start_matches("FUNNEL_STAGE_").to_owned(), *n))
        .collect()
}

async fn a_series_counts_each_handoff_in_its_attempts_bucket_with_every_stage(
    store: &dyn EventStore,
) {
    let at_ivr = |e: StoredEvent, ivr: &str| StoredEvent {
        ivr_number: ivr.to_owned(),
        ..e
    };
    // h1: attempted late on day one, delivered and answered after midnight (UTC).
    // h2: WhatsApp failed, SMS sent and replied, on day one; its later events carry no IVR number.
    // h3: skipped on day two. An event of no handoff counts nowhere.
    // Minutes from 09:00 UTC on the first day (`at`) to midnight.
    let day = 15 * 60;
    let mut h1_reply = event("h1-r", "h1", "FUNNEL_STAGE_RESPONDED", day - 10 + 25);
    h1_reply.occurred_at += Duration::milliseconds(999);
    let mut h1_answer = event("h1-a", "h1", ANSWERED, day + 30);
    h1_answer.response_delay_ms = Some(120_000);
    let whatsapp = |e: StoredEvent| StoredEvent {
        channel: "CHANNEL_WHATSAPP",
        ..e
    };
    let events = vec![
        at_ivr(event("h1-1", "h1", ATTEMPTED, day - 10), "+18005550100"),
        event("h1-2", "h1", SENT, day - 9),
        event("h1-3", "h1", DELIVERED, day + 5),
        h1_reply,
        h1_answer,
        at_ivr(whatsapp(event("h2-1", "h2", ATTEMPTED, 60)), "+18005550199"),
        whatsapp(event("h2-2", "h2", "FUNNEL_STAGE_FAILED", 61)),
        event("h2-3", "h2", SENT, 62),
        event("h2-4", "h2", "FUNNEL_STAGE_RESPONDED", 62 + 3),
        at_ivr(event("h3-1", "h3", ATTEMPTED, day + 60), "+18005550100"),
        event(
            "h3-2",
            "h3",
            "FUNNEL_STAGE_SKIPPED_OPEN_CONVERSATION",
            day + 60,
        ),
        StoredEvent {
            handoff_id: String::new(),
            ..event("o-1", "", "FUNNEL_STAGE_OPTED_OUT", 70)
        },
    ];
    store.append(&events).await.expect("appends");
    let query = series_query(at(-60), at(day + 24 * 60), Bucket::Day, "UTC", &[]);
    let rows = store.series(&query).await.expect("answers");
    let days: Vec<String> = rows.iter().map(|r| r.bucket.to_string()).collect();
    assert_eq!(days, ["2026-12-01 00:00:00", "2026-12-02 00:00:00"]);
    let strings = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
        pairs.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
    };
    assert_eq!(
        counts(&rows[0]),
        strings(&[
            ("ANSWERED", 1),
            ("ATTEMPTED", 2),
            ("DELIVERED", 1),
            ("FAILED", 1),
            ("RESPONDED", 2),
            ("SENT", 2)
        ]),
        "h1 and h2 with all their stages, h1's after midnight too"
    );
    assert_eq!(
        rows[0].time_to_reply,
        Durations {
            count: 2,
            p50: bin(5 * 60_000),
            p90: bin(25 * 60_000 + 999),
            p99: bin(25 * 60_000 + 999)
        }
    );
    assert_eq!(
        rows[0].time_to_first_response,
        Durations {
            count: 1,
            p50: bin(120_000),
            p90: bin(120_000),
            p99: bin(120_000)
        }
    );
    assert_eq!(
        counts(&rows[1]),
        strings(&[("ATTEMPTED", 1), ("SKIPPED_OPEN_CONVERSATION", 1)])
    );
    assert_eq!(rows[1].time_to_reply, Durations::default());

    // By IVR number and channel: the IVR number is the handoff's, the channel the event's own.
    let query = series_query(
        at(-60),
        at(day - 60),
        Bucket::Day,
        "UTC",
        &[Grouping::IvrNumber, Grouping::Channel],
    );
    let rows = store.series(&query).await.expect("answers");
    type Grouped = (Vec<String>, Vec<(String, i64)>);
    let grouped: Vec<Grouped> = rows.iter().map(|r| (r.groups.clone(), counts(r))).collect();
    assert_eq!(
        grouped,
        [
            (
                vec!["+18005550199".to_owned(), "CHANNEL_SMS".to_owned()],
                strings(&[("RESPONDED", 1), ("SENT", 1)])
            ),
            (
                vec!["+18005550199".to_owned(), "CHANNEL_WHATSAPP".to_owned()],
                strings(&[("ATTEMPTED", 1), ("FAILED", 1)])
            ),
        ],
        "only h2 was attempted in the period"
    );
}

async fn days_and_hours_follow_the_time_zone_across_a_dst_change(store: &dyn EventStore) {
    // New York springs forward on 2026-03-08 at 02:00 EST: that day has 23 hours, from
    // 05:00 UTC to 04:00 UTC the next day. A handoff every UTC hour from the day before's
    // local midnight on.
    let start = Utc
        .with_ymd_and_hms(2026, 3, 7, 5, 0, 0)
        .single()
        .expect("a time");
    let events: Vec<StoredEvent> = (0..72)
        .map(|h| StoredEvent {
            occurred_at: start + Duration::hours(h),
            ..event(&format!("e{h}"), &format!("h{h}"), ATTEMPTED, 0)
        })
        .collect();
    store.append(&events).await.expect("appends");
    let end = start + Duration::hours(72);
    let days = store
        .series(&series_query(
            start,
            end,
            Bucket::Day,
            "America/New_York",
            &[],
        ))
        .await
        .expect("answers");
    let per_day: Vec<(String, i64)> = days
        .iter()
        .map(|r| (r.bucket.date().to_string(), r.counts[0].1))
        .collect();
    assert_eq!(
        per_day,
        [
            ("2026-03-07".to_owned(), 24),
            ("2026-03-08".to_owned(), 23),
            ("2026-03-09".to_owned(), 24),
            ("2026-03-10".to_owned(), 1)
        ]
    );
    let hours = store
        .series(&series_query(
            start + Duration::hours(24),
            start + Duration::hours(47),
            Bucket::Hour,
            "America/New_York",
            &[],
        ))
        .await
        .expect("answers");
    let labels: Vec<String> = hours
        .iter()
        .map(|r| r.bucket.format("%H:%M").to_string())
        .collect();
    assert_eq!(labels.len(), 23);
    assert!(!labels.contains(&"02:00".to_owned()), "{labels:?}");
    assert_eq!(labels[..3], ["00:00", "01:00", "03:00"]);
    let weeks = store
        .series(&series_query(
            start,
            end,
            Bucket::Week,
            "America/New_York",
            &[],
        ))
        .await
        .expect("answers");
    let per_week: Vec<(String, i64)> = weeks
        .iter()
        .map(|r| (r.bucket.date().to_string(), r.counts[0].1))
        .collect();
    // Saturday the 7th and Sunday the 8th are one week (from Monday the 2nd), then the next.
    assert_eq!(
        per_week,
        [("2026-03-02".to_owned(), 47), ("2026-03-09".to_owned(), 25)]
    );
}

async fn an_export_pages_through_handoffs_in_attempt_order_each_once(store: &dyn EventStore) {
    // Five handoffs in the period (two attempted at the same moment), one before it whose
    // later stage falls in it; written out of order.
    let events = vec![
        event("c-2", "hc", SENT, 31),
        event("c-1", "hc", ATTEMPTED, 30),
        event("b-1", "hb", ATTEMPTED, 20),
        event("a-1", "ha", ATTEMPTED, 20),
        event("a-2", "ha", SENT, 21),
        event("e-1", "he", ATTEMPTED, 50),
        event("d-1", "hd", ATTEMPTED, 40),
        event("z-1", "hz", ATTEMPTED, -5),
        event("z-2", "hz", SENT, 5),
    ];
    store.append(&events).await.expect("appends");
    let period = (at(0), at(60));
    let mut after = None;
    let mut pages: Vec<Vec<(String, Vec<String>)>> = Vec::new();
    loop {
        let page = store
            .export_page("acme", period, after.as_ref(), 2)
            .await
            .expect("a page");
        if page.is_empty() {
            break;
        }
        let mut handoffs: Vec<(String, Vec<String>)> = Vec::new();
        for (attempted_at, e) in &page {
            assert!(*attempted_at >= at(0) && *attempted_at < at(60));
            if handoffs.last().is_none_or(|(h, _)| *h != e.handoff_id) {
                handoffs.push((e.handoff_id.clone(), Vec::new()));
            }
            if let Some((_, ids)) = handoffs.last_mut() {
                ids.push(e.event_id.clone());
            }
        }
        let (last_at, last) = page.last().expect("a row");
        after = Some((*last_at, last.handoff_id.clone()));
        pages.push(handoffs);
    }
    let owned =
        |h: &str, ids: &[&str]| (h.to_owned(), ids.iter().map(|i| (*i).to_owned()).collect());
    assert_eq!(
        pages,
        [
            vec![owned("ha", &["a-1", "a-2"]), owned("hb", &["b-1"])],
            vec![owned("hc", &["c-1", "c-2"]), owned("hd", &["d-1"])],
            vec![owned("he", &["e-1"])],
        ]
    );
}

async fn a_handoffs_events_are_read_in_time_order(store: &dyn EventStore) {
    let events = vec![
        event("a-3", "ha", DELIVERED, 3),
        event("b-1", "hb", ATTEMPTED, 0),
        event("a-1", "ha", ATTEMPTED, 1),
        event("a-2", "ha", SENT, 2),
    ];
    store.append(&events).await.expect("appends");
    let read = store.handoff_events("acme", "ha").await.expect("reads");
    let ids: Vec<&str> = read.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, ["a-1", "a-2", "a-3"]);
    assert_eq!(read[2], events[0], "every field as written");
    assert!(
        store
            .handoff_events("globex", "ha")
            .await
            .expect("reads")
            .is_empty()
    );
}

async fn a_repeat_is_an_attempt_whose_consumer_was_attempted_within_the_window(
    store: &dyn EventStore,
) {
    let attempt = |id: &str, consumer: &str, minute: i64, ivr: &str| StoredEvent {
        consumer_id: consumer.to_owned(),
        ivr_number: ivr.to_owned(),
        ..event(id, id, ATTEMPTED, minute)
    };
    // c1 called at 09:00 (the day before the period too), 11:00 and 10:00 the next day; c2 once;
    // c3 twice at the same moment (neither was before the other).
    let events = vec![
        attempt("x0", "c1", -20 * 60, "+18005550100"),
        attempt("h1", "c1", 0, "+18005550100"),
        attempt("h2", "c1", 120, "+18005550199"),
        attempt("h3", "c1", 25 * 60, "+18005550100"),
        attempt("h4", "c2", 60, "+18005550100"),
        attempt("h5", "c3", 180, "+18005550100"),
        attempt("h6", "c3", 180, "+18005550100"),
    ];
    store.append(&events).await.expect("appends");
    let day = |window: i64, group_by: &[Grouping]| {
        let mut q = series_query(at(0), at(2 * 24 * 60), Bucket::Day, "UTC", group_by);
        q.repeat_window = Duration::hours(window);
        q
    };
    let repeats = |rows: Vec<SeriesRow>| -> Vec<(String, Vec<String>, u64)> {
        rows.into_iter()
            .map(|r| (r.bucket.date().to_string(), r.groups, r.repeats))
            .collect()
    };
    // Within a day: h1 (after x0, 20 hours before) and h2 (after h1); h3 is 23 hours after h2.
    let in_a_day = store.series(&day(24, &[])).await.expect("answers");
    assert_eq!(
        repeats(in_a_day),
        [
            ("2026-12-01".to_owned(), vec![], 2),
            ("2026-12-02".to_owned(), vec![], 1)
        ]
    );
    // Within an hour: none; by IVR number, h2 counts under its own.
    let in_an_hour = store.series(&day(1, &[])).await.expect("answers");
    assert!(in_an_hour.iter().all(|r| r.repeats == 0));
    let by_ivr = store
        .series(&day(3, &[Grouping::IvrNumber]))
        .await
        .expect("answers");
    assert_eq!(
        repeats(by_ivr),
        [
            ("2026-12-01".to_owned(), vec!["+18005550100".to_owned()], 0),
            ("2026-12-01".to_owned(), vec!["+18005550199".to_owned()], 1),
            ("2026-12-02".to_owned(), vec!["+18005550100".to_owned()], 0)
        ]
    );
}

/// A small deterministic generator (xorshift64*), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One random handoff: when it was attempted, on which channel, from which IVR number, for
/// which consumer, and its events as (stage, channel, time).
struct Made {
    attempted: DateTime<Utc>,
    channel: &'static str,
    ivr: String,
    consumer: String,
    events: Vec<(&'static str, &'static str, DateTime<Utc>)>,
}

/// 300 random handoffs over ten days from 40 consumers (so some call back within a day), with
/// replies at random times; their events shuffled, a third of them twice (a relay that
/// restarted mid-batch), so that later stages often come before their ATTEMPTED.
fn random_load(rng: &mut Rng) -> (Vec<Made>, Vec<StoredEvent>) {
    let channels = ["CHANNEL_SMS", "CHANNEL_WHATSAPP", "CHANNEL_RCS"];
    let stages = [
        SENT,
        DELIVERED,
        "FUNNEL_STAGE_READ",
        "FUNNEL_STAGE_RESPONDED",
    ];
    let mut events = Vec::new();
    let mut handoffs = Vec::new();
    for h in 0..300 {
        let attempted = at(-24 * 60) + Duration::seconds(rng.below(10 * 24 * 3600) as i64);
        let channel = channels[rng.below(3) as usize];
        let ivr = format!("+1800555010{}", rng.below(3));
        let consumer = format!("c{}", rng.below(40));
        let handoff = format!("r{h}");
        let mut made = vec![(ATTEMPTED, channel, attempted)];
        let mut sent_on = channel;
        if channel == "CHANNEL_WHATSAPP" && rng.below(4) == 0 {
            // Failed on WhatsApp, sent on SMS.
            made.push((
                "FUNNEL_STAGE_FAILED",
                channel,
                attempted + Duration::seconds(2),
            ));
            sent_on = "CHANNEL_SMS";
        }
        for (i, stage) in stages
            .iter()
            .take(rng.below(stages.len() as u64 + 1) as usize)
            .enumerate()
        {
            let mut when = attempted + Duration::minutes(1 + i as i64 * 7);
            if *stage == "FUNNEL_STAGE_RESPONDED" {
                when += Duration::milliseconds(rng.below(3_600_000) as i64);
            }
            made.push((*stage, sent_on, when));
        }
        for (i, (stage, on, when)) in made.iter().enumerate() {
            let is_attempt = *stage == ATTEMPTED;
            events.push(StoredEvent {
                channel: on,
                ivr_number: if is_attempt {
                    ivr.clone()
                } else {
                    String::new()
                },
                consumer_id: if is_attempt {
                    consumer.clone()
                } else {
                    String::new()
                },
                occurred_at: *when,
                ..event(&format!("{handoff}-{i}"), &handoff, stage, 0)
            });
        }
        handoffs.push(Made {
            attempted,
            channel,
            ivr,
            consumer,
            events: made,
        });
    }
    for i in (1..events.len()).rev() {
        events.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let again: Vec<StoredEvent> = events
        .iter()
        .filter(|_| rng.below(3) == 0)
        .cloned()
        .collect();
    events.extend(again);
    (handoffs, events)
}

/// What a row says, for comparing: counts by stage, repeats within a day, times to reply.
type Said = (BTreeMap<String, i64>, u64, Durations);
type Key = (chrono::NaiveDateTime, Vec<String>);

/// The series the handoffs themselves give, worked out without the store's code.
fn ground_truth(
    handoffs: &[Made],
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    tz: &str,
    bucket: Bucket,
    grouping: Grouping,
) -> BTreeMap<Key, Said> {
    use chrono::{Datelike, NaiveDateTime, Timelike};

    let zone: chrono_tz::Tz = tz.parse().expect("a zone");
    let truncate = |local: NaiveDateTime| -> NaiveDateTime {
        let midnight = local.date().and_hms_opt(0, 0, 0).expect("midnight");
        match bucket {
            Bucket::Hour => midnight + Duration::hours(i64::from(local.hour())),
            Bucket::Day => midnight,
            Bucket::Week => {
                midnight - Duration::days(i64::from(local.weekday().num_days_from_monday()))
            }
        }
    };
    let mut counts: BTreeMap<Key, BTreeMap<String, i64>> = BTreeMap::new();
    let mut repeats: BTreeMap<Key, u64> = BTreeMap::new();
    let mut replies: BTreeMap<Key, Vec<i64>> = BTreeMap::new();
    for (h, made) in handoffs.iter().enumerate() {
        if made.attempted < start || made.attempted >= end {
            continue;
        }
        let local = truncate(made.attempted.with_timezone(&zone).naive_local());
        let group = |on: &str| match grouping {
            Grouping::Channel => on.to_owned(),
            _ => made.ivr.clone(),
        };
        for (stage, on, when) in &made.events {
            let key = (local, vec![group(on)]);
            *counts
                .entry(key.clone())
                .or_default()
                .entry((*stage).to_owned())
                .or_default() += 1;
            if *stage == "FUNNEL_STAGE_RESPONDED" {
                let ms = (*when - made.attempted).num_milliseconds();
                replies.entry(key).or_default().push(ms);
            }
        }
        let called_back = handoffs.iter().enumerate().any(|(other, earlier)| {
            other != h
                && earlier.consumer == made.consumer
                && earlier.attempted < made.attempted
                && made.attempted - earlier.attempted <= Duration::hours(24)
        });
        if called_back {
            *repeats
                .entry((local, vec![group(made.channel)]))
                .or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|(key, counts)| {
            let mut times = replies.remove(&key).unwrap_or_default();
            times.sort_unstable();
            let pick = |p: f64| {
                let rank = (p * times.len() as f64).ceil() as usize;
                bin(times[rank.clamp(1, times.len()) - 1])
            };
            let durations = if times.is_empty() {
                Durations::default()
            } else {
                Durations {
                    count: times.len() as u64,
                    p50: pick(0.5),
                    p90: pick(0.9),
                    p99: pick(0.99),
                }
            };
            let r = repeats.get(&key).copied().unwrap_or_default();
            (key, (counts, r, durations))
        })
        .collect()
}

/// The queries the randomized loads are checked with: a period that starts and ends mid-day.
const CHECKS: [(&str, Bucket, Grouping); 4] = [
    ("UTC", Bucket::Day, Grouping::Channel),
    ("America/New_York", Bucket::Day, Grouping::IvrNumber),
    ("America/New_York", Bucket::Hour, Grouping::Channel),
    ("Asia/Kolkata", Bucket::Week, Grouping::Channel),
];

async fn check_against_ground_truth(store: &dyn EventStore, handoffs: &[Made]) {
    let period = (at(0), at(8 * 24 * 60));
    for (tz, bucket, grouping) in CHECKS {
        let truth = ground_truth(handoffs, period, tz, bucket, grouping);
        let rows = store
            .series(&series_query(period.0, period.1, bucket, tz, &[grouping]))
            .await
            .expect("a series");
        let got: BTreeMap<Key, Said> = rows
            .into_iter()
            .map(|r| {
                let said = (r.counts.into_iter().collect(), r.repeats, r.time_to_reply);
                ((r.bucket, r.groups), said)
            })
            .collect();
        assert_eq!(got, truth, "{tz}, {bucket:?}, {grouping:?}");
    }
}

/// Random handoffs sent in random batches: every bucket and group of the series (counts,
/// repeats, times to reply) equals what the handoffs themselves say, in UTC, New York and
/// Kolkata, by hour, day and week, by channel and by IVR.
async fn a_randomized_load_gives_every_bucket_and_group_its_ground_truth(store: &dyn EventStore) {
    let mut rng = Rng(0x00C2_6D5E_EDF0_0D01);
    let (handoffs, mut events) = random_load(&mut rng);
    while !events.is_empty() {
        let n = (1 + rng.below(40) as usize).min(events.len());
        let batch: Vec<StoredEvent> = events.drain(..n).collect();
        store.append(&batch).await.expect("appends");
    }
    check_against_ground_truth(store, &handoffs).await;
}

/// Rollups asked for after half the load, built a few attempts at a time while the rest of
/// the load (late stages of old handoffs, old consumers calling back) keeps arriving: every
/// event counts once, in the rollups or in what is read of the events, never in both.
#[tokio::test]
async fn rollups_built_while_events_keep_coming_agree_with_the_events() {
    let backend = Backend::postgres().await;
    let store = &*backend.store;
    let mut rng = Rng(0x0BAD_5EED_1234_5678);
    let (handoffs, mut events) = random_load(&mut rng);
    let rest = events.split_off(events.len() / 2);
    store.append(&events).await.expect("appends");
    for (tz, _, _) in CHECKS {
        let zone: chrono_tz::Tz = tz.parse().expect("a zone");
        assert_eq!(
            store.ask_zone("acme", zone).await.expect("asks"),
            ZoneState::Building,
            "{tz}: half the load is there to tally"
        );
    }
    let mut rest = rest.into_iter();
    loop {
        let batch: Vec<StoredEvent> = rest.by_ref().take(1 + rng.below(30) as usize).collect();
        let built = store.build_rollups(7).await.expect("builds");
        if batch.is_empty() && built == 0 {
            break;
        }
        store.append(&batch).await.expect("appends");
    }
    for (tz, _, _) in CHECKS {
        let zone: chrono_tz::Tz = tz.parse().expect("a zone");
        assert_eq!(
            store.rollup_zone("acme", zone).await.expect("reads"),
            ZoneState::Ready,
            "{tz}"
        );
    }
    check_against_ground_truth(store, &handoffs).await;
}

/// Five and a half months of handoffs in monthly partitions; retention of 90 days drops the
/// months that ended a repeat window before the horizon, and the rollups' days before it, and a
/// series from the horizon on is what it was before, from the rollups and the events alike.
#[tokio::test]
async fn retention_drops_whole_months_and_the_series_from_the_horizon_stays() {
    let backend = Backend::postgres_rolled_up().await;
    let store = &*backend.store;
    let utc = |y, m, d, h| {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0)
            .single()
            .expect("a time")
    };
    let now = utc(2027, 6, 15, 12);
    let made = store.maintain(now, None).await.expect("maintains");
    assert!(
        made.months_made >= 6,
        "{made:?}: months up to September 2027"
    );
    assert_eq!(
        store.maintain(now, None).await.expect("again").months_made,
        0
    );

    let mut rng = Rng(0x005E_ED0F_2027);
    let mut events = Vec::new();
    let mut day = utc(2027, 1, 1, 0);
    let mut h = 0;
    while day < utc(2027, 6, 14, 0) {
        for _ in 0..3 {
            let attempted = day + Duration::seconds(rng.below(86_400) as i64);
            let handoff = format!("k{h}");
            h += 1;
            events.push(StoredEvent {
                consumer_id: format!("c{}", rng.below(60)),
                occurred_at: attempted,
                ..event(&format!("{handoff}-0"), &handoff, ATTEMPTED, 0)
            });
            events.push(StoredEvent {
                occurred_at: attempted + Duration::seconds(30),
                ..event(&format!("{handoff}-1"), &handoff, SENT, 0)
            });
            if rng.below(2) == 0 {
                events.push(StoredEvent {
                    occurred_at: attempted + Duration::milliseconds(rng.below(7_200_000) as i64),
                    ..event(
                        &format!("{handoff}-2"),
                        &handoff,
                        "FUNNEL_STAGE_RESPONDED",
                        0,
                    )
                });
            }
        }
        day += Duration::days(1);
    }
    for batch in events.chunks(200) {
        store.append(batch).await.expect("appends");
    }
    let horizon = now - Duration::days(90);
    let from_horizon = |bucket| series_query(horizon, utc(2027, 6, 14, 0), bucket, "UTC", &[]);
    let before_days = store
        .series(&from_horizon(Bucket::Day))
        .await
        .expect("a series");
    let before_hours = store
        .series(&from_horizon(Bucket::Hour))
        .await
        .expect("a series");
    assert!(before_days.len() > 80 && before_days.iter().any(|r| r.repeats > 0));

    let done = store.maintain(now, Some(horizon)).await.expect("maintains");
    // The horizon is 17 March, noon; a repeat window before it is 15 February: the partition
    // of everything before 2027 and January go, February stays.
    assert_eq!(done.months_dropped, 2, "{done:?}");
    assert!(done.days_deleted > 0, "{done:?}");
    let exported = |from, to| store.export_page("acme", (from, to), None, 10);
    assert!(
        exported(utc(2027, 1, 1, 0), utc(2027, 2, 1, 0))
            .await
            .expect("reads")
            .is_empty(),
        "January's events are gone"
    );
    assert!(
        !exported(utc(2027, 2, 1, 0), utc(2027, 3, 1, 0))
            .await
            .expect("reads")
            .is_empty(),
        "February's are kept for the repeat window"
    );
    let old_days = series_query(
        utc(2027, 2, 1, 0),
        utc(2027, 3, 1, 0),
        Bucket::Day,
        "UTC",
        &[],
    );
    let old_days = store.series(&old_days).await.expect("a series");
    assert!(
        old_days.is_empty(),
        "February's days are gone from the rollups"
    );
    assert_eq!(
        store
            .series(&from_horizon(Bucket::Day))
            .await
            .expect("a series"),
        before_days,
        "from the rollups"
    );
    assert_eq!(
        store
            .series(&from_horizon(Bucket::Hour))
            .await
            .expect("a series"),
        before_hours,
        "from the events"
    );
    assert_eq!(
        store.maintain(now, Some(horizon)).await.expect("again"),
        Maintenance::default()
    );
}
