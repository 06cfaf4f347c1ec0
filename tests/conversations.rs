//! Agents and bots and the conversations deflections open: the live stream and its resumption by
//! cursor, claims, replies on the consumer's channel with their delivery stages (once, however
//! often retried), transfers, closes (by an agent and by the idle timer) that let the next
//! deflection go, and WhatsApp's window. Who may do what is `conversation_rules.rs`.

use std::time::Duration;

use c2m_proto::v1::{
    self as pb, Channel, FunnelStage, TranscriptDirection, conversation_event::Kind,
};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::{eventually, eventually_eq};
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

use crate::story::{
    BRAND_NUMBER, Options, Story, Topology, agent, authed, funnel, handoff_request, onboard, token,
};

pub(crate) const CONSUMER: &str = "+14155550301";
pub(crate) const SKILL: &str = "billing-agents";

/// The next event on `stream`, within ten seconds.
pub(crate) async fn next(
    stream: &mut Streaming<pb::WatchConversationsResponse>,
) -> pb::ConversationEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
        .event
        .expect("an event")
}

/// An event, in a few words: what happened, and to which message.
pub(crate) fn describe(event: &pb::ConversationEvent) -> String {
    let entry = |e: &pb::TranscriptEntry| {
        let stage = FunnelStage::try_from(e.stage).unwrap_or_default();
        format!(
            "{} {:?} by {} ({})",
            if e.direction == TranscriptDirection::Inbound as i32 {
                "in"
            } else {
                "out"
            },
            e.text,
            e.author,
            stage.as_str_name()
        )
    };
    match event.kind.as_ref().expect("a kind") {
        Kind::Opened(c) => format!("opened on {}", c.skill_id),
        Kind::Message(e) => format!("message {}", entry(e)),
        Kind::MessageStage(e) => format!("stage {}", entry(e)),
        Kind::Assigned(a) => format!("assigned to {}", a.assignee),
        Kind::Released(r) => format!("released by {}", r.previous_assignee),
        Kind::Transferred(t) => format!("transferred {} -> {}", t.from_skill_id, t.to_skill_id),
        Kind::Closed(c) => format!("closed: {} by {}", c.reason, c.by),
    }
}

pub(crate) async fn watch(
    story: &Story,
    credential: &str,
    cursor: &str,
) -> Streaming<pb::WatchConversationsResponse> {
    story
        .conversations()
        .await
        .watch_conversations(authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                skill_ids: Vec::new(),
                cursor: cursor.into(),
                since: None,
            },
            credential,
        ))
        .await
        .expect("watching")
        .into_inner()
}

/// The IVR deflects `phone` and the consumer answers the SMS: the conversation opens; its id.
pub(crate) async fn deflect_and_reply(
    story: &Story,
    key: &str,
    phone: &str,
    idempotency_key: &str,
) -> String {
    let handoff = story
        .deflect(handoff_request("acme", phone, idempotency_key), key)
        .await;
    assert_eq!(handoff.status, pb::HandoffStatus::Sent as i32);
    story.sms_to_acme(phone, "I have a question").await;
    story.open_conversation("acme", phone).await.conversation_id
}

pub(crate) fn reply(
    conversation_id: &str,
    client_message_id: &str,
    text: &str,
) -> pb::SendConversationMessageRequest {
    pb::SendConversationMessageRequest {
        account_id: "acme".into(),
        conversation_id: conversation_id.into(),
        client_message_id: client_message_id.into(),
        text: text.into(),
        ..Default::default()
    }
}

pub(crate) async fn send(
    story: &Story,
    credential: &str,
    request: pb::SendConversationMessageRequest,
) -> Result<pb::TranscriptEntry, tonic::Status> {
    story
        .conversations()
        .await
        .send_conversation_message(authed(request, credential))
        .await
        .map(|r| r.into_inner().entry.expect("entry"))
}

