//! A whole c2m on ephemeral ports, as `c2m dev` or as five separate servers, with a Twilio
//! emulator, and clients carrying the credentials an IVR, an admin and an operator would.

use std::{net::SocketAddr, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m::{
    Config, Role,
    app::{self, Running},
};
use c2m_channel_gateway::GatewaySettings;
use std::collections::BTreeMap;

use c2m_proto::v1::{
    self as pb, FunnelGrouping, FunnelStage,
    channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient,
    conversation_service_client::ConversationServiceClient,
    handoff_service_client::HandoffServiceClient, put_provider_credentials_request::Credentials,
    reporting_service_client::ReportingServiceClient, routing_service_client::RoutingServiceClient,
};
use c2m_runtime::{
    ServerSettings,
    auth::{Role as AuthRole, TokenKey},
    peers::PeerSettings,
};
use c2m_test_support::{
    ApnsEmulator, GoogleEmulator, MetaEmulator, TestDatabase, TestRedis, TwilioEmulator,
};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::grpc::{self, ALL_SERVICES};

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// `c2m dev`: every service on one address.
    Dev,
    /// `c2m serve <role>` five times: each service on its own address, calling the others.
    Separate,
}

/// What a test changes about the story's set-up.
#[derive(Debug, Default)]
pub struct Options {
    /// Use this Redis (a server of the test's own) instead of the shared one; empty: none, so
    /// `c2m dev` keeps rate limits and leases in its own memory.
    pub redis_url: Option<String>,
    /// `handoff.replicas`.
    pub handoff_replicas: Option<u32>,
    /// `database.max_connections` (per service pool).
    pub db_max_connections: Option<u32>,
    /// `handoff.consumer_lease_ms`.
    pub consumer_lease_ms: Option<u64>,
    /// `server.health_interval_ms` (tests probe every 50 ms, to see changes quickly).
    pub health_interval_ms: Option<u64>,
    /// `channel_gateway.provider_timeout_ms`.
    pub provider_timeout_ms: Option<u64>,
    /// `peers.timeout_ms`.
    pub peer_timeout_ms: Option<u64>,
    /// `handoff.unconfirmed_fallback_ms`.
    pub unconfirmed_fallback_ms: Option<u64>,
    /// `routing.idle_sweep_ms`.
    pub idle_sweep_ms: Option<u64>,
    /// `handoff.max_in_progress`.
    pub max_handoffs_in_progress: Option<u32>,
    /// `[webhooks]`.
    pub webhooks: Option<c2m_config::webhooks::WebhookSettings>,
    /// `database.reporting.url`: Reporting on a database of its own.
    pub reporting_database_url: Option<String>,
    /// `redis.cluster_nodes`: a Redis Cluster instead of the shared server.
    pub redis_cluster_nodes: Option<Vec<String>>,
    /// The embedded default: no database (SQLite files in this directory) and no Redis.
    pub data_dir: Option<std::path::PathBuf>,
    /// `[reporting]`.
    pub reporting: Option<c2m_reporting::ReportingSettings>,
    /// A PostgreSQL server of the test's own (its admin URL), instead of the shared one.
    pub postgres_url: Option<String>,
}

impl Options {
    /// `c2m dev` as it runs with nothing configured: SQLite files in `dir`, no Redis.
    pub fn embedded(dir: &std::path::Path) -> Self {
        Self {
            redis_url: Some(String::new()),
            data_dir: Some(dir.to_owned()),
            ..Self::default()
        }
    }

    /// `c2m dev` as it runs with no `redis.url`.
    pub fn without_redis() -> Self {
        Self {
            redis_url: Some(String::new()),
            ..Self::default()
        }
    }
}

