//! One message per deflection, whatever fails: a Redis that lost its data, a gateway that stops
//! answering while the provider has the message, a provider that fails after taking it. Sends
//! are counted at the provider emulator, not in c2m's records.

use std::time::Duration;

use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, HandoffStatus};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::{PostgresServer, RedisServer};
use tonic::Code;
use tonic_types::StatusExt;

use crate::handoff_engine::burst;
use crate::story::{Options, Story, Topology, authed, handoff_request, onboard, token};

/// Messages the Twilio emulator took for `phone`.
fn sms_to(story: &Story, phone: &str) -> usize {
    story
        .twilio
        .sent()
        .iter()
        .filter(|m| m.field("To") == phone)
        .count()
}

/// acme deflects, up to `per_second` handoffs a second.
async fn deflecting_at(story: &Story, per_second: u32) {
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                rate_limit_per_second: per_second,
                ..Default::default()
            },
        )
        .await;
}

/// Each of `phones` was answered SENT and has one SMS at Twilio, none else was sent, and acme's
/// funnel counts each once.
async fn each_sent_once(story: &Story, phones: &[String], answers: &[pb::Handoff]) {
    for (phone, handoff) in phones.iter().zip(answers) {
        assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
        assert_eq!(sms_to(story, phone), 1, "{phone}: {handoff:?}");
    }
    assert_eq!(story.twilio.sent().len(), phones.len());
    let n = phones.len() as u64;
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", n), ("FUNNEL_STAGE_SENT", n)],
            )],
        )
        .await;
}