pub(crate) async fn assign(
    story: &Story,
    credential: &str,
    conversation_id: &str,
) -> Result<pb::Conversation, tonic::Status> {
    story
        .conversations()
        .await
        .assign_conversation(authed(
            pb::AssignConversationRequest {
                account_id: "acme".into(),
                conversation_id: conversation_id.into(),
                ..Default::default()
            },
            credential,
        ))
        .await
        .map(|r| r.into_inner().conversation.expect("conversation"))
}

pub(crate) async fn conversation(
    story: &Story,
    credential: &str,
    conversation_id: &str,
) -> Result<pb::Conversation, tonic::Status> {
    story
        .conversations()
        .await
        .get_conversation(authed(
            pb::GetConversationRequest {
                account_id: "acme".into(),
                conversation_id: conversation_id.into(),
            },
            credential,
        ))
        .await
        .map(|r| r.into_inner().conversation.expect("conversation"))
}

pub(crate) async fn close(
    story: &Story,
    credential: &str,
    conversation_id: &str,
    reason: &str,
) -> pb::Conversation {
    story
        .conversations()
        .await
        .close_conversation(authed(
            pb::CloseConversationRequest {
                account_id: "acme".into(),
                conversation_id: conversation_id.into(),
                reason: reason.into(),
            },
            credential,
        ))
        .await
        .expect("closed")
        .into_inner()
        .conversation
        .expect("conversation")
}

