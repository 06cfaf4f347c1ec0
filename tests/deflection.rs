//! The walking skeleton: one SMS deflection travels the whole mesh, from the IVR's call to a
//! counted reply, driven over gRPC as an IVR, an admin and an operator would, with Twilio
//! emulated on loopback (its wire format and its signatures).

use std::{collections::BTreeMap, time::Duration};

use crate::story::{
    BRAND_NUMBER, Options, Story, TWILIO_SID, Topology, authed, funnel, handoff_request, onboard,
    token,
};
use c2m::{Role, app};
use c2m_proto::v1::handoff_service_client::HandoffServiceClient;
use c2m_proto::v1::{self as pb, Channel, FunnelStage, HandoffStatus, TranscriptDirection};
use c2m_runtime::auth::Role as AuthRole;
use redis::AsyncCommands;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

const CALLER: &str = "+14155550123";
const ANY_PORT: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

async fn deflect_and_reply(topology: Topology, options: Options) {
    // The lease is looked up in the shared test Redis, where the story keeps it.
    let with_redis = options.redis_url.is_none() && options.redis_cluster_nodes.is_none();
    let story = Story::start_with(topology, options).await;
    let api_key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;

    // The IVR deflects the caller.
    let first = handoff
        .create_handoff(authed(handoff_request("acme", CALLER, "call-1"), &api_key))
        .await
        .expect("handoff accepted")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(first.status, HandoffStatus::Sent as i32);
    assert_eq!(first.channel, Channel::Sms as i32);
    assert_eq!(first.skill_id, "billing-agents");
    assert!(first.handoff_id.starts_with("ho-"));
    assert_eq!(first.consumer_phone_masked, "+1415*****23");

    // Twilio got the real REST call with the rendered text.
    let sent = story.twilio.sent();
    assert_eq!(sent.len(), 1);
    let sms = &sent[0];
    assert_eq!(sms.field("To"), CALLER);
    assert_eq!(sms.field("From"), BRAND_NUMBER);
    assert_eq!(sms.field("Body"), "Hi Ada, text us here about your bill.");
    // The callback URL names our message, so Twilio's reports find it even without the SID.
    assert_eq!(
        sms.field("StatusCallback"),
        format!(
            "{}/webhooks/twilio/acme/status?message_id={}-1",
            story.webhooks, first.handoff_id
        )
    );

    // A retry with the same idempotency key returns the same handoff and sends nothing.
    let retry = handoff
        .create_handoff(authed(handoff_request("acme", CALLER, "call-1"), &api_key))
        .await
        .expect("retry accepted")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(retry.handoff_id, first.handoff_id);
    assert_eq!(story.twilio.sent().len(), 1);

    // A forged status callback is refused and changes nothing...
    let (status, _) = story
        .twilio
        .send_status(sms, "failed", Some("bm90IHR3aWxpbw=="))
        .await;
    assert_eq!(status, 403);
    // ...a signed one is taken, and taken once however often Twilio retries it.
    for _ in 0..2 {
        let (status, _) = story.twilio.send_status(sms, "delivered", None).await;
        assert_eq!(status, 200);
    }

    // The consumer replies: routing opens the conversation on the configured skill.
    let inbound_url = format!("{}/webhooks/twilio/acme/inbound", story.webhooks);
    let (status, _) = story
        .twilio
        .send_inbound(
            &inbound_url,
            TWILIO_SID,
            CALLER,
            BRAND_NUMBER,
            "Yes please",
            Some("Zm9yZ2Vk"),
        )
        .await;
    assert_eq!(status, 403, "a forged inbound message is refused");
    let (status, body) = story
        .twilio
        .send_inbound(
            &inbound_url,
            TWILIO_SID,
            CALLER,
            BRAND_NUMBER,
            "Yes please",
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert!(body.contains("<Response>"), "twilio gets TwiML: {body}");

    // The conversation is open, as the agents' API lists it.
    let viewer = token(AuthRole::Viewer, Some("acme"));
    let listed = story
        .conversations()
        .await
        .list_conversations(authed(
            pb::ListConversationsRequest {
                account_id: "acme".to_owned(),
                consumer_phone: CALLER.to_owned(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .expect("listed")
        .into_inner()
        .conversations;
    let [listed] = listed.as_slice() else {
        panic!("one conversation for the caller: {listed:?}")
    };
    let conversation_id = listed.conversation_id.clone();
    if with_redis {
        // The open-conversation lease is in Redis, naming the conversation.
        let redis = redis::Client::open(story.redis.url()).expect("url");
        let mut redis = redis
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let lease_key = format!("{}:{{acme}}:conv:{CALLER}", story.redis.prefix());
        let leased: String = redis.get(&lease_key).await.expect("the lease is held");
        assert_eq!(leased, conversation_id);
    }
    let conversation = story
        .conversations()
        .await
        .get_conversation(authed(
            pb::GetConversationRequest {
                account_id: "acme".to_owned(),
                conversation_id: conversation_id.clone(),
            },
            &viewer,
        ))
        .await
        .expect("conversation")
        .into_inner()
        .conversation
        .expect("conversation");
    assert_eq!(conversation.skill_id, "billing-agents");
    assert_eq!(conversation.handoff_id, first.handoff_id);
    let transcript: Vec<(i32, &str)> = conversation
        .transcript
        .iter()
        .map(|e| (e.direction, e.text.as_str()))
        .collect();
    assert_eq!(
        transcript,
        [
            (
                TranscriptDirection::Outbound as i32,
                "Hi Ada, text us here about your bill."
            ),
            (TranscriptDirection::Inbound as i32, "Yes please"),
        ]
    );
    let attributes = conversation.engagement_attributes.expect("attached");
    assert_eq!(
        attributes.customer_info.expect("customer").customer_id,
        "C-1001"
    );
    assert_eq!(attributes.custom["intent"], "billing");

    // A second deflection for the same consumer sends nothing.
    let second = handoff
        .create_handoff(authed(handoff_request("acme", CALLER, "call-2"), &api_key))
        .await
        .expect("answered")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(second.status, HandoffStatus::SkippedOpenConversation as i32);
    assert_eq!(story.twilio.sent().len(), 1);

    // Refused requests send nothing and are not counted.
    let no_key = handoff
        .create_handoff(tonic::Request::new(handoff_request(
            "acme",
            "+14155550124",
            "call-3",
        )))
        .await
        .expect_err("no key");
    assert_eq!(no_key.code(), Code::Unauthenticated);
    let unknown_key = handoff
        .create_handoff(authed(
            handoff_request("acme", "+14155550124", "call-3"),
            "c2m_not-a-key-anyone-was-given",
        ))
        .await
        .expect_err("an unknown key");
    assert_eq!(unknown_key.code(), Code::Unauthenticated);
    let other_key = onboard(&story, "globex").await;
    let wrong_account = handoff
        .create_handoff(authed(
            handoff_request("acme", "+14155550124", "call-4"),
            &other_key,
        ))
        .await
        .expect_err("another account's key");
    assert_eq!(wrong_account.code(), Code::PermissionDenied);
    // A person's token deflects only for an editor or admin of the account (trying a
    // configuration from the console); a viewer's is refused.
    let by_viewer = handoff
        .create_handoff(authed(
            handoff_request("acme", "+14155550124", "call-6"),
            &viewer,
        ))
        .await
        .expect_err("a viewer");
    assert_eq!(by_viewer.code(), Code::PermissionDenied);
    let bad_phone = handoff
        .create_handoff(authed(
            handoff_request("acme", "415-555-0124", "call-5"),
            &api_key,
        ))
        .await
        .expect_err("malformed phone");
    assert_eq!(bad_phone.code(), Code::InvalidArgument);
    let violations = bad_phone
        .get_details_bad_request()
        .expect("bad request details")
        .field_violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "consumer_phone");
    assert_eq!(story.twilio.sent().len(), 1);

    // The funnel, by channel.
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 2),
                    ("FUNNEL_STAGE_SENT", 1),
                    ("FUNNEL_STAGE_DELIVERED", 1),
                    ("FUNNEL_STAGE_RESPONDED", 1),
                    ("FUNNEL_STAGE_SKIPPED_OPEN_CONVERSATION", 1),
                    ("FUNNEL_STAGE_CONVERSATION_OPENED", 1),
                ],
            )],
        )
        .await;
    assert_eq!(
        funnel(&story, "globex").await,
        BTreeMap::new(),
        "nothing counted for globex"
    );
    // Asked with no period, the funnel covers the last day, its stages in the funnel's order.
    let last_day = story
        .reporting()
        .await
        .get_funnel(authed(
            pb::GetFunnelRequest {
                account_id: "acme".to_owned(),
                ..Default::default()
            },
            &viewer,
        ))
        .await
        .expect("the last day")
        .into_inner()
        .rows;
    let rates = &last_day[0];
    assert_eq!(
        (
            rates.delivery_rate,
            rates.read_rate,
            rates.response_rate,
            rates.deflection_rate
        ),
        (1.0, 0.0, 1.0, 0.5),
        "delivered/sent, read/delivered, responded/sent, responded/attempted"
    );
    let stages: Vec<(i32, u64)> = last_day[0]
        .counts
        .iter()
        .map(|c| (c.stage, c.count))
        .collect();
    assert_eq!(
        stages,
        [
            (FunnelStage::Attempted as i32, 2),
            (FunnelStage::Sent as i32, 1),
            (FunnelStage::Delivered as i32, 1),
            (FunnelStage::Responded as i32, 1),
            (FunnelStage::SkippedOpenConversation as i32, 1),
            (FunnelStage::ConversationOpened as i32, 1),
        ]
    );

    // Each handoff as a transaction: every stage it reached, in order, with the conversation.
    let now = chrono::Utc::now();
    let transactions = story
        .reporting()
        .await
        .list_transactions(authed(
            pb::ListTransactionsRequest {
                account_id: "acme".to_owned(),
                start_time: Some(c2m_proto::timestamp(now - chrono::Duration::hours(1))),
                end_time: Some(c2m_proto::timestamp(now + chrono::Duration::hours(1))),
                ..Default::default()
            },
            &token(AuthRole::Viewer, Some("acme")),
        ))
        .await
        .expect("transactions")
        .into_inner()
        .transactions;
    let stages = |t: &pb::Transaction| -> Vec<&'static str> {
        t.stages
            .iter()
            .map(|s| FunnelStage::try_from(s.stage).expect("stage").as_str_name())
            .collect()
    };
    let sent = transactions
        .iter()
        .find(|t| t.handoff_id == first.handoff_id)
        .expect("the first handoff");
    assert_eq!(
        stages(sent),
        [
            "FUNNEL_STAGE_ATTEMPTED",
            "FUNNEL_STAGE_SENT",
            "FUNNEL_STAGE_DELIVERED",
            "FUNNEL_STAGE_RESPONDED",
            "FUNNEL_STAGE_CONVERSATION_OPENED"
        ]
    );
    assert_eq!(sent.conversation_id, conversation_id);
    assert_eq!(sent.source, "TWILIO");
    let skipped = transactions
        .iter()
        .find(|t| t.handoff_id == second.handoff_id)
        .expect("the second handoff");
    assert_eq!(
        stages(skipped),
        [
            "FUNNEL_STAGE_ATTEMPTED",
            "FUNNEL_STAGE_SKIPPED_OPEN_CONVERSATION"
        ]
    );
    assert_eq!(transactions.len(), 2);

    // GetHandoff shows the delivery.
    let got = handoff
        .get_handoff(authed(
            pb::GetHandoffRequest {
                account_id: "acme".to_owned(),
                handoff_id: first.handoff_id.clone(),
            },
            &api_key,
        ))
        .await
        .expect("get")
        .into_inner()
        .handoff
        .expect("handoff");
    let progress = got.progress.expect("progress");
    assert_eq!(progress.stage, FunnelStage::Delivered as i32);
    let (sent_at, delivered_at) = (
        progress.sent_at.expect("sent"),
        progress.delivered_at.expect("delivered"),
    );
    assert!((sent_at.seconds, sent_at.nanos) <= (delivered_at.seconds, delivered_at.nanos));
    assert_eq!(progress.read_at, None);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflection_travels_c2m_dev_from_ivr_call_to_counted_reply() {
    deflect_and_reply(Topology::Dev, Options::default()).await;
}