/// Separate servers on a PostgreSQL of the test's own (so that it can be crashed), and acme's
/// API key.
async fn on_own_postgres() -> (std::sync::Arc<PostgresServer>, Story, String) {
    let postgres = std::sync::Arc::new(PostgresServer::start());
    let story = Story::start_with(
        Topology::Separate,
        Options {
            postgres_url: Some(postgres.url()),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    (postgres, story, key)
}

/// Each of `answers` reads SENT now, as its IVR was told: written, not left for c2m to finish
/// later.
async fn each_kept_as_sent(story: &Story, key: &str, answers: &[pb::Handoff]) {
    for answered in answers {
        let stored = story.handoff_of("acme", key, &answered.handoff_id).await;
        assert_eq!(stored.status, HandoffStatus::Sent as i32, "{stored:?}");
    }
}

/// A story on a Redis of the test's own (so that it can be flushed), and acme's API key.
async fn on_own_redis() -> (RedisServer, Story, String) {
    let redis = RedisServer::start();
    let story = Story::start_with(
        Topology::Dev,
        Options {
            redis_url: Some(redis.url()),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    (redis, story, key)
}

/// Redis forgets everything.
async fn flush_all(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects");
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .expect("flushes");
}

/// Separate servers where Handoff gives the gateway 500 ms and the gateway gives Twilio 5 s; and
/// acme's API key.
async fn impatient_handoff() -> (Story, String) {
    let story = Story::start_with(
        Topology::Separate,
        Options {
            peer_timeout_ms: Some(500),
            provider_timeout_ms: Some(5_000),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    (story, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_does_not_let_a_second_handoff_message_the_consumer() {
    let (redis, story, key) = on_own_redis().await;
    let consumer = "+14155550700";
    let first = story
        .deflect(handoff_request("acme", consumer, "lost-1"), &key)
        .await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);

    // Redis forgets everything: the lease it held for the consumer is gone.
    flush_all(&redis).await;

    // Another call for the same consumer, moments later: the lease PostgreSQL holds answers.
    let second = story
        .deflect(handoff_request("acme", consumer, "lost-2"), &key)
        .await;
    assert_eq!(second.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(second.duplicate_of, first.handoff_id);
    assert_eq!(sms_to(&story, consumer), 1, "one message");
    story.stop().await;
    drop(redis);
}

/// Redis dies between two calls for one consumer: the second is decided in Handoff's memory,
/// which never saw the first (Redis admitted it). The handoffs PostgreSQL has answer: the
/// consumer is held by the first, and gets one message. Before, the second was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_died_does_not_let_a_second_handoff_message_the_consumer() {
    let (redis, story, key) = on_own_redis().await;
    let consumer = "+14155550710";
    let first = story
        .deflect(handoff_request("acme", consumer, "died-1"), &key)
        .await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);

    redis.stop();
    let second = story
        .deflect(handoff_request("acme", consumer, "died-2"), &key)
        .await;
    assert_eq!(second.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(second.duplicate_of, first.handoff_id);
    assert_eq!(sms_to(&story, consumer), 1, "one message");
    // Another consumer is deflected as usual meanwhile.
    let other = story
        .deflect(handoff_request("acme", "+14155550711", "died-3"), &key)
        .await;
    assert_eq!(other.status, HandoffStatus::Sent as i32);
    story.stop().await;
}

/// A handoff Redis admitted just before it died, not yet written (its number's lookup at Twilio),
/// and a second call for the same consumer, decided from memory meanwhile: memory took in
/// PostgreSQL's handoffs, where the first is not yet. Both take the consumer's lease in
/// PostgreSQL before they send, so the one that comes second there is skipped as a recent
/// handoff of the other: one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_redis_admitted_before_dying_and_one_decided_from_memory_send_one_message() {
    let (redis, story, key) = on_own_redis().await;
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                landline_check_enabled: true,
                ..Default::default()
            },
        )
        .await;
    let consumer = "+14155550720";
    let lookup = story.twilio.hold_next_lookup();
    let first = story.deflect(handoff_request("acme", consumer, "before"), &key);
    let second = async {
        c2m_test_support::eventually(
            "the first handoff's lookup to reach Twilio",
            Duration::from_secs(10),
            || async { story.twilio.lookups_held() == 1 },
        )
        .await;
        redis.stop();
        let second = story
            .deflect(handoff_request("acme", consumer, "after"), &key)
            .await;
        lookup.release();
        second
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(second.status, HandoffStatus::Sent as i32, "{second:?}");
    assert_eq!(
        first.status,
        HandoffStatus::SkippedRecentHandoff as i32,
        "{first:?}"
    );
    assert_eq!(first.duplicate_of, second.handoff_id);
    assert_eq!(sms_to(&story, consumer), 1, "one message");
    story.stop().await;
}

/// The same on a Redis Cluster: every node dies between two calls for one consumer. The client
/// finds no node to ask, Handoff decides from its memory and PostgreSQL's handoffs, and the
/// consumer still gets one message; another consumer is deflected meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_that_died_does_not_let_a_second_handoff_message_the_consumer() {
    let cluster = tokio::task::spawn_blocking(c2m_test_support::RedisCluster::start)
        .await
        .expect("the cluster starts");
    let story = Story::start_with(
        Topology::Dev,
        Options {
            redis_cluster_nodes: Some(cluster.nodes()),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let consumer = "+14155550720";
    let first = story
        .deflect(handoff_request("acme", consumer, "cluster-died-1"), &key)
        .await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);

    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .expect("every node killed");
    let second = story
        .deflect(handoff_request("acme", consumer, "cluster-died-2"), &key)
        .await;
    assert_eq!(second.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(second.duplicate_of, first.handoff_id);
    assert_eq!(sms_to(&story, consumer), 1, "one message");
    let other = story
        .deflect(
            handoff_request("acme", "+14155550721", "cluster-died-3"),
            &key,
        )
        .await;
    assert_eq!(other.status, HandoffStatus::Sent as i32);
    assert_eq!(sms_to(&story, "+14155550721"), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_that_sent_nothing_gives_the_consumer_back() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let consumer = "+14155550701";
    // Twilio refuses the number: the handoff failed, nobody was messaged.
    story
        .twilio
        .refuse_next(400, 21211, "Invalid 'To' Phone Number");
    let failed = story
        .deflect(handoff_request("acme", consumer, "nothing-1"), &key)
        .await;
    assert_eq!(failed.status, HandoffStatus::Failed as i32);

    // The next call for that consumer, inside the lease, is not turned away in its favour.
    let next = story
        .deflect(handoff_request("acme", consumer, "nothing-2"), &key)
        .await;
    assert_eq!(next.status, HandoffStatus::Sent as i32, "{next:?}");
    assert_eq!(sms_to(&story, consumer), 1);
    story.stop().await;
}

/// Separate servers; Handoff gives the gateway 500 ms, the gateway gives Twilio 5 s, and Twilio
/// takes its time. The IVR hears "retry", not FAILED, and its retries under the same key end in
/// the one message Twilio took, under the same handoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_does_not_answer_in_time_leaves_a_handoff_a_retry_finishes_without_a_second_message()
 {
    let (story, key) = impatient_handoff().await;
    let consumer = "+14155550702";
    let hold = story.twilio.hold_next();
    let request = handoff_request("acme", consumer, "slow-1");
    let refused = story
        .handoff()
        .await
        .create_handoff(authed(request.clone(), &key))
        .await
        .expect_err("not finished in time");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "HANDOFF_UNFINISHED");
    let handoff_id = info.metadata["handoff_id"].clone();

    // While Twilio still holds the send, a retry is told to wait: the message is at the provider.
    let waiting = story
        .handoff()
        .await
        .create_handoff(authed(request.clone(), &key))
        .await
        .expect_err("still under way");
    assert_eq!(waiting.code(), Code::Aborted, "{waiting:?}");
    assert!(waiting.message().contains(&handoff_id), "{waiting:?}");

    hold.release();
    let finished = story.deflect_retrying(request, &key).await;
    assert_eq!(finished.handoff_id, handoff_id);
    assert_eq!(finished.status, HandoffStatus::Sent as i32);
    assert_eq!(finished.channel, Channel::Sms as i32);
    assert_eq!(
        finished
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Sent as i32],
        "the gateway saw its send through after Handoff stopped waiting"
    );
    assert_eq!(sms_to(&story, consumer), 1, "one message");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_error_after_it_took_the_message_is_unconfirmed_not_failed() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let consumer = "+14155550703";
    story.twilio.error_after_taking_next();
    let handoff = story
        .deflect(handoff_request("acme", consumer, "500-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32]
    );
    // It holds the consumer as any message does.
    let again = story
        .deflect(handoff_request("acme", consumer, "500-2"), &key)
        .await;
    assert_eq!(again.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(sms_to(&story, consumer), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_number_names_the_number() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    story
        .deflect(handoff_request("acme", "+14155550704", "reused-1"), &key)
        .await;
    let refused = story
        .handoff()
        .await
        .create_handoff(authed(
            handoff_request("acme", "+14155550705", "reused-1"),
            &key,
        ))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let bad = refused.get_details_bad_request().expect("field violations");
    assert_eq!(bad.field_violations[0].field, "idempotency_key");
    assert!(
        bad.field_violations[0]
            .description
            .contains("consumer_phone differs from the first request"),
        "{bad:?}"
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paid_number_lookup_is_for_editors_not_viewers() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let lookup = |role| {
        let story = &story;
        async move {
            story
                .gateway()
                .await
                .lookup_number(authed(
                    pb::LookupNumberRequest {
                        account_id: "acme".into(),
                        phone: "+14155550706".into(),
                    },
                    &token(role, Some("acme")),
                ))
                .await
        }
    };
    let viewer = lookup(AuthRole::Viewer).await.expect_err("refused");
    assert_eq!(viewer.code(), Code::PermissionDenied);
    assert!(story.twilio.lookups().is_empty(), "nothing paid for");
    lookup(AuthRole::Editor).await.expect("an editor may");
    assert_eq!(story.twilio.lookups().len(), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_field_is_refused_naming_it_and_nothing_is_written() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut huge = handoff_request("acme", "+14155550710", "huge-1");
    huge.override_skill_id = "s".repeat(1024 * 1024);
    huge.engagement_attributes = Some(pb::EngagementAttributes {
        custom: [("note".to_owned(), "n".repeat(2000))].into(),
        ..Default::default()
    });
    let refused = story
        .handoff()
        .await
        .create_handoff(authed(huge, &key))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let fields: Vec<String> = refused
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        fields,
        ["engagement_attributes.custom[note]", "override_skill_id"]
    );
    let mut db = story.db.connect().await;
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM handoff.handoffs")
        .fetch_one(&mut db)
        .await
        .expect("counts");
    assert_eq!(written, 0);
    assert!(story.twilio.sent().is_empty());
    story.stop().await;
}

/// Two rows no destination will ever take are planted in Handoff's outbox ahead of a real
/// handoff's events: one that is not an event at all, one too large for any gRPC peer. They are
/// set aside, counted and kept, and the funnel behind them arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_that_can_never_be_delivered_does_not_hold_back_the_rows_behind_it() {
    use prost::Message;

    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let too_large = pb::Event {
        skill_id: "s".repeat(5 * 1024 * 1024),
        ..c2m_storage::outbox::event("acme", pb::FunnelStage::Attempted)
    };
    let mut db = story.db.connect().await;
    sqlx::query(
        "INSERT INTO handoff.outbox (event_id, payload) VALUES (gen_random_uuid(), $1), \
             (gen_random_uuid(), $2)",
    )
    .bind(b"\xff\xff\xff not an event".to_vec())
    .bind(too_large.encode_to_vec())
    .execute(&mut db)
    .await
    .expect("plants");

    let handoff = story
        .deflect(handoff_request("acme", "+14155550711", "behind-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", 1), ("FUNNEL_STAGE_SENT", 1)],
            )],
        )
        .await;
    let dead: Vec<(String, i32)> = sqlx::query_as(
        "SELECT outbox, octet_length(payload) FROM handoff.outbox_dead_letters ORDER BY seq",
    )
    .fetch_all(&mut db)
    .await
    .expect("reads");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(dead.iter().all(|(outbox, _)| outbox == "outbox"));
    assert_eq!(
        story
            .metric("c2m_outbox_dead_letters_total{outbox=\"outbox\"}")
            .await,
        Some(2.0)
    );
    story.stop().await;
}

/// acme's limit is 30 handoffs a second. Redis forgets everything between two bursts a moment
/// apart: the window is filled in from PostgreSQL, so no second holds more than 30 handoffs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_data_keeps_the_rate_limit() {
    let (redis, story, key) = on_own_redis().await;
    let handoff = story.handoff().await;
    let before = burst(&handoff, "acme", &key, ("before", 0)).await;
    assert_eq!(before, (30, 10));
    flush_all(&redis).await;
    burst(&handoff, "acme", &key, ("after", 100)).await;

    // Every window of 950 ms (a little less than the limit's second, for the moments between
    // admission and the handoff's timestamp) holds at most 30 handoffs.
    let mut db = story.db.connect().await;
    let times: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT created_at FROM handoff.handoffs WHERE account_id = 'acme' ORDER BY created_at",
    )
    .fetch_all(&mut db)
    .await
    .expect("reads");
    let busiest = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + chrono::Duration::milliseconds(950))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(busiest <= 30, "{busiest} handoffs in one window");
    story.stop().await;
    drop(redis);
}

/// The gateway's report of delivery reaches Reporting before Handoff's events of the same handoff
/// (three services, three outboxes): the funnel does not show it delivered before it shows it
/// attempted and sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_funnel_never_shows_a_later_stage_of_a_handoff_without_its_earlier_ones() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let service = c2m_runtime::auth::TokenKey::new(crate::story::SECRET.as_bytes())
        .service_token("channel-gateway");
    let event = |stage: pb::FunnelStage| pb::Event {
        handoff_id: "ho_early".into(),
        channel: Channel::Sms as i32,
        ..c2m_storage::outbox::event("acme", stage)
    };
    let mut reporting = story.reporting().await;
    reporting
        .record_events(authed(
            pb::RecordEventsRequest {
                events: vec![event(pb::FunnelStage::Delivered)],
            },
            &service,
        ))
        .await
        .expect("recorded");
    assert_eq!(
        crate::story::funnel(&story, "acme").await,
        Default::default()
    );

    reporting
        .record_events(authed(
            pb::RecordEventsRequest {
                events: vec![
                    event(pb::FunnelStage::Attempted),
                    event(pb::FunnelStage::Sent),
                ],
            },
            &service,
        ))
        .await
        .expect("recorded");
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 1),
                    ("FUNNEL_STAGE_SENT", 1),
                    ("FUNNEL_STAGE_DELIVERED", 1),
                ],
            )],
        )
        .await;
    story.stop().await;
}

