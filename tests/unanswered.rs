//! Sends a provider never answered (a timeout, a connection broken once the request went): the
//! provider may have the message, so the next channel waits for the provider's report of it
//! rather than risk a second message, and goes once none comes in time. The providers' reports
//! find such a message by our id (Twilio's callback URL, Meta's `biz_opaque_callback_data`).

use std::time::Duration;

use c2m_proto::v1::{AttemptOutcome, Channel, FunnelStage, HandoffStatus};
use c2m_test_support::{Stall, eventually};

use crate::story::{Options, Story, Topology, handoff_request, onboard};
use crate::whatsapp::{
    assert_the_conversation_is_on_sms, attempts, fell_back_to_sms, sms_fallback_of,
};
use crate::whatsapp_setup::{APP_SECRET, whatsapp_first, whatsapp_request as request};

/// The gateway gives a provider 300 ms; an unanswered send waits `window_ms` for a report.
async fn impatient_gateway(window_ms: Option<u64>) -> Story {
    Story::start_with(
        Topology::Dev,
        Options {
            provider_timeout_ms: Some(300),
            unconfirmed_fallback_ms: window_ms,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_message_meta_took_without_answering_is_not_followed_by_an_sms() {
    // The default window: a minute for Meta to report on the message.
    let story = impatient_gateway(None).await;
    let key = whatsapp_first(&story).await;
    let webhook = format!("{}/webhooks/meta/acme", story.webhooks);

    // Meta takes the message; its answer is lost.
    story.meta.stall_next(Stall::AfterTaking);
    let handoff = story
        .deflect(request("+14155550601", "lost-answer-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    assert_eq!(
        attempts(&handoff),
        [(
            Channel::Whatsapp as i32,
            AttemptOutcome::Unconfirmed as i32,
            String::new()
        )]
    );
    assert!(story.twilio.sent().is_empty(), "no SMS went at once");
    assert_eq!(
        story.fallback_of(&handoff.handoff_id).await,
        Some((format!("{}-1", handoff.handoff_id), true))
    );

    // Meta's first status webhook carries our id back: the message is confirmed, the attempt
    // learns its wamid, and the fallback waits for delivery as after any send.
    let sent = story.meta.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].body["biz_opaque_callback_data"],
        format!("{}-1", handoff.handoff_id)
    );
    let (status, _) = story
        .meta
        .send_status(&webhook, APP_SECRET, &sent[0], "sent", None)
        .await;
    assert_eq!(status, 200);
    eventually("the send confirmed", Duration::from_secs(10), || async {
        story
            .handoff_of("acme", &key, &handoff.handoff_id)
            .await
            .attempts[0]
            .outcome
            == AttemptOutcome::Sent as i32
    })
    .await;
    let confirmed = story.handoff_of("acme", &key, &handoff.handoff_id).await;
    assert_eq!(confirmed.attempts[0].provider_message_id, sent[0].wamid);
    assert_eq!(
        story.fallback_of(&handoff.handoff_id).await,
        Some((format!("{}-1", handoff.handoff_id), false))
    );

    // Delivered: the watch ends, and the consumer got the one message.
    let (status, _) = story
        .meta
        .send_status(&webhook, APP_SECRET, &sent[0], "delivered", None)
        .await;
    assert_eq!(status, 200);
    eventually("the watch to end", Duration::from_secs(10), || async {
        story.fallback_of(&handoff.handoff_id).await.is_none()
    })
    .await;
    assert!(story.twilio.sent().is_empty(), "no SMS after the WhatsApp");
    assert_eq!(story.meta.requests(), 1, "one send to Meta");
    let after = story.handoff_of("acme", &key, &handoff.handoff_id).await;
    assert_eq!(after.channel, Channel::Whatsapp as i32);
    assert_eq!(
        after.progress.map(|p| p.stage),
        Some(FunnelStage::Delivered as i32)
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_send_meta_never_took_falls_back_to_sms_once_nothing_confirms_it() {
    // A second for Meta to report on an unanswered send.
    let story = impatient_gateway(Some(1_000)).await;
    let key = whatsapp_first(&story).await;

    story.meta.stall_next(Stall::BeforeTaking);
    let handoff = story
        .deflect(request("+14155550602", "lost-send-1"), &key)
        .await;
    assert_eq!(handoff.channel, Channel::Whatsapp as i32);
    assert_eq!(
        handoff.attempts[0].outcome,
        AttemptOutcome::Unconfirmed as i32
    );
    assert!(story.meta.sent().is_empty(), "Meta never had it");

    // No report comes: past the window the SMS goes, both attempts on the handoff.
    let after = sms_fallback_of(&story, &key, &handoff.handoff_id).await;
    assert_eq!(story.twilio.sent().len(), 1);
    assert_eq!(after.status, HandoffStatus::Sent as i32);
    assert_eq!(attempts(&after), fell_back_to_sms("unconfirmed"));

    // The consumer answers the SMS: the conversation opens there.
    story.sms_to_acme("+14155550602", "yes").await;
    assert_the_conversation_is_on_sms(&story, "+14155550602").await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sms_twilio_took_without_answering_is_found_by_its_status_callback() {
    let story = impatient_gateway(None).await;
    let key = onboard(&story, "acme").await;

    // Twilio takes the SMS; its answer, and with it the SID, is lost.
    story.twilio.stall_next();
    let handoff = story
        .deflect(handoff_request("acme", "+14155550603", "lost-sid-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(
        attempts(&handoff),
        [(
            Channel::Sms as i32,
            AttemptOutcome::Unconfirmed as i32,
            String::new()
        )]
    );
    let message_id = format!("{}-1", handoff.handoff_id);
    let before = story.message("acme", &message_id).await;
    assert!(before.unconfirmed);
    assert_eq!(before.provider_message_id, "");
    assert_eq!(before.stage, FunnelStage::Sent as i32);

    // The status callback, signed over a URL that names our message id, confirms it with its SID.
    let sent = story.twilio.sent();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0]
            .field("StatusCallback")
            .ends_with(&format!("/status?message_id={message_id}")),
        "{}",
        sent[0].field("StatusCallback")
    );
    let (status, _) = story.twilio.send_status(&sent[0], "delivered", None).await;
    assert_eq!(status, 200);
    let after = story.message("acme", &message_id).await;
    assert!(!after.unconfirmed);
    assert_eq!(after.provider_message_id, sent[0].sid);
    assert_eq!(after.stage, FunnelStage::Delivered as i32);
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
