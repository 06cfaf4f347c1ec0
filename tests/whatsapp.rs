//! WhatsApp through Meta's Cloud API: an approved template starts the conversation, Meta's signed
//! webhooks move it forward and route the reply, and a refusal falls back to SMS in the same call.

use std::time::Duration;

use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, HandoffStatus, TranscriptDirection};
use c2m_runtime::auth::Role as AuthRole;
use tonic_types::StatusExt;

use crate::story::{EVERY_STAGE_ONCE, Story, Topology, authed, token};
use crate::whatsapp_setup::{
    APP_SECRET, PHONE_NUMBER_ID, VERIFY_TOKEN, whatsapp_first, whatsapp_request as request,
    whatsapp_then_sms,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_template_starts_the_conversation_and_meta_webhooks_carry_it() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);
    let http = reqwest::Client::new();

    // Meta's subscription handshake.
    let handshake = |verify_token: &'static str| {
        let http = http.clone();
        let url = format!(
            "{webhook}?hub.mode=subscribe&hub.verify_token={verify_token}&hub.challenge=1158201444"
        );
        async move {
            let response = http.get(url).send().await.expect("http");
            (
                response.status().as_u16(),
                response.text().await.expect("text"),
            )
        }
    };
    assert_eq!(
        handshake(VERIFY_TOKEN).await,
        (200, "1158201444".to_owned())
    );
    assert_eq!(handshake("wrong").await.0, 403);

    let handoff = story
        .handoff()
        .await
        .create_handoff(authed(request("+14155550401", "wa-1"), &key))
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    let sent = story.meta.sent();
    assert_eq!(sent.len(), 1);
    assert!(story.twilio.sent().is_empty());
    let body = &sent[0].body;
    assert_eq!(body["to"], "14155550401");
    assert_eq!(body["type"], "template");
    assert_eq!(body["template"]["name"], "billing_followup");
    assert_eq!(body["template"]["language"]["code"], "en_US");
    assert_eq!(
        body["template"]["components"][0]["parameters"],
        serde_json::json!([{"type": "text", "text": "Ada"}, {"type": "text", "text": "your bill"}])
    );

    // A forged status is refused; signed ones are taken, once each.
    let forged = story
        .meta
        .post_webhook(
            &webhook,
            APP_SECRET,
            &serde_json::json!({"object": "whatsapp_business_account"}),
            Some("sha256=00"),
        )
        .await;
    assert_eq!(forged.0, 403);
    for status in ["delivered", "delivered", "read"] {
        assert_eq!(
            story
                .meta
                .send_status(&webhook, APP_SECRET, &sent[0], status, None)
                .await
                .0,
            200
        );
    }

    // The consumer replies on WhatsApp: the conversation opens with the template's text on top.
    let (status, _) = story
        .meta
        .send_inbound(
            &webhook,
            APP_SECRET,
            PHONE_NUMBER_ID,
            "14155550401",
            "Yes, help me",
        )
        .await;
    assert_eq!(status, 200);
    let conversation = story.open_conversation("acme", "+14155550401").await;
    assert_eq!(conversation.channel, Channel::Whatsapp as i32);
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
                "Hi Ada, reply here about your bill."
            ),
            (TranscriptDirection::Inbound as i32, "Yes, help me"),
        ]
    );

    story
        .await_funnel("acme", &[("CHANNEL_WHATSAPP", EVERY_STAGE_ONCE)])
        .await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_whatsapp_send_falls_back_to_sms_in_the_same_call() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    story
        .meta
        .refuse_next(400, 131030, "Recipient phone number not in allowed list");
    let handoff = story
        .handoff()
        .await
        .create_handoff(authed(request("+14155550402", "wa-2"), &key))
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Sms as i32);
    let attempts: Vec<(i32, i32, &str)> = handoff
        .attempts
        .iter()
        .map(|a| (a.channel, a.outcome, a.error_code.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [
            (
                Channel::Whatsapp as i32,
                AttemptOutcome::Failed as i32,
                "131030"
            ),
            (Channel::Sms as i32, AttemptOutcome::Sent as i32, ""),
        ]
    );
    assert_eq!(story.twilio.sent().len(), 1);
    assert_eq!(
        story.twilio.sent()[0].field("Body"),
        "Hi Ada, text us here about your bill."
    );
    story.stop().await;
}