pub struct Story {
    pub db: TestDatabase,
    pub redis: TestRedis,
    pub twilio: TwilioEmulator,
    pub meta: MetaEmulator,
    pub google: GoogleEmulator,
    pub apns: ApnsEmulator,
    pub config: Config,
    pub servers: Vec<Running>,
    endpoints: [String; 5],
    pub webhooks: String,
    /// The embedded default's data directory, when the story runs on it.
    pub data_dir: Option<std::path::PathBuf>,
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

impl Story {
    pub async fn start(topology: Topology) -> Self {
        Self::start_with(topology, Options::default()).await
    }

    pub async fn start_with(topology: Topology, options: Options) -> Self {
        let db = match options.postgres_url.clone() {
            Some(url) => TestDatabase::create_on(url).await,
            None => TestDatabase::create().await,
        };
        let (redis, twilio, meta, google, apns) = (
            TestRedis::new().await,
            TwilioEmulator::start().await,
            MetaEmulator::start().await,
            GoogleEmulator::start().await,
            ApnsEmulator::start().await,
        );
        // Bound here and handed to the gateway, so no other test can take the port meanwhile.
        let webhooks_listener =
            std::net::TcpListener::bind(any_port()).expect("binds the webhook listener");
        let webhooks_addr = webhooks_listener.local_addr().expect("addr");
        let mut webhooks_listener = Some(webhooks_listener);
        let webhooks = format!("http://{webhooks_addr}");
        let mut config = Config {
            database: db.settings(),
            redis: redis.settings(),
            server: ServerSettings {
                health_interval_ms: options.health_interval_ms.unwrap_or(50),
                grace_period_secs: 1,
                ..ServerSettings::default()
            },
            channel_gateway: GatewaySettings {
                public_url: webhooks.clone(),
                credentials_key: STANDARD.encode([42u8; 32]),
                twilio_api_base: twilio.base_url().to_owned(),
                twilio_lookup_base: twilio.base_url().to_owned(),
                meta_api_base: meta.base_url().to_owned(),
                google_token_url: google.token_url(),
                rbm_api_base: google.base_url().to_owned(),
                fcm_api_base: google.base_url().to_owned(),
                apns_api_base: apns.base_url().to_owned(),
                ..GatewaySettings::default()
            },
            ..Config::default()
        };
        config.auth.token_secret = SECRET.to_owned();
        if let Some(url) = options.redis_url {
            config.redis.url = url;
        }
        if let Some(nodes) = options.redis_cluster_nodes {
            config.redis.url = String::new();
            config.redis.cluster_nodes = nodes;
        }
        if let Some(url) = options.reporting_database_url {
            config.database.reporting = Some(c2m_storage::ServiceDatabase { url });
        }
        config.handoff.replicas = options.handoff_replicas.unwrap_or(1);
        if let Some(lease) = options.consumer_lease_ms {
            config.handoff.consumer_lease_ms = lease;
        }
        if let Some(timeout) = options.provider_timeout_ms {
            config.channel_gateway.provider_timeout_ms = timeout;
        }
        if let Some(timeout) = options.peer_timeout_ms {
            config.peers.timeout_ms = timeout;
        }
        if let Some(window) = options.unconfirmed_fallback_ms {
            config.handoff.unconfirmed_fallback_ms = window;
        }
        if let Some(places) = options.max_handoffs_in_progress {
            config.handoff.max_in_progress = places;
        }
        if let Some(webhooks) = options.webhooks {
            config.webhooks = webhooks;
        }
        if let Some(reporting) = options.reporting {
            config.reporting = reporting;
        }
        if let Some(sweep) = options.idle_sweep_ms {
            config.routing.idle_sweep_ms = sweep;
        }
        if let Some(connections) = options.db_max_connections {
            config.database.max_connections = connections;
        }
        let data_dir = options.data_dir;
        if let Some(dir) = &data_dir {
            config.database = c2m_storage::DatabaseSettings::default();
            config.embedded.data_dir = dir.clone();
        }
        config.listen.webhooks = webhooks_addr;

        let (servers, endpoints) = match topology {
            Topology::Dev => {
                let listener = TcpListener::bind(any_port()).await.expect("binds");
                let server = app::spawn_with(
                    listener,
                    webhooks_listener.take(),
                    &Role::ALL,
                    config.clone(),
                )
                .expect("serves");
                let endpoint = server.endpoint();
                (vec![server], std::array::from_fn(|_| endpoint.clone()))
            }
            Topology::Separate => {
                let mut listeners = Vec::new();
                for _ in Role::ALL {
                    listeners.push(TcpListener::bind(any_port()).await.expect("binds"));
                }
                let urls: Vec<String> = listeners
                    .iter()
                    .map(|l| format!("http://{}", l.local_addr().expect("addr")))
                    .collect();
                config.peers = PeerSettings {
                    handoff: urls[0].clone(),
                    routing: urls[1].clone(),
                    channel_gateway: urls[2].clone(),
                    config: urls[3].clone(),
                    reporting: urls[4].clone(),
                    timeout_ms: config.peers.timeout_ms,
                };
                let servers = listeners
                    .into_iter()
                    .zip(Role::ALL)
                    .map(|(listener, role)| {
                        let webhooks = (role == Role::ChannelGateway)
                            .then(|| webhooks_listener.take())
                            .flatten();
                        app::spawn_with(listener, webhooks, &[role], config.clone())
                            .expect("serves")
                    })
                    .collect();
                (servers, std::array::from_fn(|i| urls[i].clone()))
            }
        };
        for (endpoint, service) in endpoints.iter().zip(ALL_SERVICES) {
            let channel = grpc::channel(endpoint).await;
            grpc::wait_for_status(&channel, &[service], ServingStatus::Serving).await;
        }
        Self {
            db,
            redis,
            twilio,
            meta,
            google,
            apns,
            config,
            servers,
            endpoints,
            webhooks,
            data_dir,
        }
    }