/// The whole way: the stream shows the conversation open with the deflection on top and the
/// caller's attributes; the agent claims it and answers, the answer reaching the consumer from
/// the brand's number once however often it is retried; Twilio's report and the consumer's next
/// message follow on the stream; the transcript holds it all in order; the funnel counts the
/// answer and not the agent's message; closing lets the next deflection go.
#[tokio::test]
async fn an_agent_sees_answers_and_closes_a_deflected_conversation() {
    let story = Story::start_with(
        Topology::Separate,
        Options {
            consumer_lease_ms: Some(1),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let ada = agent("acme", "agent-ada", &[SKILL]);
    let mut stream = watch(&story, &ada, "").await;

    deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let opened = next(&mut stream).await;
    let Some(Kind::Opened(shown)) = &opened.kind else {
        panic!("the conversation opens first: {}", describe(&opened));
    };
    let id = shown.conversation_id.clone();
    assert_eq!(shown.skill_id, SKILL);
    assert_eq!(shown.consumer_address, CONSUMER);
    assert_eq!(shown.channel, Channel::Sms as i32);
    let attributes = shown.engagement_attributes.as_ref().expect("attributes");
    assert_eq!(
        attributes
            .customer_info
            .as_ref()
            .expect("ctmrinfo")
            .customer_id,
        "C-1001"
    );
    let opening: Vec<(&str, &str)> = shown
        .transcript
        .iter()
        .map(|e| (e.author.as_str(), e.text.as_str()))
        .collect();
    assert_eq!(
        opening,
        [
            ("deflection", "Hi Ada, text us here about your bill."),
            ("consumer", "I have a question"),
        ]
    );

    let claimed = assign(&story, &ada, &id).await.expect("claimed");
    assert_eq!(claimed.assignee, "agent-ada");
    assert_eq!(describe(&next(&mut stream).await), "assigned to agent-ada");

    let answer = "Hello Ada, I can help with your bill.";
    let entry = send(&story, &ada, reply(&id, "m-1", answer))
        .await
        .expect("sent");
    assert_eq!(entry.stage, FunnelStage::Sent as i32);
    assert_eq!(entry.author, "agent-ada");
    // Retried (a lost answer, a client's restart): the same message, nothing sent again.
    let again = send(&story, &ada, reply(&id, "m-1", answer))
        .await
        .expect("the same");
    assert_eq!(again.message_id, entry.message_id);
    let to_consumer: Vec<_> = story
        .twilio
        .sent()
        .into_iter()
        .filter(|sms| sms.field("Body") == answer)
        .collect();
    assert_eq!(to_consumer.len(), 1, "one SMS for the answer");
    assert_eq!(to_consumer[0].field("To"), CONSUMER);
    assert_eq!(to_consumer[0].field("From"), BRAND_NUMBER);
    // Another text under a used id is the caller's mistake, not a second message.
    let reused = send(&story, &ada, reply(&id, "m-1", "something else")).await;
    assert_eq!(reused.expect_err("refused").code(), Code::AlreadyExists);

    assert_eq!(
        describe(&next(&mut stream).await),
        format!("message out {answer:?} by agent-ada (FUNNEL_STAGE_UNSPECIFIED)")
    );
    assert_eq!(
        describe(&next(&mut stream).await),
        format!("stage out {answer:?} by agent-ada (FUNNEL_STAGE_SENT)")
    );
    let (status, _) = story
        .twilio
        .send_status(&to_consumer[0], "delivered", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        describe(&next(&mut stream).await),
        format!("stage out {answer:?} by agent-ada (FUNNEL_STAGE_DELIVERED)")
    );
    // A picture goes with the text as an MMS.
    let bill = "https://acme.example.com/bills/C-1001.png";
    let with_picture = pb::SendConversationMessageRequest {
        media_urls: vec![bill.into()],
        ..reply(&id, "m-pic", "Your bill:")
    };
    let pictured = send(&story, &ada, with_picture).await.expect("sent");
    assert_eq!(pictured.media_urls, [bill]);
    let mms = story.twilio.sent().pop().expect("sent to Twilio");
    assert_eq!(
        (mms.field("Body"), mms.media_urls.as_slice()),
        ("Your bill:", [bill.to_owned()].as_slice())
    );
    assert_eq!(
        describe(&next(&mut stream).await),
        "message out \"Your bill:\" by agent-ada (FUNNEL_STAGE_UNSPECIFIED)"
    );
    assert_eq!(
        describe(&next(&mut stream).await),
        "stage out \"Your bill:\" by agent-ada (FUNNEL_STAGE_SENT)"
    );
    story.sms_to_acme(CONSUMER, "It is too high").await;
    assert_eq!(
        describe(&next(&mut stream).await),
        "message in \"It is too high\" by consumer (FUNNEL_STAGE_UNSPECIFIED)"
    );

    let whole = conversation(&story, &ada, &id).await.expect("conversation");
    let transcript: Vec<(i64, &str, &str, i32)> = whole
        .transcript
        .iter()
        .map(|e| (e.seq, e.author.as_str(), e.text.as_str(), e.stage))
        .collect();
    assert_eq!(
        transcript,
        [
            (1, "deflection", "Hi Ada, text us here about your bill.", 0),
            (2, "consumer", "I have a question", 0),
            (3, "agent-ada", answer, FunnelStage::Delivered as i32),
            (4, "agent-ada", "Your bill:", FunnelStage::Sent as i32),
            (5, "consumer", "It is too high", 0),
        ]
    );

    // The deflection's own SMS is delivered after the agent's: once the funnel counts it, the
    // gateway's earlier report (the agent's message) has been shipped too, and it counted nothing.
    let deflection_sms = story
        .twilio
        .sent()
        .into_iter()
        .find(|sms| sms.field("Body").starts_with("Hi Ada"))
        .expect("the deflection's SMS");
    story
        .twilio
        .send_status(&deflection_sms, "delivered", None)
        .await;
    let count = |stage: &'static str| story.sms_stage("acme", stage);
    eventually_eq(
        "the deflection delivered",
        Duration::from_secs(10),
        &1,
        || count("FUNNEL_STAGE_DELIVERED"),
    )
    .await;
    eventually_eq(
        "the conversation answered",
        Duration::from_secs(10),
        &1,
        || count("FUNNEL_STAGE_ANSWERED"),
    )
    .await;
    assert_eq!(
        count("FUNNEL_STAGE_SENT").await,
        1,
        "the agent's message is no deflection"
    );

    // While the conversation is open, the consumer is not deflected again; once it is closed,
    // they are.
    let held = story
        .deflect(handoff_request("acme", CONSUMER, "call-2"), &key)
        .await;
    assert_eq!(
        held.status,
        pb::HandoffStatus::SkippedOpenConversation as i32
    );
    let closed = close(&story, &ada, &id, "resolved").await;
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);
    assert_eq!(closed.close_reason, "resolved");
    assert_eq!(
        describe(&next(&mut stream).await),
        "closed: resolved by agent-ada"
    );
    let after = story
        .deflect(handoff_request("acme", CONSUMER, "call-3"), &key)
        .await;
    assert_eq!(after.status, pb::HandoffStatus::Sent as i32);
    // Nothing more can be said in a closed conversation.
    let late = send(&story, &ada, reply(&id, "m-2", "one more thing")).await;
    let late = late.expect_err("closed");
    assert_eq!(late.code(), Code::FailedPrecondition);
    assert_eq!(
        late.get_details_error_info().expect("error info").reason,
        "CONVERSATION_CLOSED"
    );
    story.stop().await;
}

/// A stream that reconnects with its last cursor gets what happened meanwhile exactly once, on
/// another routing replica, and again after that replica restarts (its stream told to
/// reconnect); a stream that never left saw the same events in the same order.
#[tokio::test]
async fn a_stream_resumes_from_its_cursor_on_any_replica_without_gaps_or_repeats() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let ada = agent("acme", "agent-ada", &[]);
    let mut steady = watch(&story, &ada, "").await;
    let mut leaving = watch(&story, &ada, "").await;
    let replica = |story: &Story| {
        let mut config = story.config.clone();
        config.peers = story.peers();
        async move {
            c2m::app::spawn(
                std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                &[c2m::Role::Routing],
                config,
            )
            .await
            .expect("another routing replica")
        }
    };

    deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let opened = next(&mut leaving).await;
    let id = opened.conversation_id.clone();
    drop(leaving);

    // Meanwhile: a claim, two answers, a transfer.
    assign(&story, &ada, &id).await.expect("claimed");
    send(&story, &ada, reply(&id, "m-1", "One moment"))
        .await
        .expect("sent");
    send(&story, &ada, reply(&id, "m-2", "Passing you to sales"))
        .await
        .expect("sent");
    story
        .conversations()
        .await
        .transfer_conversation(authed(
            pb::TransferConversationRequest {
                account_id: "acme".into(),
                conversation_id: id.clone(),
                skill_id: "sales".into(),
            },
            &ada,
        ))
        .await
        .expect("transferred");
    let mut everything = Vec::new();
    for _ in 0..7 {
        everything.push(next(&mut steady).await);
    }
    assert_eq!(everything[0], opened, "both streams saw the opening");
    assert_eq!(
        describe(everything.last().expect("events")),
        "transferred billing-agents -> sales"
    );
    eventually_eq(
        "the transfer counted",
        Duration::from_secs(10),
        &Some(1),
        || async {
            funnel(&story, "acme")
                .await
                .get("CHANNEL_SMS")
                .and_then(|stages| stages.get("FUNNEL_STAGE_CONVERSATION_TRANSFERRED").copied())
        },
    )
    .await;

    let second = replica(&story).await;
    let routing_b = crate::grpc::channel(&second.endpoint()).await;
    crate::grpc::wait_for_status(
        &routing_b,
        &[crate::grpc::CONVERSATION_SERVICE],
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let mut resumed = pb::conversation_service_client::ConversationServiceClient::new(routing_b)
        .watch_conversations(authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                skill_ids: Vec::new(),
                cursor: opened.cursor.clone(),
                since: None,
            },
            &ada,
        ))
        .await
        .expect("resumed on the other replica")
        .into_inner();
    for expected in &everything[1..] {
        assert_eq!(&next(&mut resumed).await, expected, "in order, once each");
    }
    // Live from there on, on both replicas.
    story.sms_to_acme(CONSUMER, "Hi sales").await;
    let live = next(&mut resumed).await;
    assert_eq!(live, next(&mut steady).await);
    assert_eq!(
        describe(&live),
        "message in \"Hi sales\" by consumer (FUNNEL_STAGE_UNSPECIFIED)"
    );

    // The replica restarts: its stream is told to reconnect, and a new one picks up after the
    // last cursor the client saw.
    second.stop().await.expect("drains");
    let told = tokio::time::timeout(Duration::from_secs(10), resumed.message())
        .await
        .expect("the stream ends at once");
    assert_eq!(
        told.expect_err("ended by the server").code(),
        Code::Unavailable
    );
    close(&story, &ada, &id, "done").await;
    let closed = next(&mut steady).await;
    let restarted = replica(&story).await;
    let routing_c = crate::grpc::channel(&restarted.endpoint()).await;
    crate::grpc::wait_for_status(
        &routing_c,
        &[crate::grpc::CONVERSATION_SERVICE],
        tonic_health::pb::health_check_response::ServingStatus::Serving,
    )
    .await;
    let mut again = pb::conversation_service_client::ConversationServiceClient::new(routing_c)
        .watch_conversations(authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                skill_ids: Vec::new(),
                cursor: live.cursor.clone(),
                since: None,
            },
            &ada,
        ))
        .await
        .expect("resumed after the restart")
        .into_inner();
    assert_eq!(next(&mut again).await, closed);
    restarted.stop().await.expect("drains");
    story.stop().await;
}