/// The gateway does not answer in time and the IVR never calls back (the call is over): c2m
/// finishes the handoff itself, from the request it kept, with the message Twilio took, and the
/// funnel has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_its_ivr_never_retries_is_finished_by_c2m() {
    let (story, key) = impatient_handoff().await;
    let consumer = "+14155550720";
    let hold = story.twilio.hold_next();
    let refused = story
        .handoff()
        .await
        .create_handoff(authed(handoff_request("acme", consumer, "left-1"), &key))
        .await
        .expect_err("not finished in time");
    let handoff_id = refused
        .get_details_error_info()
        .expect("ErrorInfo")
        .metadata["handoff_id"]
        .clone();
    hold.release();

    c2m_test_support::eventually(
        "c2m to finish the handoff",
        Duration::from_secs(20),
        || async {
            story
                .handoff()
                .await
                .get_handoff(authed(
                    pb::GetHandoffRequest {
                        account_id: "acme".into(),
                        handoff_id: handoff_id.clone(),
                    },
                    &key,
                ))
                .await
                .is_ok_and(|h| {
                    h.into_inner()
                        .handoff
                        .is_some_and(|h| h.status == HandoffStatus::Sent as i32)
                })
        },
    )
    .await;
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", 1), ("FUNNEL_STAGE_SENT", 1)],
            )],
        )
        .await;
    assert_eq!(sms_to(&story, consumer), 1);
    story.stop().await;
}