    async fn channel(&self, i: usize) -> Channel {
        grpc::channel(&self.endpoints[i]).await
    }

    pub async fn handoff(&self) -> HandoffServiceClient<Channel> {
        HandoffServiceClient::new(self.channel(0).await)
    }

    pub async fn routing(&self) -> RoutingServiceClient<Channel> {
        RoutingServiceClient::new(self.channel(1).await)
    }

    /// The agents' and bots' API, served by the routing role.
    pub async fn conversations(&self) -> ConversationServiceClient<Channel> {
        ConversationServiceClient::new(self.channel(1).await)
    }

    pub async fn gateway(&self) -> ChannelGatewayServiceClient<Channel> {
        ChannelGatewayServiceClient::new(self.channel(2).await)
    }

    /// Where the config role answers HTTP (the console), e.g. `http://127.0.0.1:50054`.
    pub fn config_url(&self) -> &str {
        &self.endpoints[3]
    }

    pub async fn config(&self) -> ConfigServiceClient<Channel> {
        ConfigServiceClient::new(self.channel(3).await)
    }

    pub async fn reporting(&self) -> ReportingServiceClient<Channel> {
        ReportingServiceClient::new(self.channel(4).await)
    }

    /// Where the c2m services of this story can be reached by another replica.
    pub fn peers(&self) -> PeerSettings {
        PeerSettings {
            handoff: self.endpoints[0].clone(),
            routing: self.endpoints[1].clone(),
            channel_gateway: self.endpoints[2].clone(),
            config: self.endpoints[3].clone(),
            reporting: self.endpoints[4].clone(),
            ..PeerSettings::default()
        }
    }

    pub async fn stop(self) {
        for server in self.servers {
            server.stop().await.expect("drains cleanly");
        }
    }

