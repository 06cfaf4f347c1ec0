//! Faults on a real `c2m dev` process: killed with SIGKILL in the middle of a handoff, then
//! started again on the same PostgreSQL and Redis. Sends are counted at the provider emulator.

mod support;

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::{
    self as pb, AttemptOutcome, HandoffStatus,
    channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient, handoff_service_client::HandoffServiceClient,
    put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::{Role, TokenKey};
use c2m_test_support::{TestDatabase, TestRedis, TwilioEmulator, eventually};
use support::dev::Dev;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const SECRET: &str = "fault-secret-fault-secret-fault-secret-01";
const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
const TWILIO_TOKEN: &str = "twilio-auth-token-for-faults";

fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().expect("ascii"),
    );
    request
}

fn token(role: Role, account_id: Option<&str>) -> String {
    TokenKey::new(SECRET.as_bytes()).user_token(
        "tester",
        role,
        account_id,
        Duration::from_secs(3600),
    )
}

/// The environment every `c2m dev` of a test shares: its secrets and its provider.
fn environment(twilio: &TwilioEmulator) -> Vec<(&'static str, String)> {
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

async fn start(db: &TestDatabase, redis: &TestRedis, env: &[(&'static str, String)]) -> Dev {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Dev::start(db, redis, &env).await
}

/// acme with deflection on, an SMS configuration `billing` and Twilio credentials; its API key.
async fn onboard(channel: &Channel, twilio: &TwilioEmulator) -> String {
    onboard_on(channel, channel, twilio).await
}

/// [`onboard`], with Config and the gateway on their own servers.
async fn onboard_on(channel: &Channel, gateway: &Channel, twilio: &TwilioEmulator) -> String {
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

fn request(phone: &str, key: &str) -> pb::CreateHandoffRequest {
    pb::CreateHandoffRequest {
        account_id: "acme".into(),
        handoff_config_id: "billing".into(),
        consumer_phone: phone.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// The IVR's retries under one key while the answer says "retry", after the delay it carries,
/// for up to 30 s.
async fn retry_until_answered(
    channel: &Channel,
    api_key: &str,
    request: pb::CreateHandoffRequest,
) -> pb::Handoff {
    let until = Instant::now() + Duration::from_secs(30);
    let mut client = HandoffServiceClient::new(channel.clone());
    loop {
        match client
            .create_handoff(authed(request.clone(), api_key))
            .await
        {
            Ok(answer) => return answer.into_inner().handoff.expect("handoff"),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Aborted | tonic::Code::Unavailable
                ) && Instant::now() < until =>
            {
                let wait = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(Duration::from_millis(200));
                tokio::time::sleep(wait).await;
            }
            Err(status) => panic!("the retry was refused: {status:?}"),
        }
    }
}

/// c2m is killed while Twilio holds a message it has taken; started again, the IVR's retry under
/// the same key finishes the handoff it started (the send unconfirmed, for Twilio's reports to
/// settle) and the consumer has one message. Before, the retry answered "in progress" naming a
/// handoff that was never saved, then sent a second message once Redis forgot the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_provider_holds_the_message_does_not_send_it_twice() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let env = environment(&twilio);
    let first = start(&db, &redis, &env).await;
    let channel = first.until_serving().await;
    let api_key = onboard(&channel, &twilio).await;
    let consumer = "+14155550800";

    twilio.stall_next();
    let mut client = HandoffServiceClient::new(channel.clone());
    let call = {
        let request = authed(request(consumer, "crash-1"), &api_key);
        tokio::spawn(async move { client.create_handoff(request).await })
    };
    eventually(
        "twilio has the message",
        Duration::from_secs(10),
        || async { twilio.sent().len() == 1 },
    )
    .await;
    first.kill9().await;
    assert!(
        call.await.expect("joins").is_err(),
        "the IVR's call broke off"
    );

    let second = start(&db, &redis, &env).await;
    let channel = second.until_serving().await;
    let handoff = retry_until_answered(&channel, &api_key, request(consumer, "crash-1")).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32],
        "the provider never answered: unconfirmed until its reports come"
    );
    assert_eq!(twilio.sent().len(), 1, "one message");

    // Retrievable, and the same answer again.
    let again = retry_until_answered(&channel, &api_key, request(consumer, "crash-1")).await;
    assert_eq!(again.handoff_id, handoff.handoff_id);
    let fetched = HandoffServiceClient::new(channel.clone())
        .get_handoff(authed(
            pb::GetHandoffRequest {
                account_id: "acme".into(),
                handoff_id: handoff.handoff_id.clone(),
            },
            &api_key,
        ))
        .await
        .expect("retrievable")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(fetched.status, HandoffStatus::Sent as i32);
    assert_eq!(twilio.sent().len(), 1, "still one message");
}

/// A port nothing listens on now, for a server that must keep its address across a restart.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The five roles as separate processes; the gateway, killed with SIGKILL while Twilio holds a
/// message it took, is started again on its address. The IVR hears UNAVAILABLE (the handoff is
/// not finished), not FAILED, and its retry under the same key answers that handoff,
/// unconfirmed, with one message: the gateway's claim on the message id outlived it. Before,
/// the IVR heard FAILED, and its next step (a new key) sent a second SMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_after_the_provider_took_the_message_does_not_send_it_twice() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let roles = [
        "handoff",
        "routing",
        "channel-gateway",
        "config",
        "reporting",
    ];
    let addrs: Vec<String> = roles
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut env = environment(&twilio);
    for (key, addr) in [
        "C2M_PEERS__HANDOFF",
        "C2M_PEERS__ROUTING",
        "C2M_PEERS__CHANNEL_GATEWAY",
        "C2M_PEERS__CONFIG",
        "C2M_PEERS__REPORTING",
    ]
    .into_iter()
    .zip(&addrs)
    {
        env.push((key, format!("http://{addr}")));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let services = [
        "c2m.v1.HandoffService",
        "c2m.v1.RoutingService",
        "c2m.v1.ChannelGatewayService",
        "c2m.v1.ConfigService",
        "c2m.v1.ReportingService",
    ];
    let mut servers = Vec::new();
    let mut channels = Vec::new();
    for ((role, addr), service) in roles.iter().zip(&addrs).zip(services) {
        let server = Dev::serve(role, addr, &db, &redis, &env).await;
        channels.push(server.until_serving_only(&[service]).await);
        servers.push(Some(server));
    }
    let (handoff, gateway, config) = (&channels[0], &channels[2], &channels[3]);
    let api_key = onboard_on(config, gateway, &twilio).await;
    let consumer = "+14155550810";

    twilio.stall_next();
    let call = {
        let mut client = HandoffServiceClient::new(handoff.clone());
        let request = authed(request(consumer, "gw-crash-1"), &api_key);
        tokio::spawn(async move { client.create_handoff(request).await })
    };
    eventually(
        "twilio has the message",
        Duration::from_secs(10),
        || async { twilio.sent().len() == 1 },
    )
    .await;
    servers[2].take().expect("the gateway").kill9().await;
    let refused = call.await.expect("joins").expect_err("not finished");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.get_details_error_info().expect("ErrorInfo").reason,
        "HANDOFF_UNFINISHED"
    );

    let gateway = Dev::serve("channel-gateway", &addrs[2], &db, &redis, &env).await;
    gateway
        .until_serving_only(&["c2m.v1.ChannelGatewayService"])
        .await;
    let handoff = retry_until_answered(handoff, &api_key, request(consumer, "gw-crash-1")).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32],
        "Twilio never answered: unconfirmed until its reports come"
    );
    assert_eq!(twilio.sent().len(), 1, "one message");
}