/// The consumer's conversation opened on SMS, with the SMS fallback's message on top.
pub(crate) async fn assert_the_conversation_is_on_sms(story: &Story, consumer: &str) {
    let conversation = story.open_conversation("acme", consumer).await;
    assert_eq!(conversation.channel, Channel::Sms as i32);
    assert_eq!(
        conversation.transcript[0].text,
        "Hi Ada, text us here about your bill."
    );
}

/// acme's handoff once it has gone on to SMS (waiting 10 s at most).
pub(crate) async fn sms_fallback_of(story: &Story, key: &str, handoff_id: &str) -> pb::Handoff {
    let found = std::sync::Mutex::new(None);
    c2m_test_support::eventually("the SMS fallback", Duration::from_secs(10), || async {
        let handoff = story.handoff_of("acme", key, handoff_id).await;
        let done = handoff.channel == Channel::Sms as i32;
        *found.lock().expect("found") = Some(handoff);
        done
    })
    .await;
    found
        .into_inner()
        .expect("found")
        .expect("looked at least once")
}

/// A handoff's attempts when its WhatsApp message did not arrive (`reason`) and SMS took over.
pub(crate) fn fell_back_to_sms(reason: &str) -> Vec<(i32, i32, String)> {
    vec![
        (
            Channel::Whatsapp as i32,
            AttemptOutcome::Undelivered as i32,
            reason.to_owned(),
        ),
        (
            Channel::Sms as i32,
            AttemptOutcome::Sent as i32,
            String::new(),
        ),
    ]
}

pub(crate) fn attempts(handoff: &pb::Handoff) -> Vec<(i32, i32, String)> {
    handoff
        .attempts
        .iter()
        .map(|a| (a.channel, a.outcome, a.error_code.clone()))
        .collect()
}