    /// Stops `c2m dev` and starts it again on the same configuration, its webhooks on the same
    /// port, as a person restarting it would (the `Dev` topology only).
    pub async fn restart(&mut self) {
        for server in std::mem::take(&mut self.servers) {
            server.stop().await.expect("drains cleanly");
        }
        let webhooks = std::net::TcpListener::bind(self.config.listen.webhooks)
            .expect("the webhook port is free again");
        let listener = TcpListener::bind(any_port()).await.expect("binds");
        let server = app::spawn_with(listener, Some(webhooks), &Role::ALL, self.config.clone())
            .expect("serves");
        let endpoint = server.endpoint();
        self.endpoints = std::array::from_fn(|_| endpoint.clone());
        self.servers = vec![server];
        let channel = grpc::channel(&endpoint).await;
        grpc::wait_for_status(&channel, &ALL_SERVICES, ServingStatus::Serving).await;
    }
}

/// A console or operator token signed with the story's secret.
pub fn token(role: AuthRole, account_id: Option<&str>) -> String {
    TokenKey::new(SECRET.as_bytes()).user_token(
        "tester",
        role,
        account_id,
        Duration::from_secs(3600),
    )
}

/// An agent's token: `name` of `account_id`, limited to `skills` unless there are none.
pub fn agent(account_id: &str, name: &str, skills: &[&str]) -> String {
    let skills: Vec<String> = skills.iter().map(|s| (*s).to_owned()).collect();
    TokenKey::new(SECRET.as_bytes()).agent_token(
        name,
        account_id,
        &skills,
        Duration::from_secs(3600),
    )
}

/// `message` with `authorization: Bearer <credential>`.
pub fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().expect("ascii"),
    );
    request
}

pub const TWILIO_SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const TWILIO_TOKEN: &str = "twilio-auth-token-for-tests";
pub const BRAND_NUMBER: &str = "+14155550100";

/// A channel's funnel when one message went, was delivered and read, and was answered.
pub const EVERY_STAGE_ONCE: &[(&str, u64)] = &[
    ("FUNNEL_STAGE_ATTEMPTED", 1),
    ("FUNNEL_STAGE_SENT", 1),
    ("FUNNEL_STAGE_DELIVERED", 1),
    ("FUNNEL_STAGE_READ", 1),
    ("FUNNEL_STAGE_RESPONDED", 1),
    ("FUNNEL_STAGE_CONVERSATION_OPENED", 1),
];