/// `c2m dev` with no Redis: rate limits and leases in the process's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflection_travels_c2m_dev_without_redis_from_ivr_call_to_counted_reply() {
    deflect_and_reply(Topology::Dev, Options::without_redis()).await;
}

/// `c2m dev` with nothing configured: every service on its SQLite file, no Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflection_travels_c2m_dev_embedded_from_ivr_call_to_counted_reply() {
    let dir = tempfile::tempdir().expect("a data directory");
    deflect_and_reply(Topology::Dev, Options::embedded(dir.path())).await;
}

/// `c2m dev` with nothing configured keeps its data: after a restart on the same directory the
/// account, its API key, the handoff (its idempotency key answers with it, and sends nothing
/// again) and the funnel are where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2m_dev_embedded_keeps_its_data_across_a_restart() {
    let dir = tempfile::tempdir().expect("a data directory");
    let mut story = Story::start_with(Topology::Dev, Options::embedded(dir.path())).await;
    let api_key = onboard(&story, "acme").await;
    let request = handoff_request("acme", CALLER, "call-1");
    let first = story.deflect(request.clone(), &api_key).await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);
    let counted = |funnel: BTreeMap<String, BTreeMap<String, u64>>| {
        let sms = funnel.get("CHANNEL_SMS").cloned().unwrap_or_default();
        let at = |stage: &str| sms.get(stage).copied().unwrap_or(0);
        (at("FUNNEL_STAGE_ATTEMPTED"), at("FUNNEL_STAGE_SENT"))
    };
    c2m_test_support::eventually_eq(
        "the handoff's first stages counted",
        Duration::from_secs(10),
        &(1, 1),
        || async { counted(funnel(&story, "acme").await) },
    )
    .await;

    story.restart().await;
    assert_eq!(counted(funnel(&story, "acme").await), (1, 1));
    let again = story.deflect(request, &api_key).await;
    assert_eq!(
        again.handoff_id, first.handoff_id,
        "the IVR's retry finds its handoff"
    );
    assert_eq!(
        story.twilio.sent().len(),
        1,
        "and the consumer got one message"
    );
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the data directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".db"))
        .collect();
    assert_eq!(files.len(), 5, "one file per service: {files:?}");
    story.stop().await;
}

