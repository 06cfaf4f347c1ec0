//! Reports a brand runs its deflection program on: the funnel over time in the account's own time
//! zone, grouped as asked, with the rates and the time consumers took to reply.

use std::time::Duration;

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::eventually;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    conversations::{CONSUMER, deflect_and_reply},
    story::{Options, Story, Topology, authed, handoff_request, onboard, token},
};

fn series_request(time_zone: &str, group_by: &[pb::FunnelGrouping]) -> pb::GetFunnelSeriesRequest {
    pb::GetFunnelSeriesRequest {
        account_id: "acme".into(),
        bucket: pb::FunnelBucket::Day as i32,
        time_zone: time_zone.into(),
        group_by: group_by.iter().map(|g| *g as i32).collect(),
        ..Default::default()
    }
}

async fn series(
    story: &Story,
    credential: &str,
    request: pb::GetFunnelSeriesRequest,
) -> Result<pb::GetFunnelSeriesResponse, tonic::Status> {
    story
        .reporting()
        .await
        .get_funnel_series(authed(request, credential))
        .await
        .map(tonic::Response::into_inner)
}

fn count(row: &pb::FunnelSeriesRow, stage: FunnelStage) -> u64 {
    row.counts
        .iter()
        .find(|c| c.stage == stage as i32)
        .map_or(0, |c| c.count)
}

fn field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("field violations")
        .field_violations[0]
        .field
        .clone()
}