/// An account set up the way the story's operator and admin do it; returns its API key.
pub async fn onboard(story: &Story, account_id: &str) -> String {
    let operator = token(AuthRole::Operator, None);
    let admin = token(AuthRole::Admin, Some(account_id));
    let mut config = story.config().await;
    config
        .create_account(authed(
            pb::CreateAccountRequest {
                account_id: account_id.to_owned(),
                display_name: format!("{account_id} Inc."),
                settings: None,
            },
            &operator,
        ))
        .await
        .expect("operator creates the account");
    let account = story
        .set_settings(
            account_id,
            pb::AccountSettings {
                deflection_enabled: true,
                ..Default::default()
            },
        )
        .await;
    let settings = account.settings.expect("settings");
    assert!(settings.deflection_enabled);
    assert_eq!(settings.rate_limit_per_second, 30, "the default limit");

    let key = config
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                account_id: account_id.to_owned(),
                name: "ivr".to_owned(),
                scopes: Vec::new(),
            },
            &admin,
        ))
        .await
        .expect("admin creates an api key")
        .into_inner();
    assert!(key.plaintext.starts_with("c2m_"));
    // Stored hashed: the plaintext is nowhere in the database.
    let hits: i64 = match &story.data_dir {
        Some(dir) => {
            let file = c2m_storage::sqlite::open(&dir.join("config.db"))
                .await
                .expect("Config's file");
            sqlx::query_scalar(
                "SELECT count(*) FROM api_keys WHERE key_hash = CAST(?1 AS BLOB) OR prefix = ?1",
            )
            .bind(&key.plaintext)
            .fetch_one(&file)
            .await
        }
        None => {
            let mut db = story.db.connect().await;
            sqlx::query_scalar(
                "SELECT count(*) FROM config.api_keys \
                 WHERE key_hash = convert_to($1, 'UTF8') OR prefix = $1",
            )
            .bind(&key.plaintext)
            .fetch_one(&mut db)
            .await
        }
    }
    .expect("query");
    assert_eq!(hits, 0, "the plaintext key is not stored");

    config
        .create_handoff_config(authed(
            pb::CreateHandoffConfigRequest {
                account_id: account_id.to_owned(),
                config: Some(pb::HandoffConfig {
                    handoff_config_id: "billing".to_owned(),
                    name: "Billing queue".to_owned(),
                    skill_id: "billing-agents".to_owned(),
                    channel_priority: vec![pb::Channel::Sms as i32],
                    messages: vec![pb::ChannelMessage {
                        channel: pb::Channel::Sms as i32,
                        text: "Hi {{first_name}}, text us here about {{topic}}.".to_owned(),
                    }],
                    ..Default::default()
                }),
            },
            &admin,
        ))
        .await
        .expect("admin creates the handoff configuration");

    story.twilio.add_account(TWILIO_SID, TWILIO_TOKEN);
    story
        .gateway()
        .await
        .put_provider_credentials(authed(
            pb::PutProviderCredentialsRequest {
                account_id: account_id.to_owned(),
                provider: pb::Provider::Twilio as i32,
                credentials: Some(Credentials::Twilio(pb::TwilioCredentials {
                    account_sid: TWILIO_SID.to_owned(),
                    auth_token: TWILIO_TOKEN.to_owned(),
                    from_number: BRAND_NUMBER.to_owned(),
                    messaging_service_sid: String::new(),
                })),
            },
            &admin,
        ))
        .await
        .expect("admin stores the twilio credentials");
    key.plaintext
}

pub fn handoff_request(
    account_id: &str,
    phone: &str,
    idempotency_key: &str,
) -> pb::CreateHandoffRequest {
    pb::CreateHandoffRequest {
        account_id: account_id.to_owned(),
        handoff_config_id: "billing".to_owned(),
        consumer_phone: phone.to_owned(),
        idempotency_key: idempotency_key.to_owned(),
        engagement_attributes: Some(pb::EngagementAttributes {
            customer_info: Some(pb::CustomerInfo {
                customer_id: "C-1001".to_owned(),
                customer_type: "vip".to_owned(),
                ..Default::default()
            }),
            personal_info: Some(pb::PersonalInfo {
                first_name: "Ada".to_owned(),
                ..Default::default()
            }),
            custom: [("intent".to_owned(), "billing".to_owned())].into(),
        }),
        template_variables: [("topic".to_owned(), "your bill".to_owned())].into(),
        ivr_call_id: "call-1".to_owned(),
        ..Default::default()
    }
}

/// stage name → count, for one group of a funnel. Asked again (for up to 5 s) while Reporting
/// answers UNAVAILABLE, as a console would.
pub async fn funnel(story: &Story, account_id: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let rows = loop {
        let now = chrono::Utc::now();
        let answer = story
            .reporting()
            .await
            .get_funnel(authed(
                pb::GetFunnelRequest {
                    account_id: account_id.to_owned(),
                    start_time: Some(c2m_proto::timestamp(now - chrono::Duration::hours(1))),
                    end_time: Some(c2m_proto::timestamp(now + chrono::Duration::hours(1))),
                    group_by: FunnelGrouping::Channel as i32,
                },
                &token(AuthRole::Viewer, Some(account_id)),
            ))
            .await;
        match answer {
            Ok(answer) => break answer.into_inner().rows,
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && std::time::Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("funnel: {status:?}"),
        }
    };
    rows.into_iter()
        .map(|row| {
            let counts = row
                .counts
                .into_iter()
                .map(|c| {
                    (
                        FunnelStage::try_from(c.stage)
                            .expect("stage")
                            .as_str_name()
                            .to_owned(),
                        c.count,
                    )
                })
                .collect();
            (row.group, counts)
        })
        .collect()
}