/// Two agents claim one conversation at the same moment: one holds it, the other is told who.
#[tokio::test]
async fn of_two_agents_claiming_a_conversation_at_once_exactly_one_wins() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let (ada, bob) = (
        agent("acme", "agent-ada", &[SKILL]),
        agent("acme", "agent-bob", &[SKILL]),
    );
    for (i, phone) in ["+14155550311", "+14155550312", "+14155550313"]
        .into_iter()
        .enumerate()
    {
        let id = deflect_and_reply(&story, &key, phone, &format!("call-{i}")).await;
        let (a, b) = tokio::join!(assign(&story, &ada, &id), assign(&story, &bob, &id));
        let (winner, refused) = match (a, b) {
            (Ok(won), Err(refused)) | (Err(refused), Ok(won)) => (won.assignee, refused),
            (a, b) => panic!("exactly one claim wins: {a:?} / {b:?}"),
        };
        assert_eq!(refused.code(), Code::Aborted);
        let info = refused.get_details_error_info().expect("error info");
        assert_eq!(info.reason, "CONVERSATION_ASSIGNED");
        assert_eq!(info.metadata["assignee"], winner);
        let held = conversation(&story, &ada, &id).await.expect("conversation");
        assert_eq!(held.assignee, winner);
        // Only the holder (or a supervisor) gives it back.
        let loser = if winner == "agent-ada" { &bob } else { &ada };
        let release = |credential: &str| {
            let request = authed(
                pb::ReleaseConversationRequest {
                    account_id: "acme".into(),
                    conversation_id: id.clone(),
                },
                credential,
            );
            let story = &story;
            async move {
                story
                    .conversations()
                    .await
                    .release_conversation(request)
                    .await
            }
        };
        assert_eq!(
            release(loser).await.expect_err("not theirs").code(),
            Code::Aborted
        );
        let editor = token(AuthRole::Editor, Some("acme"));
        let released = release(&editor).await.expect("a supervisor releases it");
        assert_eq!(
            released
                .into_inner()
                .conversation
                .expect("conversation")
                .assignee,
            ""
        );
    }
    story.stop().await;
}

