//! The built-in sandbox: an account with no provider account tries the whole flow — send,
//! delivery, the consumer's reply, the conversation — through the same signed webhooks.

use std::time::Duration;

use c2m_proto::v1::{
    self as pb, Channel, HandoffStatus, put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::eventually;
use redis::AsyncCommands;

use crate::story::{EVERY_STAGE_ONCE, Story, Topology, authed, handoff_request, onboard, token};

/// Sandbox credentials whose consumer answers every message with "Yes please".
fn answering_sandbox() -> Credentials {
    Credentials::Sandbox(pb::SandboxCredentials {
        reply_text: "Yes please".into(),
        fail_delivery: false,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_account_plays_the_whole_flow_without_a_provider() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let mut gateway = story.gateway().await;
    // No Twilio account: the sandbox instead, with a consumer who answers.
    gateway
        .delete_provider_credentials(authed(
            pb::DeleteProviderCredentialsRequest {
                account_id: "acme".into(),
                provider: pb::Provider::Twilio as i32,
            },
            &admin,
        ))
        .await
        .expect("twilio removed");
    story.put_credentials("acme", answering_sandbox()).await;

    let handoff = story
        .deflect(handoff_request("acme", "+14155550901", "sb-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Sms as i32);
    assert!(
        story.twilio.sent().is_empty(),
        "nothing went to a real provider"
    );

    // The sandbox's consumer answers: a conversation opens, with the message on top.
    let redis = redis::Client::open(story.redis.url()).expect("url");
    let lease = format!("{}:{{acme}}:conv:+14155550901", story.redis.prefix());
    eventually(
        "the sandbox's reply to open a conversation",
        Duration::from_secs(10),
        || {
            let redis = redis.clone();
            let lease = lease.clone();
            async move {
                let mut redis = redis
                    .get_multiplexed_async_connection()
                    .await
                    .expect("redis");
                redis.exists::<_, bool>(&lease).await.unwrap_or(false)
            }
        },
    )
    .await;
    let conversation = story.open_conversation("acme", "+14155550901").await;
    let texts: Vec<&str> = conversation
        .transcript
        .iter()
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(
        texts,
        ["Hi Ada, text us here about your bill.", "Yes please"]
    );

    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 1),
                    ("FUNNEL_STAGE_SENT", 1),
                    ("FUNNEL_STAGE_DELIVERED", 1),
                    ("FUNNEL_STAGE_RESPONDED", 1),
                    ("FUNNEL_STAGE_CONVERSATION_OPENED", 1),
                ],
            )],
        )
        .await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcs_and_whatsapp_play_in_the_sandbox_too() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    story.put_credentials("acme", answering_sandbox()).await;
    story.add_followup_template("acme").await;
    // Nobody at Meta reviews a sandbox template: an operator approves it as Meta would.
    story
        .config()
        .await
        .update_whats_app_template_status(authed(
            pb::UpdateWhatsAppTemplateStatusRequest {
                account_id: "acme".into(),
                template_id: "followup".into(),
                status: pb::WhatsAppTemplateStatus::Approved as i32,
                ..Default::default()
            },
            &token(AuthRole::Operator, None),
        ))
        .await
        .expect("approved");
    story
        .add_config(
            "acme",
            pb::HandoffConfig {
                handoff_config_id: "rcs-only".into(),
                name: "RCS only".into(),
                channel_priority: vec![Channel::Rcs as i32],
                messages: vec![pb::ChannelMessage {
                    channel: Channel::Rcs as i32,
                    text: "Hi {{first_name}}, chat with us here.".into(),
                }],
                ..Default::default()
            },
        )
        .await;
    story
        .add_config(
            "acme",
            pb::HandoffConfig {
                handoff_config_id: "wa-only".into(),
                name: "WhatsApp only".into(),
                channel_priority: vec![Channel::Whatsapp as i32],
                whatsapp_template_id: "followup".into(),
                ..Default::default()
            },
        )
        .await;
    for (config_id, phone) in [("rcs-only", "+14155550911"), ("wa-only", "+14155550912")] {
        let mut request = handoff_request("acme", phone, config_id);
        request.handoff_config_id = config_id.into();
        request.template_variables.insert("1".into(), "Ada".into());
        request
            .template_variables
            .insert("2".into(), "your bill".into());
        let handoff = story.deflect(request, &key).await;
        assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{config_id}");
    }
    // Every stage each channel has, played by the sandbox through the signed webhooks.
    story
        .await_funnel(
            "acme",
            &[
                ("CHANNEL_RCS", EVERY_STAGE_ONCE),
                ("CHANNEL_WHATSAPP", EVERY_STAGE_ONCE),
            ],
        )
        .await;
    let whatsapp = story.open_conversation("acme", "+14155550912").await;
    assert_eq!(
        whatsapp.transcript[0].text,
        "Hi Ada, reply here about your bill."
    );
    assert_eq!(whatsapp.transcript[1].text, "Yes please");
    assert!(story.meta.sent().is_empty() && story.google.rcs_sent().is_empty());
    story.stop().await;
}

/// The gateway's PostgreSQL refuses the sandbox's webhooks for a while (503): the sandbox posts
/// them again, as providers do, and the funnel still has every stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_webhooks_c2m_could_not_take_are_posted_again() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    story
        .gateway()
        .await
        .delete_provider_credentials(authed(
            pb::DeleteProviderCredentialsRequest {
                account_id: "acme".into(),
                provider: pb::Provider::Twilio as i32,
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("twilio removed");
    story.put_credentials("acme", answering_sandbox()).await;
    let mut db = story.db.connect().await;
    sqlx::query("ALTER TABLE channel_gateway.webhook_inbox RENAME TO webhook_inbox_away")
        .execute(&mut db)
        .await
        .expect("rename");

    let handoff = story
        .deflect(handoff_request("acme", "+14155550902", "sb-retry"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    // Three refusals: as many as the sandbox has webhooks for this message (sent, delivered,
    // the reply), so a sandbox that posted each once would have lost them all.
    eventually(
        "sandbox webhooks refused",
        Duration::from_secs(10),
        || async {
            story
                .metric("c2m_webhooks_unavailable_total")
                .await
                .is_some_and(|n| n >= 3.0)
        },
    )
    .await;
    sqlx::query("ALTER TABLE channel_gateway.webhook_inbox_away RENAME TO webhook_inbox")
        .execute(&mut db)
        .await
        .expect("rename back");

    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 1),
                    ("FUNNEL_STAGE_SENT", 1),
                    ("FUNNEL_STAGE_DELIVERED", 1),
                    ("FUNNEL_STAGE_RESPONDED", 1),
                    ("FUNNEL_STAGE_CONVERSATION_OPENED", 1),
                ],
            )],
        )
        .await;
    story.stop().await;
}
