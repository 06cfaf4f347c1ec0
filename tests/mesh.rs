//! The mesh booted in-process on ephemeral ports, seen through a stock gRPC client: health per
//! service tied to real PostgreSQL and Redis, reflection, migrations, graceful shutdown.

use std::{net::SocketAddr, time::Duration};

use crate::grpc::{ALL_SERVICES, channel, health, wait_for_status, with_standard_services};
use c2m::{Config, Role, app};
use c2m_runtime::ServerSettings;
use c2m_test_support::{RedisServer, TestDatabase, TestRedis, free_port};
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

fn config(db: &TestDatabase, redis: &TestRedis) -> Config {
    let mut config = Config {
        database: db.settings(),
        redis: redis.settings(),
        server: ServerSettings {
            health_interval_ms: 50,
            grace_period_secs: 5,
            ..ServerSettings::default()
        },
        ..Config::default()
    };
    config.auth.token_secret = crate::story::SECRET.to_owned();
    config.channel_gateway.credentials_key =
        "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=".to_owned();
    config.listen.webhooks = ANY_PORT;
    config
}

#[tokio::test]
async fn dev_serves_all_five_services_and_reflection_lists_them() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let mesh = app::spawn(ANY_PORT, &Role::ALL, config(&db, &redis))
        .await
        .expect("binds");
    let channel = channel(&mesh.endpoint()).await;

    wait_for_status(&channel, &ALL_SERVICES, ServingStatus::Serving).await;
    let conversations = [crate::grpc::CONVERSATION_SERVICE];
    wait_for_status(&channel, &conversations, ServingStatus::Serving).await;
    assert_eq!(health(&channel, "").await, ServingStatus::Serving);

    assert_eq!(
        crate::grpc::reflection_v1(&channel).await,
        with_standard_services(&ALL_SERVICES)
    );
    assert_eq!(
        crate::grpc::reflection_v1alpha(&channel).await,
        with_standard_services(&ALL_SERVICES)
    );
    for symbol in [
        "c2m.v1.HandoffService",
        "c2m.v1.CreateHandoffRequest",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        // The details statuses carry, so reflection clients print them as fields.
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
        "google.rpc.ErrorInfo",
    ] {
        assert!(
            crate::grpc::reflection_describes(&channel, symbol).await,
            "reflection cannot describe {symbol}"
        );
    }
    mesh.stop().await.expect("drains cleanly");
}

#[tokio::test]
async fn each_role_serves_alone_and_lists_only_itself() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let mut servers = Vec::new();
    for (role, name) in Role::ALL.into_iter().zip(ALL_SERVICES) {
        let server = app::spawn(ANY_PORT, &[role], config(&db, &redis))
            .await
            .expect("binds");
        servers.push((server, name));
    }
    for (server, name) in &servers {
        let channel = channel(&server.endpoint()).await;
        wait_for_status(&channel, &[name], ServingStatus::Serving).await;
        assert_eq!(
            crate::grpc::reflection_v1(&channel).await,
            with_standard_services(&[name]),
        );
        // A role does not answer for the others.
        let other = ALL_SERVICES
            .iter()
            .find(|s| *s != name)
            .expect("five services");
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: (*other).to_owned(),
            })
            .await
            .expect_err("health of a service this server does not host");
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    for (server, _) in servers {
        server.stop().await.expect("drains cleanly");
    }
}

