//! Google RCS Business Messaging: a capability check decides whether RCS can carry the deflection,
//! the message goes out with our id as RBM's `messageId`, RBM's signed events move it forward and
//! route the reply, and a number without RCS falls to SMS in the same call.

use std::time::Duration;

use c2m_proto::v1::{
    self as pb, Channel, FunnelStage, HandoffStatus, IneligibilityReason,
    put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::eventually_eq;
use serde_json::json;

use crate::story::{EVERY_STAGE_ONCE, Story, Topology, authed, handoff_request, onboard, token};

const AGENT_ID: &str = "acme-billing-agent";
const CLIENT_TOKEN: &str = "SJENCPGJESMGUFPY";
const RCS_PHONE: &str = "+14155550142";
const SMS_ONLY_PHONE: &str = "+14155550143";

/// acme with RBM credentials and an RCS-then-SMS configuration.
async fn rcs_first(story: &Story) -> String {
    let key = onboard(story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let service_account = story
        .google
        .service_account("rbm@acme-project.iam.gserviceaccount.com");
    let mut gateway = story.gateway().await;
    // A key file that is not one is refused, naming the field.
    let refused = gateway
        .put_provider_credentials(authed(
            pb::PutProviderCredentialsRequest {
                account_id: "acme".into(),
                provider: pb::Provider::GoogleRbm as i32,
                credentials: Some(Credentials::GoogleRbm(pb::GoogleRbmCredentials {
                    agent_id: AGENT_ID.into(),
                    service_account_json: r#"{"client_email":"x@y","private_key":"nope"}"#.into(),
                    client_token: CLIENT_TOKEN.into(),
                })),
            },
            &admin,
        ))
        .await
        .expect_err("a bad key file");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let details = tonic_types::StatusExt::get_error_details(&refused);
    assert_eq!(
        details
            .bad_request()
            .expect("field violations")
            .field_violations[0]
            .field,
        "google_rbm.service_account_json"
    );
    story
        .put_credentials(
            "acme",
            Credentials::GoogleRbm(pb::GoogleRbmCredentials {
                agent_id: AGENT_ID.into(),
                service_account_json: service_account,
                client_token: CLIENT_TOKEN.into(),
            }),
        )
        .await;
    story
        .reconfigure_billing(
            "acme",
            pb::HandoffConfig {
                channel_priority: vec![Channel::Rcs as i32, Channel::Sms as i32],
                messages: vec![
                    pb::ChannelMessage {
                        channel: Channel::Rcs as i32,
                        text: "Hi {{first_name}}, chat with us here about {{topic}}.".into(),
                    },
                    pb::ChannelMessage {
                        channel: Channel::Sms as i32,
                        text: "Hi {{first_name}}, text us here about {{topic}}.".into(),
                    },
                ],
                ..Default::default()
            },
        )
        .await;
    story.google.add_rcs_phone(RCS_PHONE);
    key
}

fn eligibility_of(response: &pb::CheckEligibilityResponse, channel: Channel) -> (bool, i32) {
    let c = response
        .channels
        .iter()
        .find(|c| c.channel == channel as i32)
        .expect("channel considered");
    (c.eligible, c.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rcs_carries_the_deflection_where_the_number_has_it_and_sms_where_not() {
    let story = Story::start(Topology::Dev).await;
    let key = rcs_first(&story).await;
    let webhook = format!("{}/webhooks/google/acme", story.webhooks);

    // Google's webhook set-up: the secret comes back only for the right client token.
    assert_eq!(
        story
            .google
            .post_handshake(&webhook, CLIENT_TOKEN, "1234567890")
            .await,
        (200, "1234567890".to_owned())
    );
    assert_eq!(
        story
            .google
            .post_handshake(&webhook, "WRONGTOKEN", "1234567890")
            .await
            .0,
        403
    );

    // Eligibility asks RBM; the number without RCS is out for that reason only.
    let rcs = story.eligibility("acme", RCS_PHONE, &key).await;
    assert_eq!(rcs.recommended_channel, Channel::Rcs as i32);
    let sms_only = story.eligibility("acme", SMS_ONLY_PHONE, &key).await;
    assert_eq!(
        eligibility_of(&sms_only, Channel::Rcs),
        (false, IneligibilityReason::NotRcsReachable as i32)
    );
    assert_eq!(sms_only.recommended_channel, Channel::Sms as i32);
    assert!(
        story.google.rcs_sent().is_empty(),
        "eligibility sends nothing"
    );

    let handoff = story
        .deflect(handoff_request("acme", RCS_PHONE, "rcs-1"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Rcs as i32);
    let sent = story.google.rcs_sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].phone, RCS_PHONE);
    assert_eq!(sent[0].agent_id, AGENT_ID);
    assert_eq!(sent[0].message_id, format!("{}-1", handoff.handoff_id));
    assert_eq!(
        sent[0].body,
        json!({ "contentMessage": { "text": "Hi Ada, chat with us here about your bill." } })
    );
    assert_eq!(
        story.twilio.sent().len(),
        0,
        "nothing went by SMS for the RCS number"
    );

    let fallback = story
        .deflect(handoff_request("acme", SMS_ONLY_PHONE, "rcs-2"), &key)
        .await;
    assert_eq!(fallback.channel, Channel::Sms as i32);
    assert_eq!(story.twilio.sent().len(), 1);
    // Two sends and two capability checks, one service-account token between them.
    assert_eq!(story.google.token_requests(), 1);

    // RBM's events: delivered, then read; a replay and a forgery change nothing.
    let message_id = sent[0].message_id.clone();
    let event = |kind: &str, id: &str| {
        json!({
            "senderPhoneNumber": RCS_PHONE, "eventType": kind, "eventId": id,
            "messageId": message_id, "sendTime": "2026-11-26T12:00:02Z", "agentId": AGENT_ID,
        })
    };
    let forged = story
        .google
        .post_rbm(
            &webhook,
            &event("READ", "EV-forged"),
            Some(Some("bm90IGEgc2lnbmF0dXJl".into())),
            CLIENT_TOKEN,
        )
        .await;
    assert_eq!(forged.0, 403);
    let unsigned = story
        .google
        .post_rbm(
            &webhook,
            &event("READ", "EV-unsigned"),
            Some(None),
            CLIENT_TOKEN,
        )
        .await;
    assert_eq!(unsigned.0, 403);
    for (kind, id) in [
        ("DELIVERED", "EV-1"),
        ("DELIVERED", "EV-1"),
        ("IS_TYPING", "EV-2"),
        ("READ", "EV-3"),
    ] {
        let (status, _) = story
            .google
            .post_rbm(&webhook, &event(kind, id), None, CLIENT_TOKEN)
            .await;
        assert_eq!(status, 200, "{kind} {id}");
    }
    assert_eq!(
        story.message("acme", &message_id).await.stage,
        FunnelStage::Read as i32
    );
    // GetHandoff shows when each stage was reported, in order.
    let progress = story
        .handoff_of("acme", &key, &handoff.handoff_id)
        .await
        .progress
        .expect("progress");
    assert_eq!(progress.stage, FunnelStage::Read as i32);
    let at = |t: Option<prost_types::Timestamp>| {
        let t = t.expect("a time");
        (t.seconds, t.nanos)
    };
    assert!(at(progress.sent_at) <= at(progress.delivered_at));
    assert!(at(progress.delivered_at) <= at(progress.read_at));
    assert_eq!(progress.failed_at, None);

    // The consumer answers in RCS: the conversation opens on the deflection's skill.
    let (status, _) = story
        .google
        .post_rbm(
            &webhook,
            &json!({
                "senderPhoneNumber": RCS_PHONE, "text": "Yes please", "eventId": "EV-4",
                "messageId": "MSG-IN-1", "sendTime": "2026-11-26T12:01:00Z", "agentId": AGENT_ID,
            }),
            None,
            CLIENT_TOKEN,
        )
        .await;
    assert_eq!(status, 200);
    let conversation = story.open_conversation("acme", RCS_PHONE).await;
    assert_eq!(conversation.channel, Channel::Rcs as i32);
    assert_eq!(conversation.skill_id, "billing-agents");
    assert_eq!(conversation.handoff_id, handoff.handoff_id);

    story
        .await_funnel(
            "acme",
            &[
                ("CHANNEL_RCS", EVERY_STAGE_ONCE),
                // The number without RCS went by SMS.
                (
                    "CHANNEL_SMS",
                    &[("FUNNEL_STAGE_ATTEMPTED", 1), ("FUNNEL_STAGE_SENT", 1)],
                ),
            ],
        )
        .await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_rbm_revokes_undelivered_falls_back_to_sms() {
    let story = Story::start(Topology::Dev).await;
    let key = rcs_first(&story).await;
    let handoff = story
        .deflect(handoff_request("acme", RCS_PHONE, "rcs-ttl"), &key)
        .await;
    assert_eq!(handoff.channel, Channel::Rcs as i32);
    // The message's time to live ran out before the phone took it; RBM revoked it.
    let (status, _) = story
        .google
        .post_rbm(
            &format!("{}/webhooks/google/acme", story.webhooks),
            &json!({
                "phoneNumber": RCS_PHONE, "agentId": AGENT_ID, "eventType": "TTL_EXPIRATION_REVOKED",
                "eventId": "SE-1", "messageId": format!("{}-1", handoff.handoff_id),
                "sendTime": "2026-11-26T12:10:00Z",
            }),
            None,
            CLIENT_TOKEN,
        )
        .await;
    assert_eq!(status, 200);
    // Both attempts on the handoff once the fallback has committed, the SMS sent once.
    let expected = vec![
        (
            Channel::Rcs as i32,
            pb::AttemptOutcome::Undelivered as i32,
            "TTL_EXPIRATION_REVOKED".to_owned(),
        ),
        (
            Channel::Sms as i32,
            pb::AttemptOutcome::Sent as i32,
            String::new(),
        ),
    ];
    let attempts = || async {
        story
            .handoff_of("acme", &key, &handoff.handoff_id)
            .await
            .attempts
            .iter()
            .map(|a| (a.channel, a.outcome, a.error_code.clone()))
            .collect::<Vec<_>>()
    };
    eventually_eq(
        "the SMS fallback on the handoff",
        Duration::from_secs(10),
        &expected,
        attempts,
    )
    .await;
    assert_eq!(story.twilio.sent().len(), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_google_refuses_falls_back_to_sms_naming_why() {
    let story = Story::start(Topology::Dev).await;
    let key = rcs_first(&story).await;
    // A key file whose account Google does not know (revoked, or from another project): the
    // token endpoint refuses the assertion.
    let unknown = serde_json::json!({
        "type": "service_account",
        "private_key_id": "0123456789abcdef0123456789abcdef01234567",
        "private_key": c2m_test_support::TEST_SERVICE_ACCOUNT_KEY,
        "client_email": "revoked@acme-project.iam.gserviceaccount.com",
    })
    .to_string();
    story
        .put_credentials(
            "acme",
            Credentials::GoogleRbm(pb::GoogleRbmCredentials {
                agent_id: AGENT_ID.into(),
                service_account_json: unknown,
                client_token: CLIENT_TOKEN.into(),
            }),
        )
        .await;
    let handoff = story
        .deflect(handoff_request("acme", RCS_PHONE, "rcs-oauth"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Sms as i32);
    assert_eq!(handoff.attempts[0].channel, Channel::Rcs as i32);
    assert_eq!(handoff.attempts[0].error_code, "oauth:invalid_grant");
    assert!(story.google.rcs_sent().is_empty());
    story.stop().await;
}

#[tokio::test]
async fn a_file_goes_to_rcs_alone_or_in_a_card_above_its_text() {
    let story = Story::start(Topology::Dev).await;
    rcs_first(&story).await;
    const BILL: &str = "https://acme.example.com/bills/C-1001.png";
    let bill = BILL;
    let send = |id: &'static str, text: &'static str, media: &'static [&'static str]| {
        crate::whatsapp::send_direct(&story, Channel::Rcs, RCS_PHONE, id, text, media)
    };
    send("r-1", "Your bill", &[BILL]).await.expect("sent");
    send("r-2", "", &[BILL]).await.expect("sent");
    let contents: Vec<serde_json::Value> = story
        .google
        .rcs_sent()
        .into_iter()
        .map(|m| m.body["contentMessage"].clone())
        .collect();
    assert_eq!(
        contents,
        [
            serde_json::json!({ "richCard": { "standaloneCard": {
                "cardOrientation": "VERTICAL",
                "cardContent": {
                    "description": "Your bill",
                    "media": { "height": "MEDIUM", "contentInfo": { "fileUrl": bill } },
                },
            } } }),
            serde_json::json!({ "contentInfo": { "fileUrl": bill } }),
        ]
    );
    let two = send("r-3", "", &[BILL, BILL]).await;
    assert_eq!(
        crate::whatsapp::refused_field(&two.expect_err("one file")),
        "media_urls"
    );
    assert_eq!(
        story.google.rcs_sent().len(),
        2,
        "nothing more reached Google"
    );
    story.stop().await;
}