#[tokio::test]
async fn the_funnel_series_is_in_the_accounts_time_zone_grouped_as_asked() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let refused = story
        .config()
        .await
        .update_account_settings(authed(
            pb::UpdateAccountSettingsRequest {
                account_id: "acme".into(),
                settings: Some(pb::AccountSettings {
                    deflection_enabled: true,
                    time_zone: "Mars/Olympus_Mons".into(),
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect_err("not a time zone");
    assert_eq!(field(&refused), "settings.time_zone");
    // India is five and a half hours ahead of UTC: its days start at 18:30 UTC.
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                time_zone: "Asia/Kolkata".into(),
                ..Default::default()
            },
        )
        .await;

    deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    story
        .deflect(handoff_request("acme", "+14155550388", "call-2"), &key)
        .await;
    // The first caller calls back while their conversation is open: skipped, and a repeat.
    story
        .deflect(handoff_request("acme", CONSUMER, "call-3"), &key)
        .await;

    let viewer = token(AuthRole::Viewer, Some("acme"));
    let by_channel = series_request("", &[pb::FunnelGrouping::Channel]);
    let total = |answer: &pb::GetFunnelSeriesResponse, stage| -> u64 {
        answer.rows.iter().map(|row| count(row, stage)).sum()
    };
    eventually(
        "the three handoffs and the reply counted",
        Duration::from_secs(10),
        || async {
            let answer = series(&story, &viewer, by_channel.clone())
                .await
                .expect("a series");
            total(&answer, FunnelStage::Attempted) == 3
                && total(&answer, FunnelStage::Responded) == 1
        },
    )
    .await;
    let answer = series(&story, &viewer, by_channel).await.expect("a series");
    assert_eq!(answer.time_zone, "Asia/Kolkata", "the account's own");
    for row in &answer.rows {
        assert_eq!(row.groups, [Channel::Sms.as_str_name()]);
        let start =
            c2m_proto::from_timestamp(row.bucket_start.as_ref().expect("a start")).expect("a time");
        assert_eq!(
            start.format("%H:%M").to_string(),
            "18:30",
            "Kolkata's midnight"
        );
        let local_day = (start + chrono::Duration::minutes(330))
            .date_naive()
            .to_string();
        assert_eq!(row.bucket_label, local_day);
    }
    let row = answer
        .rows
        .iter()
        .find(|row| count(row, FunnelStage::Responded) == 1)
        .expect("the answered handoff's day");
    assert_eq!(row.time_to_reply.expect("times").count, 1);
    assert_eq!(total(&answer, FunnelStage::Sent), 2);
    let repeats: u64 = answer.rows.iter().map(|r| r.repeat_deflections).sum();
    assert_eq!(repeats, 1, "the caller who called back");
    for row in &answer.rows {
        let expected =
            count(row, FunnelStage::Responded) as f64 / count(row, FunnelStage::Attempted) as f64;
        assert!((row.deflection_rate - expected).abs() < 1e-9, "{row:?}");
    }

    // Named in the request, another zone: the same handoffs, in UTC's days.
    let utc = series(&story, &viewer, series_request("UTC", &[]))
        .await
        .expect("a series");
    assert_eq!(utc.time_zone, "UTC");
    assert_eq!(total(&utc, FunnelStage::Attempted), 3);
    // Within a window too short for the callback to count, nothing repeats.
    let tiny = series(
        &story,
        &viewer,
        pb::GetFunnelSeriesRequest {
            repeat_window_hours: 1,
            ..series_request("UTC", &[])
        },
    )
    .await
    .expect("a series");
    assert_eq!(
        tiny.rows.iter().map(|r| r.repeat_deflections).sum::<u64>(),
        1,
        "an hour holds it"
    );
    // The consumer's id on the events is opaque: the same for both of their handoffs, never
    // their number.
    let logged = story
        .reporting()
        .await
        .list_events(authed(
            pb::ListEventsRequest {
                account_id: "acme".into(),
                page_size: 100,
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .expect("the log")
        .into_inner()
        .events;
    let ids: Vec<String> = logged
        .iter()
        .filter_map(|l| l.event.as_ref())
        .filter(|e| e.stage == FunnelStage::Attempted as i32)
        .map(|e| e.consumer_id.clone())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.iter()
            .all(|id| id.starts_with("cns_") && !id.contains("5550")),
        "{ids:?}"
    );
    assert_eq!(ids.iter().filter(|id| **id == ids[0]).count(), 2, "{ids:?}");
    assert!(utc.rows.iter().all(|r| r.groups.is_empty()));

    // Bad input names its field; another account's viewer sees nothing.
    let cases = [
        (series_request("Mars/Olympus_Mons", &[]), "time_zone"),
        (series_request(&"Europe/".repeat(20), &[]), "time_zone"),
        (
            pb::GetFunnelSeriesRequest {
                repeat_window_hours: 721,
                ..series_request("", &[])
            },
            "repeat_window_hours",
        ),
        (
            series_request(
                "",
                &[
                    pb::FunnelGrouping::Channel,
                    pb::FunnelGrouping::Skill,
                    pb::FunnelGrouping::IvrNumber,
                ],
            ),
            "group_by",
        ),
        (
            series_request("", &[pb::FunnelGrouping::Skill, pb::FunnelGrouping::Skill]),
            "group_by[1]",
        ),
        (
            pb::GetFunnelSeriesRequest {
                bucket: pb::FunnelBucket::Hour as i32,
                start_time: Some(c2m_proto::timestamp(
                    chrono::Utc::now() - chrono::Duration::days(500),
                )),
                ..series_request("", &[])
            },
            "bucket",
        ),
    ];
    for (request, expected) in cases {
        let refused = series(&story, &viewer, request).await.expect_err("refused");
        assert_eq!(field(&refused), expected);
    }
    // The export has the three handoffs, in the order attempted, with what a warehouse joins on.
    let mut exported = Vec::new();
    let mut stream = story
        .reporting()
        .await
        .export_transactions(authed(
            pb::ExportTransactionsRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .expect("an export")
        .into_inner();
    while let Some(batch) = stream.message().await.expect("a batch") {
        exported.extend(batch.transactions);
    }
    assert_eq!(exported.len(), 3);
    let attempted: Vec<chrono::DateTime<chrono::Utc>> = exported
        .iter()
        .map(|t| {
            c2m_proto::from_timestamp(t.attempted_at.as_ref().expect("a time")).expect("a time")
        })
        .collect();
    assert!(attempted.windows(2).all(|w| w[0] <= w[1]), "{attempted:?}");
    for t in &exported {
        assert_eq!(t.handoff_config_id, "billing");
        assert!(!t.stages.is_empty(), "{t:?}");
    }
    assert_eq!(
        exported
            .iter()
            .filter(|t| !t.conversation_id.is_empty())
            .count(),
        1,
        "the one that was answered"
    );
    let stranger = token(AuthRole::Viewer, Some("globex"));
    let refused = story
        .reporting()
        .await
        .export_transactions(authed(
            pb::ExportTransactionsRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
            &stranger,
        ))
        .await
        .expect_err("another account");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let denied = series(&story, &stranger, series_request("", &[]))
        .await
        .expect_err("another account");
    assert_eq!(denied.code(), Code::PermissionDenied);
    story.stop().await;
}

/// Reporting keeps 30 days: a series over 60 shows only the handoffs of the last 30. The first
/// series in the account's zone asks for its rollups; Reporting builds them in the background,
/// the series reads the same from them, and a reply recorded after counts in them.
#[tokio::test]
async fn a_series_starts_at_the_retention_horizon_and_reads_the_same_once_rolled_up() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            reporting: Some(c2m_reporting::ReportingSettings {
                retention_days: 30,
                ..Default::default()
            }),
            ..Options::default()
        },
    )
    .await;
    onboard(&story, "acme").await;
    let service =
        c2m_runtime::auth::TokenKey::new(crate::story::SECRET.as_bytes()).service_token("handoff");
    let now = chrono::Utc::now();
    let event = |handoff: &str, stage: FunnelStage, days_ago: i64| pb::Event {
        handoff_id: handoff.into(),
        channel: Channel::Sms as i32,
        occurred_at: Some(c2m_proto::timestamp(now - chrono::Duration::days(days_ago))),
        ..c2m_storage::outbox::event("acme", stage)
    };
    let reporting = story.reporting().await;
    let record = |events: Vec<pb::Event>| {
        let mut reporting = reporting.clone();
        let request = authed(pb::RecordEventsRequest { events }, &service);
        async move { reporting.record_events(request).await.expect("recorded") }
    };
    record(vec![
        event("old", FunnelStage::Attempted, 40),
        event("old", FunnelStage::Sent, 40),
        event("recent", FunnelStage::Attempted, 20),
        event("recent", FunnelStage::Sent, 20),
        event("new", FunnelStage::Attempted, 2),
    ])
    .await;
    let viewer = token(AuthRole::Viewer, Some("acme"));
    let request = pb::GetFunnelSeriesRequest {
        start_time: Some(c2m_proto::timestamp(now - chrono::Duration::days(60))),
        end_time: Some(c2m_proto::timestamp(now)),
        ..series_request("", &[])
    };
    let totals = |answer: &pb::GetFunnelSeriesResponse| -> Vec<(i32, u64)> {
        let mut totals = std::collections::BTreeMap::new();
        for row in &answer.rows {
            for c in &row.counts {
                *totals.entry(c.stage).or_default() += c.count;
            }
        }
        totals.into_iter().collect()
    };
    let from_events = series(&story, &viewer, request.clone())
        .await
        .expect("a series");
    assert_eq!(
        totals(&from_events),
        [
            (FunnelStage::Attempted as i32, 2),
            (FunnelStage::Sent as i32, 1)
        ],
        "the handoff of 40 days ago is past the horizon"
    );

    eventually("the rollups built", Duration::from_secs(20), || async {
        let mut db = story.db.connect().await;
        sqlx::query_scalar::<_, bool>(
            "SELECT ready FROM reporting.funnel_zones WHERE account_id = 'acme' AND time_zone = 'UTC'",
        )
        .fetch_optional(&mut db)
        .await
        .expect("reads")
        .unwrap_or(false)
    })
    .await;
    let rolled_up = series(&story, &viewer, request.clone())
        .await
        .expect("a series");
    assert_eq!(rolled_up, from_events, "the same from the rollups");

    record(vec![event("recent", FunnelStage::Responded, 19)]).await;
    let answered = series(&story, &viewer, request).await.expect("a series");
    assert_eq!(
        totals(&answered),
        [
            (FunnelStage::Attempted as i32, 2),
            (FunnelStage::Sent as i32, 1),
            (FunnelStage::Responded as i32, 1)
        ]
    );
}