/// 60 handoffs for 60 consumers at about 100 a second on separate servers, while PostgreSQL cuts
/// every connection of c2m's database every 150 ms (as a restart or a failover does). Each IVR
/// retries under its key while it hears "retry" (and must hear nothing else): in the end every
/// handoff is SENT, every consumer has exactly one message at the emulator, and the funnel counts
/// each handoff once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_cutting_every_connection_under_load_costs_no_message_twice_and_loses_none() {
    let story = Story::start(Topology::Separate).await;
    let key = onboard(&story, "acme").await;
    deflecting_at(&story, 200).await;
    let phones: Vec<String> = (0..60).map(|i| format!("+1415888{i:04}")).collect();
    let stop = c2m_runtime::CancellationToken::new();
    let cutter = {
        let stop = stop.clone();
        let db = &story.db;
        async move {
            let mut cuts = 0;
            let mut pace = tokio::time::interval(Duration::from_millis(150));
            while !stop.is_cancelled() {
                pace.tick().await;
                let mut admin = db.connect().await;
                let cut: Vec<bool> = sqlx::query_scalar(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .fetch_all(&mut admin)
                .await
                .expect("terminates");
                cuts += cut.iter().filter(|c| **c).count();
            }
            cuts
        }
    };
    let load = async {
        let mut pace = tokio::time::interval(Duration::from_millis(10));
        let mut calls = Vec::new();
        for (i, phone) in phones.iter().enumerate() {
            pace.tick().await;
            let request = handoff_request("acme", phone, &format!("cut-{i}"));
            let story = &story;
            let key = &key;
            calls.push(async move { story.deflect_retrying(request, key).await });
        }
        let answers = futures::future::join_all(calls).await;
        stop.cancel();
        answers
    };
    let (answers, cuts) = tokio::join!(load, cutter);
    assert!(cuts > 0, "connections were cut");
    each_sent_once(&story, &phones, &answers).await;
    story.stop().await;
}

