//! An account set up for WhatsApp as a brand sets it up: Meta credentials, a template Meta has
//! approved, and a configuration that tries WhatsApp first and SMS after it.

use c2m_proto::v1::{self as pb, Channel, put_provider_credentials_request::Credentials};
use c2m_runtime::auth::Role as AuthRole;

use crate::story::{Story, authed, handoff_request, onboard, token};

pub const PHONE_NUMBER_ID: &str = "106540352242922";
pub const ACCESS_TOKEN: &str = "EAAG-test-access-token";
pub const APP_SECRET: &str = "meta-app-secret-for-tests";
pub const VERIFY_TOKEN: &str = "meta-verify-token";

/// acme with Meta credentials, an approved template and a WhatsApp-then-SMS configuration.
pub async fn whatsapp_first(story: &Story) -> String {
    let key = onboard(story, "acme").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    story.meta.add_number(PHONE_NUMBER_ID, ACCESS_TOKEN);
    story
        .put_credentials(
            "acme",
            Credentials::MetaWhatsapp(pb::MetaWhatsAppCredentials {
                phone_number_id: PHONE_NUMBER_ID.into(),
                access_token: ACCESS_TOKEN.into(),
                app_secret: APP_SECRET.into(),
                verify_token: VERIFY_TOKEN.into(),
            }),
        )
        .await;
    story.add_followup_template("acme").await;
    // Meta approves it: its template-status webhook reaches the gateway, which tells Config.
    let (status, _) = story
        .meta
        .send_template_status(
            &format!("{}/webhooks/meta/acme", story.webhooks),
            APP_SECRET,
            "billing_followup",
            "en_US",
            "APPROVED",
        )
        .await;
    assert_eq!(status, 200);
    let approved = story
        .config()
        .await
        .list_whats_app_templates(authed(
            pb::ListWhatsAppTemplatesRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect("templates")
        .into_inner()
        .templates;
    assert_eq!(
        approved[0].status,
        pb::WhatsAppTemplateStatus::Approved as i32
    );
    story
        .add_config("acme", whatsapp_then_sms("wa-first", "WhatsApp first"))
        .await;
    key
}

/// WhatsApp's approved template first, SMS if it is refused.
pub fn whatsapp_then_sms(id: &str, name: &str) -> pb::HandoffConfig {
    pb::HandoffConfig {
        handoff_config_id: id.into(),
        name: name.into(),
        channel_priority: vec![Channel::Whatsapp as i32, Channel::Sms as i32],
        whatsapp_template_id: "followup".into(),
        messages: vec![pb::ChannelMessage {
            channel: Channel::Sms as i32,
            text: "Hi {{first_name}}, text us here about {{topic}}.".into(),
        }],
        ..Default::default()
    }
}

pub fn whatsapp_request(phone: &str, idempotency_key: &str) -> pb::CreateHandoffRequest {
    let mut request = handoff_request("acme", phone, idempotency_key);
    request.handoff_config_id = "wa-first".into();
    request.template_variables.insert("1".into(), "Ada".into());
    request
        .template_variables
        .insert("2".into(), "your bill".into());
    request
}