/// The same journey with Handoff's gate and Routing's leases on a Redis Cluster of three
/// primaries: each account's keys on its hash tag's node, scripts loaded on every primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflection_travels_separate_servers_on_a_redis_cluster_from_ivr_call_to_counted_reply() {
    let cluster = tokio::task::spawn_blocking(c2m_test_support::RedisCluster::start)
        .await
        .expect("the cluster starts");
    let options = Options {
        redis_cluster_nodes: Some(cluster.nodes()),
        ..Options::default()
    };
    deflect_and_reply(Topology::Separate, options).await;
    // The gate's script ran on the cluster: acme's window is on one node, its hash tag's.
    let mut holders = 0;
    for node in cluster.nodes() {
        let client = redis::Client::open(node.as_str()).expect("url");
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connects");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*:{acme}:rl:known")
            .query_async(&mut connection)
            .await
            .expect("answers");
        holders += usize::from(!keys.is_empty());
    }
    assert_eq!(holders, 1, "acme's window lives on exactly one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deflection_travels_separate_servers_from_ivr_call_to_counted_reply() {
    deflect_and_reply(Topology::Separate, Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_rate_limit_holds_across_replicas_and_only_for_that_account() {
    let story = Story::start(Topology::Dev).await;
    let acme = onboard(&story, "acme").await;
    let globex = onboard(&story, "globex").await;

    // A second Handoff replica, sharing the database, Redis and the rest of the mesh.
    let mut config = story.config.clone();
    config.peers = story.peers();
    let replica = app::spawn(ANY_PORT, &[Role::Handoff], config)
        .await
        .expect("binds");
    let replica_channel = crate::grpc::channel(&replica.endpoint()).await;
    crate::grpc::wait_for_status(
        &replica_channel,
        &["c2m.v1.HandoffService"],
        ServingStatus::Serving,
    )
    .await;
    let replicas = [
        story.handoff().await,
        HandoffServiceClient::new(replica_channel),
    ];

    // Warm both replicas' caches (key, account, configuration) without spending the limit, so the
    // burst reaches the limiter together.
    for replica in &replicas {
        let check = pb::CheckEligibilityRequest {
            account_id: "acme".to_owned(),
            handoff_config_id: "billing".to_owned(),
            consumer_phone: CALLER.to_owned(),
            template_variables: [
                ("topic".to_owned(), "x".to_owned()),
                ("first_name".to_owned(), "x".to_owned()),
            ]
            .into(),
            ..Default::default()
        };
        let answer = replica
            .clone()
            .check_eligibility(authed(check, &acme))
            .await
            .expect("eligibility")
            .into_inner();
        assert!(answer.eligible);
        assert_eq!(answer.recommended_channel, Channel::Sms as i32);
    }
    assert!(
        story.twilio.sent().is_empty(),
        "checking eligibility sends nothing"
    );

    // 40 callers of one account at once, spread over both replicas.
    let calls = (0..40).map(|i| {
        let mut client = replicas[i % 2].clone();
        let request = handoff_request(
            "acme",
            &format!("+1415555{:04}", 2000 + i),
            &format!("burst-{i}"),
        );
        let key = acme.clone();
        async move { client.create_handoff(authed(request, &key)).await }
    });
    let results = futures::future::join_all(calls).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let limited: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!((accepted, limited.len()), (30, 10), "{limited:?}");
    for status in &limited {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let retry = status
            .get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .expect("RetryInfo with a delay");
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
    }
    assert_eq!(story.twilio.sent().len(), 30, "only admitted handoffs send");

    // Another account is not slowed by acme's burst.
    let other = replicas[1]
        .clone()
        .create_handoff(authed(
            handoff_request("globex", CALLER, "globex-1"),
            &globex,
        ))
        .await
        .expect("globex is under its own limit")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(other.status, HandoffStatus::Sent as i32);

    // Rejected handoffs were never attempted.
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", 30), ("FUNNEL_STAGE_SENT", 30)],
            )],
        )
        .await;

    replica.stop().await.expect("drains cleanly");
    story.stop().await;
}

