//! `cargo bench -p c2m-e2e --bench reporting`: how Reporting answers over a long period. Loads an
//! account's events for 13 months straight into PostgreSQL (a handoff every few minutes, four
//! events each, three channels, three configurations, four skills, five IVR numbers, consumers
//! who call back), then times the funnel series (a year in days, by channel, in UTC and in New
//! York) read from the events, builds the rollups for both zones (timed), and times the series
//! again from the rollups: a year of whole days, and the last 395 days up to now (whose partial
//! first and last days are read from the events). Then the one-period funnel (GetFunnel's query)
//! and the export (every handoff, a batch of 500 at a time), with the process's resident memory
//! sampled while it runs. In the same run, as the denominator: one plain scan counting the
//! account's events. Prints figures; asserts nothing but that both paths agree.
//!
//! Knobs (environment): C2M_BENCH_HANDOFFS (250000, four events each), C2M_BENCH_RUNS (5).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use c2m_reporting::store::{Bucket, EventStore, Grouping, PgEventStore, SeriesQuery, StoredEvent};
use c2m_test_support::TestDatabase;
use chrono::Utc;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory now, from /proc (kB).
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The median of `runs` timings of `f`.
async fn median<F, Fut, T>(runs: u64, mut f: F) -> (Duration, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(f().await);
        times.push(started.elapsed());
    }
    times.sort();
    (times[times.len() / 2], last.expect("at least one run"))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let handoffs = knob("C2M_BENCH_HANDOFFS", 250_000);
    let runs = knob("C2M_BENCH_RUNS", 5).max(1);
    let db = TestDatabase::create().await;
    let service = db
        .migrated(c2m_reporting::SCHEMA, &c2m_reporting::MIGRATOR)
        .await;
    let pool = service.pool().clone();
    let store = PgEventStore::new(pool.clone());

    let loading = Instant::now();
    sqlx::query(
        "INSERT INTO reporting.events (event_id, account_id, stage, occurred_at, handoff_id, \
             handoff_config_id, channel, skill_id, ivr_number, source, position, consumer_id) \
         SELECT 'e' || h || '-' || st.s, 'bench', st.stage, \
             x.t + st.s * interval '20 seconds' + (st.s / 3) * (h % 900) * interval '1 second', \
             'h' || h, 'cfg' || (h % 3), x.channel, \
             'skill' || (h % 4), '+1800555010' || (h % 5), 'BENCH', h * 4 + st.s, \
             CASE WHEN st.s = 0 THEN 'consumer' || (h * 7919 % ($1 / 3 + 1)) ELSE '' END \
         FROM generate_series(1, $1::bigint) h, \
             LATERAL (SELECT now() - interval '395 days' + (h::float8 / $1) * interval '395 days' AS t, \
                 (ARRAY['CHANNEL_SMS','CHANNEL_WHATSAPP','CHANNEL_RCS'])[1 + h % 3] AS channel) x, \
             LATERAL (VALUES (0, 'FUNNEL_STAGE_ATTEMPTED'), (1, 'FUNNEL_STAGE_SENT'), \
                 (2, 'FUNNEL_STAGE_DELIVERED'), (3, 'FUNNEL_STAGE_RESPONDED')) st(s, stage)",
    )
    .bind(handoffs as i64)
    .execute(&pool)
    .await
    .expect("events loaded");
    sqlx::query("INSERT INTO reporting.event_log_heads VALUES ('bench', $1)")
        .bind(handoffs as i64 * 4 + 3)
        .execute(&pool)
        .await
        .expect("the head");
    sqlx::query("VACUUM ANALYZE reporting.events")
        .execute(&pool)
        .await
        .expect("analyzed");
    println!(
        "loaded {} events ({handoffs} handoffs over 395 days) in {:.1} s",
        handoffs * 4,
        loading.elapsed().as_secs_f64()
    );

    let (end, start) = (Utc::now(), Utc::now() - chrono::Duration::days(395));
    let (scan, counted) = median(runs, || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM reporting.events WHERE account_id = 'bench'",
        )
        .fetch_one(&pool)
        .await
        .expect("counted")
    })
    .await;
    let series = |tz: &str| SeriesQuery {
        account_id: "bench".to_owned(),
        start,
        end,
        bucket: Bucket::Day,
        time_zone: tz.parse().expect("a zone"),
        group_by: vec![Grouping::Channel],
        repeat_window: chrono::Duration::hours(24),
    };
    let (in_utc, in_new_york) = (series("UTC"), series("America/New_York"));
    // From the events: the first query in a zone asks for its rollups, which nobody builds yet.
    let (utc, raw) = median(runs, || store.series(&in_utc)).await;
    let raw = raw.expect("a series");
    let rows = raw.len();
    let (new_york, _) = median(runs, || store.series(&in_new_york)).await;

    let building = Instant::now();
    let mut attempts = 0;
    loop {
        let built = store.build_rollups(2_000).await.expect("builds");
        if built == 0 {
            break;
        }
        attempts += built;
    }
    let built_in = building.elapsed();
    let days: i64 = sqlx::query_scalar("SELECT count(*) FROM reporting.funnel_days")
        .fetch_one(&pool)
        .await
        .expect("counted");
    let (rolled_utc, rolled) = median(runs, || store.series(&in_utc)).await;
    assert_eq!(rolled.expect("a series"), raw, "rollups and events agree");
    let (rolled_new_york, _) = median(runs, || store.series(&in_new_york)).await;
    // Whole local days: what a dashboard asks for.
    let whole = |tz: chrono_tz::Tz| {
        let today = end.with_timezone(&tz).date_naive();
        let midnight =
            |d: chrono::NaiveDate| c2m_reporting::store::start_of(tz, d).expect("a midnight");
        SeriesQuery {
            start: midnight(today - chrono::Duration::days(365)),
            end: midnight(today),
            ..series(tz.name())
        }
    };
    let (whole_in_utc, whole_in_new_york) =
        (whole(chrono_tz::UTC), whole(chrono_tz::America::New_York));
    let (whole_utc, whole_rows) = median(runs, || store.series(&whole_in_utc)).await;
    let whole_rows = whole_rows.expect("a series").len();
    let (whole_new_york, _) = median(runs, || store.series(&whole_in_new_york)).await;
    let last_week = SeriesQuery {
        start: end - chrono::Duration::days(7),
        ..series("UTC")
    };
    let (week, _) = median(runs, || store.series(&last_week)).await;
    let (funnel, _) = median(runs, || {
        store.funnel("bench", start, end, Grouping::Channel)
    })
    .await;

    // The export, sampling resident memory between batches.
    let export = |days: i64| {
        let store = &store;
        async move {
            let period = (end - chrono::Duration::days(days), end);
            let (mut after, mut exported, mut peak) = (None, 0u64, rss_kb());
            let started = Instant::now();
            loop {
                let page = store
                    .export_page("bench", period, after.as_ref(), 500)
                    .await
                    .expect("a page");
                let Some((at, last)) = page.last() else {
                    break;
                };
                after = Some((*at, last.handoff_id.clone()));
                exported += page
                    .windows(2)
                    .filter(|w| w[0].1.handoff_id != w[1].1.handoff_id)
                    .count() as u64
                    + 1;
                peak = peak.max(rss_kb());
            }
            (started.elapsed(), exported, peak)
        }
    };
    let before = rss_kb();
    let (month_time, month_rows, month_peak) = export(30).await;
    let (year_time, year_rows, year_peak) = export(395).await;

    println!("\nReporting over 395 days, {counted} events (median of {runs} runs)");
    println!(
        "  scan counting the account's events (the floor):   {:>8.1} ms",
        ms(scan)
    );
    let line = |what: &str, d: Duration| {
        println!(
            "  {what:<58} {:>8.1} ms  ({:.3}× the scan)",
            ms(d),
            ms(d) / ms(scan)
        );
    };
    line(
        &format!("series from the events, 395 days by channel, UTC ({rows} rows)"),
        utc,
    );
    line("the same from the events in America/New_York", new_york);
    println!(
        "  rollups built for both zones: {attempts} attempts in {:.1} s = {:.0}/s, {days} rows",
        built_in.as_secs_f64(),
        attempts as f64 / built_in.as_secs_f64()
    );
    line("series from the rollups, 395 days to now, UTC", rolled_utc);
    line(
        "the same from the rollups in America/New_York",
        rolled_new_york,
    );
    line(
        &format!("rollups, a year of whole days, UTC ({whole_rows} rows)"),
        whole_utc,
    );
    line(
        "rollups, a year of whole days, America/New_York",
        whole_new_york,
    );
    line("rollups, the last 7 days to now, UTC", week);
    println!(
        "  funnel, the year as one period by channel:         {:>8.1} ms  ({:.2}× the scan)",
        ms(funnel),
        ms(funnel) / ms(scan)
    );
    println!(
        "  export, 30 days:  {month_rows:>9} handoffs in {:>7.1} s = {:>8.0}/s, peak RSS {} MB",
        month_time.as_secs_f64(),
        month_rows as f64 / month_time.as_secs_f64(),
        month_peak / 1024
    );
    println!(
        "  export, 395 days: {year_rows:>9} handoffs in {:>7.1} s = {:>8.0}/s, peak RSS {} MB (before both: {} MB)",
        year_time.as_secs_f64(),
        year_rows as f64 / year_time.as_secs_f64(),
        year_peak / 1024,
        before / 1024
    );

    // What keeping rollups costs an append: a relay's batches (25 handoffs, four events each)
    // for an account without rollups and for one kept in a zone, interleaved.
    let batch = |account: &str, n: u64| -> Vec<StoredEvent> {
        (0..25)
            .flat_map(|h| {
                let handoff = format!("{account}-{n}-{h}");
                let at = Utc::now();
                [
                    "FUNNEL_STAGE_ATTEMPTED",
                    "FUNNEL_STAGE_SENT",
                    "FUNNEL_STAGE_DELIVERED",
                    "FUNNEL_STAGE_RESPONDED",
                ]
                .into_iter()
                .enumerate()
                .map(move |(i, stage)| StoredEvent {
                    event_id: format!("{handoff}-{i}"),
                    account_id: account.to_owned(),
                    stage,
                    occurred_at: at + chrono::Duration::seconds(i as i64),
                    handoff_id: handoff.clone(),
                    handoff_config_id: "cfg1".to_owned(),
                    channel: "CHANNEL_SMS",
                    skill_id: "skill1".to_owned(),
                    conversation_id: String::new(),
                    ivr_number: "+18005550100".to_owned(),
                    error_code: String::new(),
                    source: "BENCH".to_owned(),
                    response_delay_ms: None,
                    consumer_id: if i == 0 {
                        format!("consumer{}", h % 7)
                    } else {
                        String::new()
                    },
                })
            })
            .collect()
    };
    store
        .ask_zone("rolled", chrono_tz::UTC)
        .await
        .expect("asks");
    let (mut plain, mut rolled) = (Duration::ZERO, Duration::ZERO);
    let batches = 200;
    for n in 0..batches {
        for (account, total) in [("plain", &mut plain), ("rolled", &mut rolled)] {
            let events = batch(account, n);
            let started = Instant::now();
            store.append(&events).await.expect("appends");
            *total += started.elapsed();
        }
    }
    println!(
        "  append, a batch of 100 events: {:.2} ms without rollups, {:.2} ms kept in one zone ({:.2}×)",
        ms(plain) / batches as f64,
        ms(rolled) / batches as f64,
        ms(rolled) / ms(plain)
    );
}