impl Story {
    /// `account_id`'s handoff as its IVR reads it (GetHandoff with the account's API key).
    pub async fn handoff_of(
        &self,
        account_id: &str,
        api_key: &str,
        handoff_id: &str,
    ) -> pb::Handoff {
        self.handoff()
            .await
            .get_handoff(authed(
                pb::GetHandoffRequest {
                    account_id: account_id.to_owned(),
                    handoff_id: handoff_id.to_owned(),
                },
                api_key,
            ))
            .await
            .expect("get")
            .into_inner()
            .handoff
            .expect("handoff")
    }

    /// The gateway's record of one of `account_id`'s messages, as a viewer of it reads it.
    pub async fn message(&self, account_id: &str, message_id: &str) -> pb::OutboundMessage {
        self.gateway()
            .await
            .get_message(authed(
                pb::GetMessageRequest {
                    account_id: account_id.to_owned(),
                    message_id: message_id.to_owned(),
                },
                &token(AuthRole::Viewer, Some(account_id)),
            ))
            .await
            .expect("message")
            .into_inner()
            .message
            .expect("message")
    }

    /// A handoff's pending fallback, if it has one: the message it watches, and whether it waits
    /// for the provider to confirm an unanswered send.
    pub async fn fallback_of(&self, handoff_id: &str) -> Option<(String, bool)> {
        let db = sqlx::PgPool::connect(self.db.url()).await.expect("pool");
        let row = sqlx::query_as(
            "SELECT message_id, confirm_by IS NOT NULL FROM handoff.fallbacks WHERE handoff_id = $1",
        )
        .bind(handoff_id)
        .fetch_optional(&db)
        .await
        .expect("fallbacks");
        db.close().await;
        row
    }

    /// `consumer` texts acme's number, through Twilio's signed inbound webhook.
    pub async fn sms_to_acme(&self, consumer: &str, text: &str) {
        let (status, _) = self
            .twilio
            .send_inbound(
                &format!("{}/webhooks/twilio/acme/inbound", self.webhooks),
                TWILIO_SID,
                consumer,
                BRAND_NUMBER,
                text,
                None,
            )
            .await;
        assert_eq!(status, 200, "the inbound webhook is taken");
    }

    /// The IVR's call: a handoff the mesh answered (not refused).
    pub async fn deflect(&self, request: pb::CreateHandoffRequest, api_key: &str) -> pb::Handoff {
        self.handoff()
            .await
            .create_handoff(authed(request, api_key))
            .await
            .expect("handoff answered")
            .into_inner()
            .handoff
            .expect("a handoff")
    }

    /// The IVR's call, retried as an IVR does while the answer says "retry" (ABORTED: under way;
    /// UNAVAILABLE: a service away), after the delay it carries, for up to 20 s: the handoff
    /// the mesh finally answered.
    pub async fn deflect_retrying(
        &self,
        request: pb::CreateHandoffRequest,
        api_key: &str,
    ) -> pb::Handoff {
        use tonic_types::StatusExt;

        let until = std::time::Instant::now() + Duration::from_secs(20);
        let mut client = self.handoff().await;
        loop {
            match client
                .create_handoff(authed(request.clone(), api_key))
                .await
            {
                Ok(answer) => return answer.into_inner().handoff.expect("a handoff"),
                // What failures.md tells an IVR to retry: a handoff under way, a part away, a
                // replica at its limit of handoffs.
                Err(status)
                    if (matches!(
                        status.code(),
                        tonic::Code::Aborted | tonic::Code::Unavailable
                    ) || status
                        .get_details_error_info()
                        .is_some_and(|info| info.reason == "OVERLOADED"))
                        && std::time::Instant::now() < until =>
                {
                    let wait = status
                        .get_details_retry_info()
                        .and_then(|r| r.retry_delay)
                        .unwrap_or(Duration::from_millis(200));
                    tokio::time::sleep(wait).await;
                }
                Err(status) => panic!("handoff refused: {status:?}"),
            }
        }
    }