/// Events a relay could not hand to Reporting stay in the outbox (the batch is taken out in a
/// transaction that rolls back), and leave, counted once, when Reporting answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reporting_did_not_take_stay_in_the_outbox_until_it_does() {
    use c2m_runtime::{auth::TokenKey, peers::Peers};
    use c2m_storage::outbox;

    let story = Story::start(Topology::Dev).await;
    // A Handoff schema of its own, in a database no running relay reads.
    let database = c2m_test_support::TestDatabase::create().await;
    let db = database
        .migrated(c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR)
        .await;
    let events: Vec<pb::Event> = [FunnelStage::Attempted, FunnelStage::Sent]
        .into_iter()
        .map(|stage| pb::Event {
            handoff_id: "ho_outbox".into(),
            channel: Channel::Sms as i32,
            ..outbox::event("outboxco", stage)
        })
        .collect();
    let mut tx = db.pool().begin().await.expect("begins");
    outbox::enqueue(&mut tx, &events).await.expect("enqueues");
    tx.commit().await.expect("commits");
    let waiting = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM handoff.outbox")
            .fetch_one(db.pool())
            .await
            .expect("counts")
    };

    // Reporting at a port nothing listens on.
    let closed = std::net::TcpListener::bind(ANY_PORT)
        .expect("binds")
        .local_addr()
        .expect("addr");
    let key = TokenKey::new(crate::story::SECRET.as_bytes());
    let unreachable = c2m_runtime::peers::PeerSettings {
        reporting: format!("http://{closed}"),
        timeout_ms: 500,
        ..story.peers()
    };
    let relay = |settings| {
        outbox::Relay::new(
            db.clone(),
            Peers::new(&settings, key.clone(), "handoff").expect("peers"),
        )
    };
    relay(unreachable)
        .ship_batch()
        .await
        .expect_err("reporting is not there");
    assert_eq!(waiting().await, 2);

    assert_eq!(
        relay(story.peers()).ship_batch().await.expect("ships").rows,
        2
    );
    assert_eq!(waiting().await, 0);
    story
        .await_funnel(
            "outboxco",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", 1), ("FUNNEL_STAGE_SENT", 1)],
            )],
        )
        .await;
    story.stop().await;
}