/// Listings filter and page, newest first, every conversation once.
#[tokio::test]
async fn conversations_are_listed_newest_first_filtered_and_paged() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let phones = ["+14155550321", "+14155550322", "+14155550323"];
    let mut newest = String::new();
    for (i, phone) in phones.iter().enumerate() {
        newest = deflect_and_reply(&story, &key, phone, &format!("call-{i}")).await;
    }
    let ada = agent("acme", "agent-ada", &[]);
    close(&story, &ada, &newest, "done").await;
    let page = |page_token: String, state: pb::ConversationState| {
        let request = authed(
            pb::ListConversationsRequest {
                account_id: "acme".into(),
                state: state as i32,
                page_size: 2,
                page_token,
                ..Default::default()
            },
            &ada,
        );
        let story = &story;
        async move {
            story
                .conversations()
                .await
                .list_conversations(request)
                .await
                .expect("lists")
                .into_inner()
        }
    };
    let first = page(String::new(), pb::ConversationState::Unspecified).await;
    assert_eq!(first.conversations.len(), 2);
    let second = page(
        first.next_page_token.clone(),
        pb::ConversationState::Unspecified,
    )
    .await;
    let listed: Vec<&str> = first
        .conversations
        .iter()
        .chain(&second.conversations)
        .map(|c| c.consumer_address.as_str())
        .collect();
    assert_eq!(
        listed,
        [phones[2], phones[1], phones[0]],
        "newest first, once each"
    );
    let open = page(String::new(), pb::ConversationState::Open).await;
    assert_eq!(open.conversations.len(), 2);
    assert!(
        open.conversations
            .iter()
            .all(|c| c.conversation_id != newest)
    );
    story.stop().await;
}