    /// The consumer's open conversation, as the Redis lease names it and Routing returns it.
    pub async fn open_conversation(&self, account_id: &str, phone: &str) -> pb::Conversation {
        use redis::AsyncCommands;

        let redis = redis::Client::open(self.redis.url()).expect("url");
        let mut redis = redis
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let conversation_id: String = redis
            .get(format!(
                "{}:{{{account_id}}}:conv:{phone}",
                self.redis.prefix()
            ))
            .await
            .expect("the open-conversation lease is held");
        self.conversations()
            .await
            .get_conversation(authed(
                pb::GetConversationRequest {
                    account_id: account_id.to_owned(),
                    conversation_id,
                },
                &token(AuthRole::Viewer, Some(account_id)),
            ))
            .await
            .expect("conversation")
            .into_inner()
            .conversation
            .expect("conversation")
    }
}

impl Story {
    /// An admin of `account_id` replaces its settings.
    pub async fn set_settings(
        &self,
        account_id: &str,
        settings: pb::AccountSettings,
    ) -> pb::Account {
        self.config()
            .await
            .update_account_settings(authed(
                pb::UpdateAccountSettingsRequest {
                    account_id: account_id.to_owned(),
                    settings: Some(settings),
                },
                &token(AuthRole::Admin, Some(account_id)),
            ))
            .await
            .expect("settings updated")
            .into_inner()
            .account
            .expect("account")
    }

    /// CheckEligibility for `phone` on the "billing" configuration, with its variables filled.
    pub async fn eligibility(
        &self,
        account_id: &str,
        phone: &str,
        api_key: &str,
    ) -> pb::CheckEligibilityResponse {
        let request = pb::CheckEligibilityRequest {
            account_id: account_id.to_owned(),
            handoff_config_id: "billing".to_owned(),
            consumer_phone: phone.to_owned(),
            template_variables: [
                ("topic".to_owned(), "your bill".to_owned()),
                ("first_name".to_owned(), "Ada".to_owned()),
            ]
            .into(),
            ..Default::default()
        };
        self.handoff()
            .await
            .check_eligibility(authed(request, api_key))
            .await
            .expect("eligibility")
            .into_inner()
    }
}

impl Story {
    /// An admin of `account_id` submits the WhatsApp template `followup` ("Hi {{1}}, reply here
    /// about {{2}}."), pending until Meta (or an operator) approves it.
    pub async fn add_followup_template(&self, account_id: &str) {
        self.config()
            .await
            .create_whats_app_template(authed(
                pb::CreateWhatsAppTemplateRequest {
                    account_id: account_id.to_owned(),
                    template: Some(pb::WhatsAppTemplate {
                        template_id: "followup".into(),
                        name: "billing_followup".into(),
                        language: "en_US".into(),
                        category: pb::WhatsAppTemplateCategory::Utility as i32,
                        body: "Hi {{1}}, reply here about {{2}}.".into(),
                        ..Default::default()
                    }),
                },
                &token(AuthRole::Admin, Some(account_id)),
            ))
            .await
            .expect("template");
    }

    /// An admin of `account_id` stores credentials for the provider they are for.
    pub async fn put_credentials(&self, account_id: &str, credentials: Credentials) {
        let provider = match &credentials {
            Credentials::Twilio(_) => pb::Provider::Twilio,
            Credentials::MetaWhatsapp(_) => pb::Provider::MetaWhatsapp,
            Credentials::GoogleRbm(_) => pb::Provider::GoogleRbm,
            Credentials::Fcm(_) => pb::Provider::Fcm,
            Credentials::Apns(_) => pb::Provider::Apns,
            Credentials::Sandbox(_) => pb::Provider::Sandbox,
        };
        self.gateway()
            .await
            .put_provider_credentials(authed(
                pb::PutProviderCredentialsRequest {
                    account_id: account_id.to_owned(),
                    provider: provider as i32,
                    credentials: Some(credentials),
                },
                &token(AuthRole::Admin, Some(account_id)),
            ))
            .await
            .unwrap_or_else(|s| panic!("{} credentials stored: {s}", provider.as_str_name()));
    }

