//! What a stock gRPC client sees: health checks and reflection listings.

use std::time::Duration;

use c2m_test_support::eventually;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

pub const ALL_SERVICES: [&str; 5] = [
    "c2m.v1.HandoffService",
    "c2m.v1.RoutingService",
    "c2m.v1.ChannelGatewayService",
    "c2m.v1.ConfigService",
    "c2m.v1.ReportingService",
];

pub async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_owned())
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {endpoint}: {e}"))
}

/// The health of `service` (`""` for the whole server).
pub async fn health(channel: &Channel, service: &str) -> ServingStatus {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?} failed: {e}"));
    ServingStatus::try_from(response.into_inner().status).expect("a known status")
}

pub async fn wait_for_status(channel: &Channel, services: &[&str], status: ServingStatus) {
    for service in services {
        eventually(
            &format!("{service} to be {status:?}"),
            Duration::from_secs(15),
            || async { health(channel, service).await == status },
        )
        .await;
    }
}

/// The services a reflection version lists, sorted: the same request in v1 and v1alpha.
macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use $version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = ServerReflectionClient::new($channel.clone())
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect(concat!("reflection ", stringify!($version), " answers"))
            .into_inner();
        let response = responses
            .next()
            .await
            .expect("one response")
            .expect("not an error");
        match response.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                names.sort();
                names
            }
            other => panic!("expected a service list, got {other:?}"),
        }
    }};
}

/// The services listed by reflection v1, sorted.
pub async fn reflection_v1(channel: &Channel) -> Vec<String> {
    list_services!(v1, channel)
}

/// The services listed by reflection v1alpha (what older grpcurl builds ask), sorted.
pub async fn reflection_v1alpha(channel: &Channel) -> Vec<String> {
    list_services!(v1alpha, channel)
}

/// Whether reflection can describe `symbol` (a service or message), as grpcurl `describe` does.
pub async fn reflection_describes(channel: &Channel, symbol: &str) -> bool {
    use v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_owned())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::once(request))
        .await
        .expect("reflection v1 answers")
        .into_inner();
    let response = responses
        .next()
        .await
        .expect("one response")
        .expect("not an error");
    matches!(
        response.message_response,
        Some(MessageResponse::FileDescriptorResponse(files)) if !files.file_descriptor_proto.is_empty()
    )
}

/// `names` plus what every server adds (health, reflection v1 and v1alpha), sorted.
/// What the routing role hosts besides `c2m.v1.RoutingService`: the agents' API.
pub const CONVERSATION_SERVICE: &str = "c2m.v1.ConversationService";

/// The services `names` stand for, as reflection lists them beside health and reflection: the
/// routing role's two, the others' one each.
pub fn with_standard_services(names: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    if names.contains(&"c2m.v1.RoutingService") {
        all.push(CONVERSATION_SERVICE.to_owned());
    }
    all.extend(
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
        .map(String::from),
    );
    all.sort();
    all
}