/// A deflection reaches Routing through Handoff's outbox a moment after the IVR is answered. A
/// reply that comes first is not lost: Routing has Handoff ship what it has, waits for a batch
/// already on its way, and opens the conversation from it. Here the batch is held on its way
/// (Routing's insert waits on a lock the test holds) until the reply is seen waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_overtakes_its_deflection_waits_for_it() {
    let story = Story::start(Topology::Separate).await;
    let api_key = onboard(&story, "acme").await;

    let mut holder = story.db.connect().await;
    sqlx::query("BEGIN")
        .execute(&mut holder)
        .await
        .expect("begins");
    sqlx::query("LOCK TABLE routing.deflections IN SHARE MODE")
        .execute(&mut holder)
        .await
        .expect("locks Routing's deflections against writes");

    let sent = story
        .deflect(handoff_request("acme", CALLER, "call-early"), &api_key)
        .await;
    assert_eq!(sent.status, HandoffStatus::Sent as i32);

    c2m_test_support::eventually(
        "the relay's batch to wait in Routing",
        Duration::from_secs(10),
        || story.waits_on_a_lock("INSERT INTO deflections"),
    )
    .await;

    let inbound_url = format!("{}/webhooks/twilio/acme/inbound", story.webhooks);
    let reply = story.twilio.send_inbound(
        &inbound_url,
        TWILIO_SID,
        CALLER,
        BRAND_NUMBER,
        "That was quick",
        None,
    );
    let release = async {
        c2m_test_support::eventually(
            "the reply to wait for the batch on its way",
            Duration::from_secs(10),
            || story.waits_on_a_lock("DELETE FROM deflection_outbox"),
        )
        .await;
        sqlx::query("COMMIT")
            .execute(&mut holder)
            .await
            .expect("releases the lock");
    };
    let ((status, _), ()) = tokio::join!(reply, release);
    assert_eq!(status, 200);
    let conversation = story.open_conversation("acme", CALLER).await;
    assert_eq!(conversation.handoff_id, sent.handoff_id);
    assert_eq!(conversation.skill_id, "billing-agents");
    assert_eq!(
        conversation
            .transcript
            .iter()
            .map(|e| e.text.as_str())
            .collect::<Vec<_>>(),
        ["Hi Ada, text us here about your bill.", "That was quick"]
    );

    // Only c2m's own services may ask for a flush.
    let refused = story
        .handoff()
        .await
        .flush_deflections(authed(
            pb::FlushDeflectionsRequest {},
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect_err("an admin is not a service");
    assert_eq!(refused.code(), Code::PermissionDenied);

    // A batch with a bad deflection is refused whole, naming the field by its place.
    let service =
        c2m_runtime::auth::TokenKey::new(crate::story::SECRET.as_bytes()).service_token("handoff");
    let good = pb::Deflection {
        account_id: "acme".into(),
        handoff_id: "ho-batch-good".into(),
        consumer_phone: "+14155550999".into(),
        channel: Channel::Sms as i32,
        skill_id: "billing-agents".into(),
        sent_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
        ..Default::default()
    };
    let bad = pb::Deflection {
        handoff_id: "ho-batch-bad".into(),
        channel: 0,
        sent_at: None,
        ..good.clone()
    };
    let refused = story
        .routing()
        .await
        .record_deflections(authed(
            pb::RecordDeflectionsRequest {
                deflections: vec![good, bad],
            },
            &service,
        ))
        .await
        .expect_err("a deflection without channel or time");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let fields: Vec<String> = refused
        .get_details_bad_request()
        .expect("field violations")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(fields, ["deflections[1].channel", "deflections[1].sent_at"]);
    let mut conn = story.db.connect().await;
    let written: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM routing.deflections WHERE handoff_id LIKE 'ho-batch-%'",
    )
    .fetch_one(&mut conn)
    .await
    .expect("counts");
    assert_eq!(written, 0, "nothing of a refused batch is written");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_flushes_share_the_work() {
    let story = Story::start(Topology::Dev).await;
    let api_key = onboard(&story, "acme").await;
    story
        .deflect(handoff_request("acme", CALLER, "call-1"), &api_key)
        .await;

    // A burst of replies that find no deflection: each asks Handoff to flush at once. Flushes
    // are counted from here (the metrics are the process's; other tests may share it).
    let series = "c2m_outbox_flushes_total{outbox=\"deflection_outbox\"}";
    let before = story.metric(series).await.unwrap_or(0.0) as usize;
    const CALLS: usize = 32;
    let service =
        c2m_runtime::auth::TokenKey::new(crate::story::SECRET.as_bytes()).service_token("routing");
    let handoff = story.handoff().await;
    let calls = (0..CALLS).map(|_| {
        let mut handoff = handoff.clone();
        let service = service.clone();
        async move {
            let mut request = tonic::Request::new(pb::FlushDeflectionsRequest {});
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {service}").parse().expect("ascii"),
            );
            handoff.flush_deflections(request).await
        }
    });
    for answer in futures::future::join_all(calls).await {
        answer.expect("flushed");
    }

    // Each call returned once a flush that started after it had finished; calls that waited
    // for the same flush shared it.
    let runs = story.metric(series).await.expect("flushes counted") as usize - before;
    assert!(
        (1..=CALLS / 4).contains(&runs),
        "{runs} flushes for {CALLS} concurrent calls"
    );
    story.stop().await;
}