/// PostgreSQL crashing (every process stopped at once, nothing flushed) and coming back through
/// crash recovery, twice, while an IVR deflects 150 callers at 100 a second on separate
/// servers: every handoff ends SENT and is still there once it is back, each caller has one SMS at
/// Twilio, and the funnel is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashing_and_restarting_under_load_costs_no_message_twice_and_loses_none() {
    let (postgres, story, key) = on_own_postgres().await;
    deflecting_at(&story, 200).await;
    // Twilio answers in 250 ms, so that sends are at Twilio when PostgreSQL goes, and their
    // outcomes come back while it is away.
    story
        .twilio
        .set_latency(c2m_test_support::Latency::Fixed(Duration::from_millis(250)));
    let phones: Vec<String> = (0..150).map(|i| format!("+1415777{i:04}")).collect();
    // A crash once Twilio has taken 20 messages, and another at 60: handoffs are on their way
    // each time.
    let crashes = async {
        let mut at = Vec::new();
        for after in [20, 60] {
            c2m_test_support::eventually(
                "the load to get that far",
                Duration::from_secs(30),
                || async { story.twilio.sent().len() >= after },
            )
            .await;
            at.push(story.twilio.sent().len());
            let postgres = postgres.clone();
            tokio::task::spawn_blocking(move || postgres.crash_and_restart())
                .await
                .expect("restarted");
        }
        at
    };
    // Callers arrive 10 ms apart, each at its own time, while the others are on their way.
    let load = futures::future::join_all(phones.iter().enumerate().map(|(i, phone)| {
        let request = handoff_request("acme", phone, &format!("crash-{i}"));
        let (story, key) = (&story, &key);
        async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            story.deflect_retrying(request, key).await
        }
    }));
    let (answers, crashed_at) = tokio::join!(load, crashes);
    assert!(
        crashed_at.iter().all(|sent| *sent < 150),
        "both crashes came while handoffs were on their way: at {crashed_at:?} messages"
    );
    // What was acknowledged is there after both crashes.
    each_kept_as_sent(&story, &key, &answers).await;
    each_sent_once(&story, &phones, &answers).await;
    story.stop().await;
}

