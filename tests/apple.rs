//! Apple Messages for Business: the deflection is an SMS invite carrying the business's link,
//! and a repeat request while that invite is pending reuses it instead of sending another (the
//! reference product sends one invite per request).

use std::time::Duration;

use c2m_proto::v1::{self as pb, Channel, HandoffStatus};
use c2m_test_support::eventually;

use crate::story::{Options, Story, Topology, handoff_request, onboard};

const PHONE: &str = "+14155550190";
const BUSINESS_ID: &str = "3f5a1c2e-7b9d-4e6f-8a0b-1c2d3e4f5a6b";

async fn apple_first(story: &Story) -> String {
    let key = onboard(story, "acme").await;
    story
        .reconfigure_billing(
            "acme",
            pb::HandoffConfig {
                channel_priority: vec![Channel::AppleMessages as i32, Channel::Sms as i32],
                messages: vec![
                    pb::ChannelMessage {
                        channel: Channel::AppleMessages as i32,
                        text: "Hi {{first_name}}, chat with us in Messages:".into(),
                    },
                    pb::ChannelMessage {
                        channel: Channel::Sms as i32,
                        text: "Hi {{first_name}}, text us here about {{topic}}.".into(),
                    },
                ],
                apple_business_id: BUSINESS_ID.into(),
                apple_intent_id: "billing".into(),
                apple_group_id: "tier 1".into(),
                apple_body: "About {{topic}}".into(),
                ..Default::default()
            },
        )
        .await;
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_invite_per_pending_deflection() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            consumer_lease_ms: Some(100),
            ..Default::default()
        },
    )
    .await;
    let key = apple_first(&story).await;

    let first = story
        .deflect(handoff_request("acme", PHONE, "apple-1"), &key)
        .await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);
    assert_eq!(first.channel, Channel::AppleMessages as i32);
    let sent = story.twilio.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].field("To"), PHONE);
    assert_eq!(
        sent[0].field("Body"),
        format!(
            "Hi Ada, chat with us in Messages:\nhttps://bcrw.apple.com/urn:biz:{BUSINESS_ID}\
             ?biz-intent-id=billing&biz-group-id=tier+1&body=About+your+bill"
        )
    );

    // Twilio reports the invite's SMS delivered: its callback names our message, which is the
    // invite's (an Apple Messages one, though Twilio speaks of an SMS).
    let (status, _) = story.twilio.send_status(&sent[0], "delivered", None).await;
    assert_eq!(status, 200);
    let progress = story
        .handoff_of("acme", &key, &first.handoff_id)
        .await
        .progress
        .expect("progress");
    assert_eq!(progress.stage, pb::FunnelStage::Delivered as i32);

    // The same caller calls again once the per-consumer lease has lapsed: the invite is still
    // pending (no chat came of it), so it is reused, not sent again.
    let lease = format!("{}:{{acme}}:lease:{PHONE}", story.redis.prefix());
    let redis = redis::Client::open(story.redis.url()).expect("url");
    let redis = redis
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    eventually("the consumer lease lapses", Duration::from_secs(5), || {
        let mut redis = redis.clone();
        let lease = lease.clone();
        async move {
            !redis::AsyncCommands::exists::<_, bool>(&mut redis, &lease)
                .await
                .expect("exists")
        }
    })
    .await;
    let again = story
        .deflect(handoff_request("acme", PHONE, "apple-2"), &key)
        .await;
    assert_eq!(again.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(again.duplicate_of, first.handoff_id);
    assert_eq!(story.twilio.sent().len(), 1, "no second invite");

    // Another consumer gets their own invite.
    let other = story
        .deflect(handoff_request("acme", "+14155550191", "apple-3"), &key)
        .await;
    assert_eq!(other.channel, Channel::AppleMessages as i32);
    assert_eq!(story.twilio.sent().len(), 2);
    story.stop().await;
}
