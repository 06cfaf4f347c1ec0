//! App messaging: the brand's app registers a logged-in consumer's devices; a deflection pushes
//! to every one of them through FCM (Android) and APNs over HTTP/2 (iOS); a consumer without a
//! device is ineligible, and tokens the providers call dead are forgotten.

use c2m_proto::v1::{
    self as pb, Channel, HandoffStatus, IneligibilityReason,
    put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::{APNS_KEY_ID, APNS_TEAM_ID, APNS_TOPIC};
use serde_json::json;
use tonic_types::StatusExt;

use crate::story::{Options, Story, Topology, authed, handoff_request, onboard, token};

const PHONE: &str = "+14155550177";
const ANDROID_TOKEN: &str = "fcm-registration-token-ada-pixel";
const IOS_TOKEN: &str = "7a3f0c9e2b14d6a8e5f1c3b7d9a2e4f6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8";

/// acme with FCM and APNs credentials and an app-then-SMS configuration.
async fn app_first(story: &Story) -> String {
    let key = onboard(story, "acme").await;
    story
        .put_credentials(
            "acme",
            Credentials::Fcm(pb::FcmCredentials {
                project_id: "acme-app".into(),
                service_account_json: story
                    .google
                    .service_account("fcm@acme-app.iam.gserviceaccount.com"),
            }),
        )
        .await;
    story
        .put_credentials(
            "acme",
            Credentials::Apns(pb::ApnsCredentials {
                team_id: APNS_TEAM_ID.into(),
                key_id: APNS_KEY_ID.into(),
                private_key_pem: story.apns.private_key_pem().into(),
                topic: APNS_TOPIC.into(),
            }),
        )
        .await;
    story
        .reconfigure_billing(
            "acme",
            pb::HandoffConfig {
                channel_priority: vec![Channel::AppMessaging as i32, Channel::Sms as i32],
                messages: vec![
                    pb::ChannelMessage {
                        channel: Channel::AppMessaging as i32,
                        text: "{{first_name}}, tap to chat with us about {{topic}}.".into(),
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
    key
}

async fn register(
    story: &Story,
    platform: pb::DevicePlatform,
    device_token: &str,
    credential: &str,
) -> Result<(), tonic::Status> {
    story
        .gateway()
        .await
        .register_device(authed(
            pb::RegisterDeviceRequest {
                account_id: "acme".into(),
                consumer_id: "ada-1001".into(),
                platform: platform as i32,
                device_token: device_token.into(),
            },
            credential,
        ))
        .await
        .map(|_| ())
}

fn app_request(idempotency_key: &str, consumer_id: &str) -> pb::CreateHandoffRequest {
    let mut request = handoff_request("acme", PHONE, idempotency_key);
    request.consumer_id = consumer_id.into();
    request
}

fn app_eligibility(response: &pb::CheckEligibilityResponse) -> (bool, i32) {
    let app = response
        .channels
        .iter()
        .find(|c| c.channel == Channel::AppMessaging as i32)
        .expect("app messaging considered");
    (app.eligible, app.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logged_in_consumer_gets_a_push_on_every_device_and_others_fall_to_sms() {
    let story = Story::start(Topology::Dev).await;
    let key = app_first(&story).await;
    let editor = token(AuthRole::Editor, Some("acme"));

    // No devices yet: app messaging is out for that reason, and SMS is recommended.
    let mut eligibility = pb::CheckEligibilityRequest {
        account_id: "acme".into(),
        handoff_config_id: "billing".into(),
        consumer_phone: PHONE.into(),
        consumer_id: "ada-1001".into(),
        template_variables: [
            ("first_name".to_owned(), "Ada".to_owned()),
            ("topic".to_owned(), "your bill".to_owned()),
        ]
        .into(),
        ..Default::default()
    };
    let ask = |request: pb::CheckEligibilityRequest| {
        let story = &story;
        let key = key.clone();
        async move {
            story
                .handoff()
                .await
                .check_eligibility(authed(request, &key))
                .await
                .expect("eligibility")
                .into_inner()
        }
    };
    let before = ask(eligibility.clone()).await;
    assert_eq!(
        app_eligibility(&before),
        (false, IneligibilityReason::NoRegisteredDevice as i32)
    );
    assert_eq!(before.recommended_channel, Channel::Sms as i32);

    // Registering: a viewer may not; an iOS token must be APNs' hex; then both devices.
    let viewer = register(
        &story,
        pb::DevicePlatform::Android,
        ANDROID_TOKEN,
        &token(AuthRole::Viewer, Some("acme")),
    )
    .await
    .expect_err("viewers do not register devices");
    assert_eq!(viewer.code(), tonic::Code::PermissionDenied);
    let bad = register(&story, pb::DevicePlatform::Ios, "not-hex!", &editor)
        .await
        .expect_err("not an APNs token");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        bad.get_error_details()
            .bad_request()
            .expect("violations")
            .field_violations[0]
            .field,
        "device_token"
    );
    register(&story, pb::DevicePlatform::Android, ANDROID_TOKEN, &editor)
        .await
        .expect("android device");
    register(&story, pb::DevicePlatform::Ios, IOS_TOKEN, &editor)
        .await
        .expect("ios device");

    let after = ask(eligibility.clone()).await;
    assert_eq!(after.recommended_channel, Channel::AppMessaging as i32);
    // Without a consumer id there is no one to push to.
    eligibility.consumer_id.clear();
    assert_eq!(
        app_eligibility(&ask(eligibility).await),
        (false, IneligibilityReason::NoRegisteredDevice as i32)
    );

    let handoff = story.deflect(app_request("app-1", "ada-1001"), &key).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::AppMessaging as i32);
    let message_id = format!("{}-1", handoff.handoff_id);

    let fcm = story.google.fcm_sent();
    assert_eq!(fcm.len(), 1);
    assert_eq!(fcm[0].project_id, "acme-app");
    assert_eq!(
        fcm[0].body,
        json!({ "message": {
            "token": ANDROID_TOKEN,
            "notification": { "title": "acme Inc.", "body": "Ada, tap to chat with us about your bill." },
            "data": { "c2m_message_id": message_id, "c2m_handoff_id": handoff.handoff_id },
        }})
    );
    let apns = story.apns.sent();
    assert_eq!(apns.len(), 1, "refused: {:?}", story.apns.refused());
    assert_eq!(apns[0].device_token, IOS_TOKEN);
    assert!(
        apns[0]
            .headers
            .contains(&("apns-topic".to_owned(), APNS_TOPIC.to_owned()))
    );
    assert!(
        apns[0]
            .headers
            .contains(&("apns-push-type".to_owned(), "alert".to_owned()))
    );
    assert_eq!(
        apns[0].body["aps"]["alert"],
        json!({ "title": "acme Inc.", "body": "Ada, tap to chat with us about your bill." })
    );
    assert!(
        story.twilio.sent().is_empty(),
        "no SMS for a pushed consumer"
    );

    // A push reports no delivery: nothing is left watching it for a delivery fallback.
    let mut db = story.db.connect().await;
    let watched: i64 = sqlx::query_scalar("SELECT count(*) FROM handoff.fallbacks")
        .fetch_one(&mut db)
        .await
        .expect("query");
    assert_eq!(watched, 0);

    // A caller without a consumer id goes by SMS in the same call.
    let mut anonymous = app_request("app-2", "");
    anonymous.consumer_phone = "+14155550178".into();
    let by_sms = story.deflect(anonymous, &key).await;
    assert_eq!(by_sms.channel, Channel::Sms as i32);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_device_tokens_are_forgotten_and_the_handoff_falls_back_to_sms() {
    let story = Story::start(Topology::Dev).await;
    let key = app_first(&story).await;
    let editor = token(AuthRole::Editor, Some("acme"));
    register(&story, pb::DevicePlatform::Android, ANDROID_TOKEN, &editor)
        .await
        .expect("android device");
    register(&story, pb::DevicePlatform::Ios, IOS_TOKEN, &editor)
        .await
        .expect("ios device");
    // The consumer uninstalled the app on both.
    story.google.unregister_fcm_token(ANDROID_TOKEN);
    story.apns.unregister(IOS_TOKEN);

    let handoff = story.deflect(app_request("dead-1", "ada-1001"), &key).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::Sms as i32);
    let attempts: Vec<(i32, i32, String)> = handoff
        .attempts
        .iter()
        .map(|a| (a.channel, a.outcome, a.error_code.clone()))
        .collect();
    assert_eq!(
        attempts,
        vec![
            (
                Channel::AppMessaging as i32,
                pb::AttemptOutcome::Failed as i32,
                "unregistered".to_owned()
            ),
            (
                Channel::Sms as i32,
                pb::AttemptOutcome::Sent as i32,
                String::new()
            ),
        ]
    );
    // Both tokens are gone: the consumer is ineligible for app messaging from now on.
    let reach = story
        .gateway()
        .await
        .check_reachability(authed(
            pb::CheckReachabilityRequest {
                account_id: "acme".into(),
                channel: Channel::AppMessaging as i32,
                consumer_id: "ada-1001".into(),
                ..Default::default()
            },
            &token(AuthRole::Viewer, Some("acme")),
        ))
        .await
        .expect("reachability")
        .into_inner();
    assert!(!reach.reachable, "{}", reach.detail);
    // And removing a device that is gone says so.
    let removed = story
        .gateway()
        .await
        .remove_device(authed(
            pb::RemoveDeviceRequest {
                account_id: "acme".into(),
                consumer_id: "ada-1001".into(),
                device_token: IOS_TOKEN.into(),
            },
            &editor,
        ))
        .await
        .expect_err("already forgotten");
    assert_eq!(removed.code(), tonic::Code::NotFound);
    story.stop().await;
}

/// FCM takes the push and its answer never comes: the push may have reached the consumer, so it
/// is unconfirmed, as an unanswered SMS or WhatsApp send is, and no SMS follows at once. Before,
/// a push's timeout counted as a failure and the handoff fell to SMS: two messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_push_is_unconfirmed_not_a_reason_to_text_too() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            provider_timeout_ms: Some(300),
            ..Options::default()
        },
    )
    .await;
    let key = app_first(&story).await;
    let editor = token(AuthRole::Editor, Some("acme"));
    register(&story, pb::DevicePlatform::Android, ANDROID_TOKEN, &editor)
        .await
        .expect("android device");
    story.google.stall_next_fcm();

    let handoff = story
        .deflect(app_request("stalled-1", "ada-1001"), &key)
        .await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32);
    assert_eq!(handoff.channel, Channel::AppMessaging as i32);
    let attempts: Vec<(i32, i32)> = handoff
        .attempts
        .iter()
        .map(|a| (a.channel, a.outcome))
        .collect();
    assert_eq!(
        attempts,
        [(
            Channel::AppMessaging as i32,
            pb::AttemptOutcome::Unconfirmed as i32
        )]
    );
    assert_eq!(story.google.fcm_sent().len(), 1, "FCM has the push");
    assert!(story.twilio.sent().is_empty(), "no SMS besides");
    story.stop().await;
}