/// An account that closes idle conversations closes one nobody wrote in, with reason `idle`, and
/// the consumer's next call is deflected again.
#[tokio::test]
async fn an_idle_conversation_is_closed_and_the_consumer_can_be_deflected_again() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            consumer_lease_ms: Some(1),
            idle_sweep_ms: Some(100),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                idle_close_minutes: 30,
                ..Default::default()
            },
        )
        .await;
    let id = deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let ada = agent("acme", "agent-ada", &[]);
    let mut stream = watch(&story, &ada, "").await;
    // A recent conversation stays open through several sweeps.
    let mut db = story.db.connect().await;
    let idle_for = |minutes: i32| {
        sqlx::query(
            "UPDATE routing.conversations SET last_message_at = now() - make_interval(mins => $2) \
             WHERE conversation_id = $1",
        )
        .bind(id.clone())
        .bind(minutes)
    };
    idle_for(29).execute(&mut db).await.expect("29 minutes ago");
    let open_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < open_until {
        let now = conversation(&story, &ada, &id).await.expect("conversation");
        assert_eq!(
            now.state,
            pb::ConversationState::Open as i32,
            "not idle long enough"
        );
    }
    idle_for(31).execute(&mut db).await.expect("31 minutes ago");
    assert_eq!(describe(&next(&mut stream).await), "closed: idle by c2m");
    // The close event may reach the stream a moment before the consumer's lease is gone: each
    // try is a new call (a new key), as an IVR's would be; a retry under one key would only
    // replay the first answer.
    let calls = std::sync::atomic::AtomicU32::new(0);
    eventually(
        "the consumer deflected again",
        Duration::from_secs(10),
        || async {
            let call = calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let handoff = story
                .deflect(
                    handoff_request("acme", CONSUMER, &format!("call-after-idle-{call}")),
                    &key,
                )
                .await;
            handoff.status == pb::HandoffStatus::Sent as i32
        },
    )
    .await;
    let closed = conversation(&story, &ada, &id).await.expect("conversation");
    assert_eq!(closed.close_reason, "idle");
    story.stop().await;
}

