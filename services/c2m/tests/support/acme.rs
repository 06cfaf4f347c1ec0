//! Acme, the account the binary tests deflect for: its secrets, its onboarding (an SMS
//! configuration on Twilio) and its requests.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::{
    self as pb, channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient, put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::{Role, TokenKey};
use c2m_test_support::{TestDatabase, TestRedis, TwilioEmulator};
use tonic::transport::Channel;

use super::dev::Dev;

pub const SECRET: &str = "fault-secret-fault-secret-fault-secret-01";
const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TWILIO_TOKEN: &str = "twilio-auth-token-for-faults";

pub fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().expect("ascii"),
    );
    request
}

pub fn token(role: Role, account_id: Option<&str>) -> String {
    TokenKey::new(SECRET.as_bytes()).user_token(
        "tester",
        role,
        account_id,
        Duration::from_secs(3600),
    )
}

/// The environment every `c2m dev` of a test shares: its secrets and its provider.
pub fn environment(twilio: &TwilioEmulator) -> Vec<(&'static str, String)> {
    vec![
        ("C2M_AUTH__TOKEN_SECRET", SECRET.to_owned()),
        (
            "C2M_CHANNEL_GATEWAY__CREDENTIALS_KEY",
            STANDARD.encode([7u8; 32]),
        ),
        (
            "C2M_CHANNEL_GATEWAY__TWILIO_API_BASE",
            twilio.base_url().to_owned(),
        ),
        (
            "C2M_CHANNEL_GATEWAY__TWILIO_LOOKUP_BASE",
            twilio.base_url().to_owned(),
        ),
        // A send unanswered for a second is given up by the gateway (its claim soon after).
        (
            "C2M_CHANNEL_GATEWAY__PROVIDER_TIMEOUT_MS",
            "1000".to_owned(),
        ),
    ]
}

pub async fn start(db: &TestDatabase, redis: &TestRedis, env: &[(&'static str, String)]) -> Dev {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Dev::start(db, redis, &env).await
}

/// acme with deflection on, an SMS configuration `billing` and Twilio credentials; its API key.
pub async fn onboard(channel: &Channel, twilio: &TwilioEmulator) -> String {
    onboard_on(channel, channel, twilio).await
}

/// [`onboard`], with Config and the gateway on their own servers.
pub async fn onboard_on(channel: &Channel, gateway: &Channel, twilio: &TwilioEmulator) -> String {
    let (operator, admin) = (
        token(Role::Operator, None),
        token(Role::Admin, Some("acme")),
    );
    let mut config = ConfigServiceClient::new(channel.clone());
    config
        .create_account(authed(
            pb::CreateAccountRequest {
                account_id: "acme".into(),
                display_name: "Acme".into(),
                settings: Some(pb::AccountSettings {
                    deflection_enabled: true,
                    ..Default::default()
                }),
            },
            &operator,
        ))
        .await
        .expect("account");
    let key = config
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                account_id: "acme".into(),
                name: "ivr".into(),
                scopes: Vec::new(),
            },
            &admin,
        ))
        .await
        .expect("api key")
        .into_inner()
        .plaintext;
    config
        .create_handoff_config(authed(
            pb::CreateHandoffConfigRequest {
                account_id: "acme".into(),
                config: Some(pb::HandoffConfig {
                    handoff_config_id: "billing".into(),
                    name: "Billing".into(),
                    skill_id: "billing-agents".into(),
                    channel_priority: vec![pb::Channel::Sms as i32],
                    messages: vec![pb::ChannelMessage {
                        channel: pb::Channel::Sms as i32,
                        text: "Text us here about your bill.".into(),
                    }],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("configuration");
    twilio.add_account(TWILIO_SID, TWILIO_TOKEN);
    ChannelGatewayServiceClient::new(gateway.clone())
        .put_provider_credentials(authed(
            pb::PutProviderCredentialsRequest {
                account_id: "acme".into(),
                provider: pb::Provider::Twilio as i32,
                credentials: Some(Credentials::Twilio(pb::TwilioCredentials {
                    account_sid: TWILIO_SID.into(),
                    auth_token: TWILIO_TOKEN.into(),
                    from_number: "+14155550100".into(),
                    messaging_service_sid: String::new(),
                })),
            },
            &admin,
        ))
        .await
        .expect("credentials");
    key
}

pub fn request(phone: &str, key: &str) -> pb::CreateHandoffRequest {
    pb::CreateHandoffRequest {
        account_id: "acme".into(),
        handoff_config_id: "billing".into(),
        consumer_phone: phone.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}