#[tokio::test]
async fn services_keep_serving_without_redis_and_report_it() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let port = free_port();
    let mut config = config(&db, &redis);
    config.redis.url = format!("redis://127.0.0.1:{port}");
    let mesh = app::spawn(ANY_PORT, &Role::ALL, config)
        .await
        .expect("binds");
    let channel = channel(&mesh.endpoint()).await;

    // Handoff and Routing serve on (degraded) without Redis; its absence is reported on its own.
    let redis_health = ["c2m.v1.HandoffService/redis", "c2m.v1.RoutingService/redis"];
    wait_for_status(&channel, &ALL_SERVICES, ServingStatus::Serving).await;
    wait_for_status(&channel, &[""], ServingStatus::Serving).await;
    wait_for_status(&channel, &redis_health, ServingStatus::NotServing).await;

    let redis_server = RedisServer::start_on(port);
    wait_for_status(&channel, &redis_health, ServingStatus::Serving).await;

    redis_server.stop();
    wait_for_status(&channel, &redis_health, ServingStatus::NotServing).await;
    for service in ALL_SERVICES.iter().chain(&[""]) {
        assert_eq!(
            health(&channel, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    mesh.stop().await.expect("drains cleanly");
}

#[tokio::test]
async fn without_migrate_on_start_a_service_waits_for_c2m_migrate() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let mut config = config(&db, &redis);
    config.database.migrate_on_start = false;
    let server = app::spawn(ANY_PORT, &[Role::Reporting], config.clone())
        .await
        .expect("binds");
    let channel = channel(&server.endpoint()).await;

    // Several probe rounds (50 ms apart) go by without it becoming ready...
    for _ in 0..5 {
        assert_eq!(
            health(&channel, "c2m.v1.ReportingService").await,
            ServingStatus::NotServing
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...until the operator migrates.
    app::migrate(&[Role::Reporting], &config)
        .await
        .expect("migrates");
    wait_for_status(
        &channel,
        &["c2m.v1.ReportingService"],
        ServingStatus::Serving,
    )
    .await;
    server.stop().await.expect("drains cleanly");
}

#[tokio::test]
async fn migrations_give_each_service_its_own_schema_and_rerun_cleanly() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let config = config(&db, &redis);
    app::migrate(&Role::ALL, &config).await.expect("first run");
    app::migrate(&Role::ALL, &config)
        .await
        .expect("second run is a no-op");

    let mut conn = db.connect().await;
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema') \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut conn)
    .await
    .expect("lists tables");
    let in_schema = |schema: &str| -> Vec<&str> {
        tables
            .iter()
            .filter(|(s, _)| s == schema)
            .map(|(_, t)| t.as_str())
            .collect()
    };
    assert_eq!(
        in_schema("handoff"),
        [
            "_sqlx_migrations",
            "consumer_leases",
            "deflection_outbox",
            "fallbacks",
            "handoffs",
            "idempotency_keys",
            "outbox",
            "outbox_dead_letters"
        ]
    );
    assert_eq!(
        in_schema("routing"),
        [
            "_sqlx_migrations",
            "consent_changes",
            "conversation_events",
            "conversation_log_heads",
            "conversations",
            "deflections",
            "opt_outs",
            "outbox",
            "outbox_dead_letters",
            "transcript_entries"
        ]
    );
    assert_eq!(
        in_schema("channel_gateway"),
        [
            "_sqlx_migrations",
            "conversation_outbox",
            "devices",
            "number_lookups",
            "outbound_messages",
            "outbox",
            "outbox_dead_letters",
            "provider_credentials",
            "webhook_inbox",
            "whatsapp_windows"
        ]
    );
    assert_eq!(
        in_schema("config"),
        [
            "_sqlx_migrations",
            "accounts",
            "api_keys",
            "audit_events",
            "handoff_configs",
            "webhook_deliveries",
            "webhook_endpoints",
            "whatsapp_templates"
        ]
    );
    assert_eq!(
        in_schema("reporting"),
        [
            "_sqlx_migrations",
            "event_log_heads",
            "event_months",
            "events",
            "events_before_partitions",
            "events_default",
            "funnel_days",
            "funnel_zones"
        ]
    );
    assert!(
        in_schema("public").is_empty(),
        "nothing lands in public: {tables:?}"
    );
}

#[tokio::test]
async fn shutdown_reports_not_serving_before_it_drains() {
    let (db, redis) = (TestDatabase::create().await, TestRedis::new().await);
    let mut config = config(&db, &redis);
    config.server.grace_period_secs = 1;
    let mesh = app::spawn(ANY_PORT, &Role::ALL, config)
        .await
        .expect("binds");
    let channel = channel(&mesh.endpoint()).await;
    wait_for_status(&channel, &["c2m.v1.HandoffService"], ServingStatus::Serving).await;

    // A load balancer watching the service...
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: "c2m.v1.HandoffService".to_owned(),
        })
        .await
        .expect("watch starts")
        .into_inner();
    let first = watch
        .next()
        .await
        .expect("an update")
        .expect("not an error");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    // ...is told NOT_SERVING once shutdown begins, while the server is still draining (the
    // watch stream is itself an in-flight request, cut only by the grace period).
    let stopping = tokio::spawn(mesh.stop());
    let next = watch
        .next()
        .await
        .expect("an update")
        .expect("not an error");
    assert_eq!(next.status, ServingStatus::NotServing as i32);

    stopping
        .await
        .expect("stop task")
        .expect("stops cleanly after the grace period");
}