/// A copy of the WhatsApp-first configuration that waits `seconds` for delivery.
async fn with_deadline(story: &Story, seconds: u32) {
    story
        .add_config(
            "acme",
            pb::HandoffConfig {
                delivery_deadline_seconds: seconds,
                ..whatsapp_then_sms("wa-deadline", "WhatsApp first, 1 s to deliver")
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_message_reported_failed_falls_back_to_sms_and_the_reply_finds_it() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);
    let handoff = story
        .handoff()
        .await
        .create_handoff(authed(request("+14155550403", "wa-3"), &key))
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);

    // Meta accepted it, then reports it undeliverable (131026: not a WhatsApp user).
    let sent = story.meta.sent();
    let (status, _) = story
        .meta
        .send_status(&webhook, APP_SECRET, &sent[0], "failed", Some(131026))
        .await;
    assert_eq!(status, 200);
    // The handoff records it once the SMS is out.
    let after = sms_fallback_of(&story, &key, &handoff.handoff_id).await;
    assert_eq!(story.twilio.sent().len(), 1);
    assert_eq!(attempts(&after), fell_back_to_sms("131026"));

    // The consumer answers the SMS: the conversation is on SMS, with the SMS on top.
    story.sms_to_acme("+14155550403", "ok").await;
    assert_the_conversation_is_on_sms(&story, "+14155550403").await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_the_fallback_waits_for_its_deflection_rather_than_take_the_first() {
    use c2m_test_support::eventually;

    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let consumer = "+14155550409";
    let handoff = story.deflect(request(consumer, "wa-9"), &key).await;
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    let mut db = story.db.connect().await;
    eventually(
        "Routing knows the WhatsApp deflection",
        Duration::from_secs(10),
        || {
            let db = &story.db;
            let handoff_id = handoff.handoff_id.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM routing.deflections WHERE handoff_id = $1",
                )
                .bind(handoff_id)
                .fetch_one(&mut db.connect().await)
                .await
                .expect("count")
                    == 1
            }
        },
    )
    .await;

    // From here Routing's deflections take no writes: the SMS fallback's deflection stays on its
    // way from Handoff.
    sqlx::query("BEGIN").execute(&mut db).await.expect("begins");
    sqlx::query("LOCK TABLE routing.deflections IN SHARE MODE")
        .execute(&mut db)
        .await
        .expect("locks Routing's deflections against writes");
    let sent = story.meta.sent();
    let (status, _) = story
        .meta
        .send_status(
            &format!("{}/webhooks/meta/acme", story.webhooks),
            APP_SECRET,
            &sent[0],
            "failed",
            Some(131026),
        )
        .await;
    assert_eq!(status, 200);
    sms_fallback_of(&story, &key, &handoff.handoff_id).await;
    eventually(
        "the fallback's deflection to wait in Routing",
        Duration::from_secs(10),
        || story.waits_on_a_lock("INSERT INTO deflections"),
    )
    .await;

    // The consumer answers the SMS. Routing has only the WhatsApp deflection: it asks Handoff for
    // the newer one and waits for it, instead of opening the conversation on WhatsApp.
    let inbound = format!("{}/webhooks/twilio/acme/inbound", story.webhooks);
    let reply = story.twilio.send_inbound(
        &inbound,
        crate::story::TWILIO_SID,
        consumer,
        crate::story::BRAND_NUMBER,
        "ok",
        None,
    );
    let release = async {
        eventually(
            "the reply to wait for the deflection on its way",
            Duration::from_secs(10),
            || story.waits_on_a_lock("DELETE FROM deflection_outbox"),
        )
        .await;
        sqlx::query("COMMIT")
            .execute(&mut db)
            .await
            .expect("releases the lock");
    };
    let ((status, _), ()) = tokio::join!(reply, release);
    assert_eq!(status, 200);
    assert_the_conversation_is_on_sms(&story, consumer).await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_but_not_recorded_is_not_sent_again_on_the_next_channel() {
    use c2m_test_support::eventually;

    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let mut db = story.db.connect().await;
    // The gateway's PostgreSQL takes its claims on message ids, but refuses to record outcomes
    // for a while.
    sqlx::raw_sql(
        "CREATE FUNCTION channel_gateway.refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON channel_gateway.outbound_messages \
             FOR EACH ROW EXECUTE FUNCTION channel_gateway.refuse();",
    )
    .execute(&mut db)
    .await
    .expect("trigger");

    // Meta takes the WhatsApp message: that is the outcome, and SMS is not tried.
    let handoff = story.deflect(request("+14155550410", "wa-10"), &key).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    assert_eq!(story.meta.sent().len(), 1);
    assert!(story.twilio.sent().is_empty(), "no second message by SMS");

    // The record is written once PostgreSQL takes it.
    eventually(
        "the record offered again",
        Duration::from_secs(10),
        || async {
            story
                .metric("c2m_message_record_retries_total")
                .await
                .is_some_and(|n| n > 0.0)
        },
    )
    .await;
    sqlx::raw_sql("DROP TRIGGER refuse ON channel_gateway.outbound_messages")
        .execute(&mut db)
        .await
        .expect("drops the trigger");
    let message_id = format!("{}-1", handoff.handoff_id);
    eventually("the message recorded", Duration::from_secs(10), || {
        let db = &story.db;
        let message_id = message_id.clone();
        async move {
            let mut conn = db.connect().await;
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT provider_message_id FROM channel_gateway.outbound_messages \
                 WHERE message_id = $1",
            )
            .bind(message_id)
            .fetch_optional(&mut conn)
            .await
            .expect("reads")
            .flatten()
            .is_some_and(|id| id.starts_with("wamid."))
        }
    })
    .await;
    story.stop().await;
}