/// PostgreSQL crashing while twenty handoffs are at Twilio, and staying down for 4 s, longer than
/// c2m's pools wait for a connection (3 s): the handoffs' outcomes cannot be written when Twilio
/// answers, and are offered again until PostgreSQL is back. Every handoff ends SENT and is read
/// back, one SMS each, the funnel exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_down_while_sends_are_at_twilio_loses_no_outcome() {
    let (postgres, story, key) = on_own_postgres().await;
    story
        .twilio
        .set_latency(c2m_test_support::Latency::Fixed(Duration::from_millis(500)));
    let phones: Vec<String> = (0..20).map(|i| format!("+1415555{i:04}")).collect();
    let outage = async {
        c2m_test_support::eventually(
            "every send to reach Twilio",
            Duration::from_secs(30),
            || async { story.twilio.requests() == 20 },
        )
        .await;
        let postgres_ = postgres.clone();
        tokio::task::spawn_blocking(move || postgres_.crash())
            .await
            .expect("crashed");
        // The outage's length, not a wait for anything: past the pools' wait for a connection.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let postgres = postgres.clone();
        tokio::task::spawn_blocking(move || postgres.start_again())
            .await
            .expect("started");
    };
    let load = futures::future::join_all(phones.iter().enumerate().map(|(i, phone)| {
        story.deflect_retrying(handoff_request("acme", phone, &format!("down-{i}")), &key)
    }));
    let (answers, ()) = tokio::join!(load, outage);
    // What the IVRs were told is written.
    each_kept_as_sent(&story, &key, &answers).await;
    each_sent_once(&story, &phones, &answers).await;
    story.stop().await;
}

/// Redis killed while an IVR deflects 150 callers at 100 a second, each called twice at once
/// under one idempotency key (a retry after a timeout), and started again empty a moment later:
/// Handoff decides from memory meanwhile and fills Redis in from PostgreSQL after. Each caller's
/// two calls answer one handoff, SENT, Twilio takes one message per caller, and the funnel is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_started_empty_under_load_costs_no_message_twice() {
    let (redis, story, key) = on_own_redis().await;
    deflecting_at(&story, 400).await;
    story
        .twilio
        .set_latency(c2m_test_support::Latency::Fixed(Duration::from_millis(100)));
    let port = redis.port();
    let phones: Vec<String> = (0..150).map(|i| format!("+1415666{i:04}")).collect();
    // Killed once Twilio has taken 20 messages; back, empty, at 60.
    let outage = async {
        c2m_test_support::eventually("the load to start", Duration::from_secs(30), || async {
            story.twilio.sent().len() >= 20
        })
        .await;
        let killed_at = story.twilio.sent().len();
        redis.stop();
        c2m_test_support::eventually("the load to go on", Duration::from_secs(30), || async {
            story.twilio.sent().len() >= 60
        })
        .await;
        let back_at = story.twilio.sent().len();
        let redis = tokio::task::spawn_blocking(move || RedisServer::start_on(port))
            .await
            .expect("started");
        (redis, killed_at, back_at)
    };
    let load = futures::future::join_all(phones.iter().enumerate().map(|(i, phone)| {
        let request = handoff_request("acme", phone, &format!("redis-{i}"));
        let (story, key) = (&story, &key);
        async move {
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let retry = async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                story.deflect_retrying(request.clone(), key).await
            };
            tokio::join!(story.deflect_retrying(request.clone(), key), retry)
        }
    }));
    let (answers, (_redis, killed_at, back_at)) = tokio::join!(load, outage);
    assert!(
        back_at < 150,
        "Redis came back while callers were still arriving: killed at {killed_at}, back at \
         {back_at} messages"
    );
    for (phone, (first, retry)) in phones.iter().zip(&answers) {
        assert_eq!(first.handoff_id, retry.handoff_id, "{phone}");
    }
    let firsts: Vec<pb::Handoff> = answers.into_iter().map(|(first, _)| first).collect();
    each_sent_once(&story, &phones, &firsts).await;
    story.stop().await;
}