/// On WhatsApp, free text goes while the customer-service window is open; once it has closed it
/// is refused, naming when it closed, without a call to Meta, and an approved template goes.
#[tokio::test]
async fn whatsapp_free_text_needs_the_window_and_a_template_goes_without_it() {
    let story = Story::start(Topology::Dev).await;
    let key = crate::whatsapp_setup::whatsapp_first(&story).await;
    let phone = "+14155550331";
    let handoff = story
        .deflect(
            crate::whatsapp_setup::whatsapp_request(phone, "call-wa"),
            &key,
        )
        .await;
    assert_eq!(handoff.status, pb::HandoffStatus::Sent as i32);
    let (status, _) = story
        .meta
        .send_inbound(
            &format!("{}/webhooks/meta/acme", story.webhooks),
            crate::whatsapp_setup::APP_SECRET,
            crate::whatsapp_setup::PHONE_NUMBER_ID,
            &phone[1..],
            "Yes please",
        )
        .await;
    assert_eq!(status, 200);
    let id = story.open_conversation("acme", phone).await.conversation_id;
    let ada = agent("acme", "agent-ada", &[]);

    let inside = send(
        &story,
        &ada,
        reply(&id, "w-1", "What is your account number?"),
    )
    .await;
    assert_eq!(
        inside.expect("inside the window").stage,
        FunnelStage::Sent as i32
    );
    let last = story.meta.sent().pop().expect("sent to Meta");
    assert_eq!(last.body["type"], "text");
    assert_eq!(last.body["text"]["body"], "What is your account number?");

    // A day and more later.
    let mut db = story.db.connect().await;
    sqlx::query(
        "UPDATE channel_gateway.whatsapp_windows SET last_inbound_at = now() - interval '25 hours'",
    )
    .execute(&mut db)
    .await
    .expect("the window closes");
    let calls = story.meta.requests();
    let outside = send(&story, &ada, reply(&id, "w-2", "Are you still there?")).await;
    let outside = outside.expect_err("outside the window");
    assert_eq!(outside.code(), Code::FailedPrecondition);
    let info = outside.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "WHATSAPP_WINDOW_CLOSED");
    assert!(info.metadata.contains_key("closed_at"), "{info:?}");
    assert_eq!(story.meta.requests(), calls, "Meta was not called");
    let transcript = conversation(&story, &ada, &id)
        .await
        .expect("conversation")
        .transcript;
    assert!(
        transcript.iter().all(|e| e.client_message_id != "w-2"),
        "nothing recorded"
    );

    let template = pb::SendConversationMessageRequest {
        whatsapp_template: Some(pb::WhatsAppTemplateMessage {
            name: "billing_followup".into(),
            language: "en_US".into(),
            body_parameters: vec!["Ada".into(), "your bill".into()],
        }),
        ..reply(&id, "w-3", "")
    };
    let entry = send(&story, &ada, template).await.expect("a template goes");
    assert_eq!(entry.stage, FunnelStage::Sent as i32);
    let last = story.meta.sent().pop().expect("sent to Meta");
    assert_eq!(last.body["type"], "template");
    assert_eq!(last.body["template"]["name"], "billing_followup");
    story.stop().await;
}

/// A client that retries while its first send is still at the provider (Twilio holding it) does
/// not reach the consumer twice: the retry is told to wait, and a retry after the first send's
/// answer gets that message.
#[tokio::test]
async fn a_retry_while_the_first_send_is_at_the_provider_sends_nothing() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let id = deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let ada = agent("acme", "agent-ada", &[]);
    let hold = story.twilio.hold_next();
    let before = story.twilio.requests();
    let first = send(&story, &ada, reply(&id, "m-1", "Hello"));
    let retry = async {
        eventually(
            "the first send at Twilio",
            Duration::from_secs(10),
            || async { story.twilio.requests() > before },
        )
        .await;
        let retried = send(&story, &ada, reply(&id, "m-1", "Hello")).await;
        hold.release();
        retried
    };
    let (first, retried) = tokio::join!(first, retry);
    let first = first.expect("the first send goes");
    assert_eq!(first.stage, FunnelStage::Sent as i32);
    let retried = retried.expect_err("told to wait");
    assert_eq!(retried.code(), Code::Aborted);
    assert!(
        retried.get_details_retry_info().is_some(),
        "with when to retry"
    );
    assert_eq!(
        story.twilio.requests(),
        before + 1,
        "one request reached Twilio"
    );
    let again = send(&story, &ada, reply(&id, "m-1", "Hello"))
        .await
        .expect("after the answer");
    assert_eq!(again.message_id, first.message_id);
    let hellos = story
        .twilio
        .sent()
        .iter()
        .filter(|sms| sms.field("Body") == "Hello")
        .count();
    assert_eq!(hellos, 1);
    story.stop().await;
}