    /// An admin rewrites `onboard`'s "billing" configuration (still routing to billing-agents)
    /// with `changes`: its channels, messages and channel settings.
    pub async fn reconfigure_billing(&self, account_id: &str, changes: pb::HandoffConfig) {
        self.config()
            .await
            .update_handoff_config(authed(
                pb::UpdateHandoffConfigRequest {
                    account_id: account_id.to_owned(),
                    config: Some(pb::HandoffConfig {
                        handoff_config_id: "billing".into(),
                        name: "Billing queue".into(),
                        skill_id: "billing-agents".into(),
                        version: 1,
                        ..changes
                    }),
                },
                &token(AuthRole::Admin, Some(account_id)),
            ))
            .await
            .expect("configuration updated");
    }
}

impl Story {
    /// Whether a backend of this story's database waits on a lock while running a statement
    /// that contains `sql`.
    pub async fn waits_on_a_lock(&self, sql: &str) -> bool {
        let mut conn = self.db.connect().await;
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
        )
        .bind(sql)
        .fetch_one(&mut conn)
        .await
        .expect("reads pg_stat_activity")
            > 0
    }

    /// The value of one series (`name` or `name{labels}`, as `/metrics` prints it), if it has one
    /// (a counter without labels has one from the start, at 0).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().await.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("a number"))
        })
    }

    /// `GET /metrics` on the first server (the whole process in the Dev topology).
    pub async fn metrics(&self) -> String {
        let url = format!("{}/metrics", self.servers[0].endpoint());
        let response = reqwest::get(&url).await.expect("metrics answered");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        response.text().await.expect("text")
    }
}

impl Story {
    /// How many events of `stage` (e.g. `FUNNEL_STAGE_ANSWERED`) `account_id`'s SMS funnel counts.
    pub async fn sms_stage(&self, account_id: &str, stage: &str) -> u64 {
        funnel(self, account_id)
            .await
            .get("CHANNEL_SMS")
            .and_then(|stages| stages.get(stage).copied())
            .unwrap_or(0)
    }
}

impl Story {
    /// Waits (10 s at most) until `account_id`'s funnel by channel is exactly `expected`:
    /// each channel with each stage's count.
    pub async fn await_funnel(&self, account_id: &str, expected: &[(&str, &[(&str, u64)])]) {
        let expected: BTreeMap<String, BTreeMap<String, u64>> = expected
            .iter()
            .map(|(channel, stages)| {
                let stages = stages.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect();
                ((*channel).to_owned(), stages)
            })
            .collect();
        c2m_test_support::eventually_eq(
            &format!("{account_id}'s funnel"),
            Duration::from_secs(10),
            &expected,
            || funnel(self, account_id),
        )
        .await;
    }
}

impl Story {
    /// An admin of `account_id` creates `config`, routing to billing-agents unless it names a
    /// skill.
    pub async fn add_config(&self, account_id: &str, config: pb::HandoffConfig) {
        let skill_id = if config.skill_id.is_empty() {
            "billing-agents".to_owned()
        } else {
            config.skill_id.clone()
        };
        self.config()
            .await
            .create_handoff_config(authed(
                pb::CreateHandoffConfigRequest {
                    account_id: account_id.to_owned(),
                    config: Some(pb::HandoffConfig { skill_id, ..config }),
                },
                &token(AuthRole::Admin, Some(account_id)),
            ))
            .await
            .expect("configuration created");
    }
}