/// A replica running `handoff.max_in_progress` handoffs refuses the next at once: RESOURCE_EXHAUSTED
/// with reason OVERLOADED and a retry delay, nothing written and nothing sent. A handoff whose IVR
/// stopped waiting still holds its place until it ends, so an overload cannot pile up work that no
/// caller waits for; once it ends, the refused request's retry sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_at_its_limit_of_handoffs_refuses_at_once_and_sends_nothing() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            max_handoffs_in_progress: Some(1),
            peer_timeout_ms: Some(20_000),
            provider_timeout_ms: Some(20_000),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let (first, second) = ("+14155550730", "+14155550731");

    // The first handoff's IVR gives up while Twilio holds its message: the handoff runs on.
    let hold = story.twilio.hold_next();
    let mut impatient = authed(handoff_request("acme", first, "limit-1"), &key);
    impatient.set_timeout(Duration::from_millis(300));
    story
        .handoff()
        .await
        .create_handoff(impatient)
        .await
        .expect_err("the IVR stopped waiting");
    c2m_test_support::eventually(
        "the first message at Twilio",
        Duration::from_secs(10),
        || async { story.twilio.requests() == 1 },
    )
    .await;

    let request = handoff_request("acme", second, "limit-2");
    let refused = story
        .handoff()
        .await
        .create_handoff(authed(request.clone(), &key))
        .await
        .expect_err("the replica is at its limit");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "OVERLOADED");
    assert_eq!(info.metadata["max_in_progress"], "1");
    assert!(refused.get_details_retry_info().is_some(), "{refused:?}");
    assert_eq!(story.twilio.requests(), 1, "nothing sent for the refused");

    hold.release();
    let sent = story.deflect_retrying(request, &key).await;
    assert_eq!(sent.status, HandoffStatus::Sent as i32);
    assert_eq!(sms_to(&story, first), 1);
    assert_eq!(sms_to(&story, second), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_id_sent_four_times_at_once_reaches_twilio_once() {
    one_id_four_times(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_one_message_id_sent_four_times_at_once_reaches_twilio_once() {
    let dir = tempfile::tempdir().expect("a data directory");
    one_id_four_times(Options::embedded(dir.path())).await;
}

/// Two requests carrying one handoff at once send its message id twice. Thirty ids, each sent
/// four times at once, so that claims of one id share the gateway's batches: Twilio takes each id
/// once, and every sender hears that message or that it is at Twilio now.
async fn one_id_four_times(options: Options) {
    let story = Story::start_with(Topology::Dev, options).await;
    onboard(&story, "acme").await;
    let gateway = story.gateway().await;
    let operator = token(AuthRole::Operator, None);
    let sends = (0..30).flat_map(|n| {
        let (gateway, operator) = (gateway.clone(), operator.clone());
        (0..4).map(move |_| {
            let mut gateway = gateway.clone();
            let request = authed(
                pb::SendMessageRequest {
                    account_id: "acme".into(),
                    message_id: format!("twin-{n}"),
                    channel: Channel::Sms as i32,
                    to: format!("+1415555{:04}", 2000 + n),
                    text: "We can pick this up here.".into(),
                    ..Default::default()
                },
                &operator,
            );
            async move { (n, gateway.send_message(request).await) }
        })
    });
    let answers = futures::future::join_all(sends).await;
    let sent = story.twilio.sent();
    assert_eq!(sent.len(), 30, "one message per id: {sent:#?}");
    for (n, answer) in answers {
        match answer {
            Ok(answer) => {
                let message = answer.into_inner().message.expect("message");
                assert_eq!(message.message_id, format!("twin-{n}"));
                assert_eq!(message.stage, pb::FunnelStage::Sent as i32);
            }
            Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
        }
    }
    story.stop().await;
}