/// A gateway whose PostgreSQL is away cannot claim a message id, so it sends nothing: the IVR
/// hears UNAVAILABLE (retryable), not FAILED, nothing is recorded as final, and its retry with
/// the same key, once PostgreSQL is back, sends the one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_cannot_store_sends_nothing_and_the_retry_sends_once() {
    use tonic_types::StatusExt;

    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let mut db = story.db.connect().await;
    sqlx::query("ALTER TABLE channel_gateway.outbound_messages RENAME TO outbound_messages_away")
        .execute(&mut db)
        .await
        .expect("rename");

    let refused = story
        .handoff()
        .await
        .create_handoff(crate::story::authed(request("+14155550411", "wa-11"), &key))
        .await
        .expect_err("not finished");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let info = refused.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "HANDOFF_UNFINISHED");
    assert!(refused.get_details_retry_info().is_some(), "says when");
    assert!(story.meta.sent().is_empty() && story.twilio.sent().is_empty());

    sqlx::query("ALTER TABLE channel_gateway.outbound_messages_away RENAME TO outbound_messages")
        .execute(&mut db)
        .await
        .expect("rename back");
    let handoff = story
        .deflect_retrying(request("+14155550411", "wa-11"), &key)
        .await;
    assert_eq!(
        handoff.handoff_id, info.metadata["handoff_id"],
        "the same handoff, finished"
    );
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    assert_eq!(story.meta.sent().len(), 1);
    assert!(story.twilio.sent().is_empty());
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undelivered_whatsapp_message_falls_back_at_the_configured_deadline() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    with_deadline(&story, 1).await;
    let mut wa = request("+14155550404", "wa-4");
    wa.handoff_config_id = "wa-deadline".into();
    let handoff = story
        .handoff()
        .await
        .create_handoff(authed(wa, &key))
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    // No delivery receipt comes: past the deadline the SMS goes.
    // The handoff records it once the SMS is out.
    let after = sms_fallback_of(&story, &key, &handoff.handoff_id).await;
    assert_eq!(story.twilio.sent().len(), 1);
    assert_eq!(
        attempts(&after),
        fell_back_to_sms("not-delivered-by-deadline")
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_message_is_not_followed_by_another() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    with_deadline(&story, 1).await;
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);
    let mut wa = request("+14155550405", "wa-5");
    wa.handoff_config_id = "wa-deadline".into();
    let handoff = story
        .handoff()
        .await
        .create_handoff(authed(wa, &key))
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("handoff");
    let sent = story.meta.sent();
    assert_eq!(
        story
            .meta
            .send_status(&webhook, APP_SECRET, &sent[0], "delivered", None)
            .await
            .0,
        200
    );
    // Handoff stops watching once it sees the delivery...
    c2m_test_support::eventually(
        "the fallback to be dropped",
        Duration::from_secs(10),
        || async { story.fallback_of(&handoff.handoff_id).await.is_none() },
    )
    .await;
    // ...and no SMS followed the delivered WhatsApp message.
    assert!(story.twilio.sent().is_empty());
    let after = story.handoff_of("acme", &key, &handoff.handoff_id).await;
    assert_eq!(after.channel, Channel::Whatsapp as i32);
    assert_eq!(after.attempts.len(), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_form_text_goes_only_inside_the_customer_service_window() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    let _admin = token(AuthRole::Admin, Some("acme"));
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);
    // The configuration has a plain text for WhatsApp beside its template.
    story
        .add_config(
            "acme",
            pb::HandoffConfig {
                handoff_config_id: "wa-text".into(),
                name: "WhatsApp, text when we may".into(),
                channel_priority: vec![Channel::Whatsapp as i32],
                whatsapp_template_id: "followup".into(),
                messages: vec![pb::ChannelMessage {
                    channel: Channel::Whatsapp as i32,
                    text: "Hello again {{first_name}}, we can pick this up here.".into(),
                }],
                ..Default::default()
            },
        )
        .await;
    let wrote = "+14155550411";
    let silent = "+14155550412";
    // One consumer has just written to the business on WhatsApp (nothing to route yet).
    let (status, _) = story
        .meta
        .send_inbound(&webhook, APP_SECRET, PHONE_NUMBER_ID, &wrote[1..], "hi")
        .await;
    assert_eq!(status, 200);
    let reach = |phone: &'static str| {
        let story = &story;
        async move {
            story
                .gateway()
                .await
                .check_reachability(authed(
                    pb::CheckReachabilityRequest {
                        account_id: "acme".into(),
                        channel: Channel::Whatsapp as i32,
                        phone: phone.into(),
                        ..Default::default()
                    },
                    &token(AuthRole::Viewer, Some("acme")),
                ))
                .await
                .expect("reachability")
                .into_inner()
        }
    };
    let open = reach(wrote).await;
    assert!(open.reachable);
    let closes =
        c2m_proto::from_timestamp(&open.window_closes_at.expect("closes")).expect("timestamp");
    let left = closes - chrono::Utc::now();
    assert!(
        left > chrono::Duration::hours(23) && left <= chrono::Duration::hours(24),
        "{left}"
    );
    assert!(!reach(silent).await.reachable);

    let with_config = |phone: &str, idempotency_key: &str| {
        let mut r = request(phone, idempotency_key);
        r.handoff_config_id = "wa-text".into();
        r
    };
    let texted = story.deflect(with_config(wrote, "w-1"), &key).await;
    assert_eq!(texted.channel, Channel::Whatsapp as i32);
    let templated = story.deflect(with_config(silent, "w-2"), &key).await;
    assert_eq!(templated.channel, Channel::Whatsapp as i32);
    let sent = story.meta.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].body["type"], "text");
    assert_eq!(
        sent[0].body["text"]["body"],
        "Hello again Ada, we can pick this up here."
    );
    assert_eq!(sent[1].body["type"], "template");

    // Asked directly, the gateway refuses free-form text outside the window without calling Meta.
    let refused = story
        .gateway()
        .await
        .send_message(authed(
            pb::SendMessageRequest {
                account_id: "acme".into(),
                message_id: "direct-1".into(),
                channel: Channel::Whatsapp as i32,
                to: silent.into(),
                text: "Just checking in".into(),
                ..Default::default()
            },
            &token(AuthRole::Operator, None),
        ))
        .await
        .expect("answered")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(refused.stage, pb::FunnelStage::Failed as i32);
    assert_eq!(refused.error_code, "outside-customer-service-window");
    assert_eq!(story.meta.sent().len(), 2);

    // The same message id again: the first outcome, and still no call to Meta; from another
    // account, refused naming the field.
    let again = |account_id: &str| {
        let gateway = story.gateway();
        let request = authed(
            pb::SendMessageRequest {
                account_id: account_id.into(),
                message_id: "direct-1".into(),
                channel: Channel::Whatsapp as i32,
                to: wrote.into(),
                text: "Just checking in".into(),
                ..Default::default()
            },
            &token(AuthRole::Operator, None),
        );
        async move { gateway.await.send_message(request).await }
    };
    let repeated = again("acme")
        .await
        .expect("answered")
        .into_inner()
        .message
        .expect("message");
    assert_eq!(repeated, refused);
    let foreign = again("globex").await.expect_err("another account's id");
    assert_eq!(foreign.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        foreign
            .get_error_details()
            .bad_request()
            .expect("violations")
            .field_violations[0]
            .field,
        "message_id"
    );
    assert_eq!(story.meta.requests(), 2);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_throughput_errors_are_retried_before_falling_back() {
    let story = Story::start(Topology::Dev).await;
    let key = whatsapp_first(&story).await;
    // Meta's number is at its throughput twice, then takes the message.
    story.meta.throttle_next(2);
    let sent = story.deflect(request("+14155550421", "tp-1"), &key).await;
    assert_eq!(sent.channel, Channel::Whatsapp as i32);
    assert_eq!((story.meta.requests(), story.meta.sent().len()), (3, 1));
    // Past the retries the attempt fails with Meta's code and SMS takes the message.
    story.meta.throttle_next(3);
    let fallback = story.deflect(request("+14155550422", "tp-2"), &key).await;
    assert_eq!(fallback.channel, Channel::Sms as i32);
    assert_eq!(fallback.attempts[0].error_code, "130429");
    assert_eq!((story.meta.requests(), story.meta.sent().len()), (6, 1));
    story.stop().await;
}