/// `database.reporting.url`: Reporting's schema, migrations and pools on a database of its own,
/// the rest on `database.url`; the funnel still counts every handoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_can_live_in_a_database_of_its_own() {
    let own = c2m_test_support::TestDatabase::create().await;
    let story = Story::start_with(
        Topology::Separate,
        Options {
            reporting_database_url: Some(own.url().to_owned()),
            ..Options::default()
        },
    )
    .await;
    let api_key = onboard(&story, "acme").await;
    story
        .handoff()
        .await
        .create_handoff(authed(handoff_request("acme", CALLER, "call-1"), &api_key))
        .await
        .expect("handoff accepted");
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[("FUNNEL_STAGE_ATTEMPTED", 1), ("FUNNEL_STAGE_SENT", 1)],
            )],
        )
        .await;
    assert_eq!(
        schemas(&story.db).await,
        ["channel_gateway", "config", "handoff", "routing"]
    );
    assert_eq!(schemas(&own).await, ["reporting"]);
    story.stop().await;
}

/// The c2m schemas in `db`.
async fn schemas(db: &c2m_test_support::TestDatabase) -> Vec<String> {
    let mut conn = db.connect().await;
    sqlx::query_scalar(
        "SELECT nspname::text FROM pg_namespace \
         WHERE nspname IN ('handoff', 'routing', 'channel_gateway', 'config', 'reporting') \
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .expect("lists schemas")
}