/// The gateway's answer to a direct send of `text` and `media_urls` on `channel` to `to`.
pub(crate) async fn send_direct(
    story: &Story,
    channel: Channel,
    to: &str,
    message_id: &str,
    text: &str,
    media_urls: &[&str],
) -> Result<pb::OutboundMessage, tonic::Status> {
    story
        .gateway()
        .await
        .send_message(authed(
            pb::SendMessageRequest {
                account_id: "acme".into(),
                message_id: message_id.into(),
                channel: channel as i32,
                to: to.into(),
                text: text.into(),
                media_urls: media_urls.iter().map(|u| (*u).to_owned()).collect(),
                ..Default::default()
            },
            &token(AuthRole::Operator, None),
        ))
        .await
        .map(|r| r.into_inner().message.expect("message"))
}

/// The field a refusal names first.
pub(crate) fn refused_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("field violations")
        .field_violations[0]
        .field
        .clone()
}

#[tokio::test]
async fn a_file_goes_to_whatsapp_by_link_with_the_text_as_its_caption() {
    let story = Story::start(Topology::Dev).await;
    whatsapp_first(&story).await;
    let consumer = "+14155550421";
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);
    let (status, _) = story
        .meta
        .send_inbound(
            &webhook,
            APP_SECRET,
            PHONE_NUMBER_ID,
            &consumer[1..],
            "the bill?",
        )
        .await;
    assert_eq!(status, 200);
    let before = story.meta.requests();

    let bill = "https://acme.example.com/bills/C-1001.pdf?sig=abc";
    let sent = send_direct(
        &story,
        Channel::Whatsapp,
        consumer,
        "f-1",
        "Your bill",
        &[bill],
    )
    .await
    .expect("sent");
    assert_eq!(sent.stage, pb::FunnelStage::Sent as i32);
    let note = "https://acme.example.com/notes/hello.mp3";
    send_direct(&story, Channel::Whatsapp, consumer, "f-2", "", &[note])
        .await
        .expect("sent");
    let bodies: Vec<serde_json::Value> = story
        .meta
        .sent()
        .into_iter()
        .rev()
        .take(2)
        .rev()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies[0]["type"], "document");
    assert_eq!(
        bodies[0]["document"],
        serde_json::json!({ "link": bill, "caption": "Your bill", "filename": "C-1001.pdf" })
    );
    assert_eq!(bodies[1]["type"], "audio");
    assert_eq!(bodies[1]["audio"], serde_json::json!({ "link": note }));

    // What WhatsApp cannot carry is refused, naming the field, without calling Meta.
    let two = send_direct(
        &story,
        Channel::Whatsapp,
        consumer,
        "f-3",
        "",
        &[bill, note],
    )
    .await;
    assert_eq!(refused_field(&two.expect_err("one file")), "media_urls");
    let spoken = send_direct(
        &story,
        Channel::Whatsapp,
        consumer,
        "f-4",
        "Listen",
        &[note],
    )
    .await;
    assert_eq!(refused_field(&spoken.expect_err("no caption")), "text");
    let long = "x".repeat(1025);
    let captioned = send_direct(&story, Channel::Whatsapp, consumer, "f-5", &long, &[bill]).await;
    assert_eq!(
        refused_field(&captioned.expect_err("caption limit")),
        "text"
    );
    assert_eq!(story.meta.requests(), before + 2);
    story.stop().await;
}
