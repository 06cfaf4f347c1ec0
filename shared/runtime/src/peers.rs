//! Clients for calling the other c2m services, authenticated as this service.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use c2m_proto::v1::{
    channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient, handoff_service_client::HandoffServiceClient,
    reporting_service_client::ReportingServiceClient, routing_service_client::RoutingServiceClient,
};
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use crate::auth::TokenKey;

/// `[peers]`: where each service is reached by the others. `c2m dev` points them all at itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeerSettings {
    pub handoff: String,
    pub routing: String,
    pub channel_gateway: String,
    pub config: String,
    pub reporting: String,
    /// Milliseconds a call to another service may take.
    pub timeout_ms: u64,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            handoff: "http://127.0.0.1:50051".into(),
            routing: "http://127.0.0.1:50052".into(),
            channel_gateway: "http://127.0.0.1:50053".into(),
            config: "http://127.0.0.1:50054".into(),
            reporting: "http://127.0.0.1:50055".into(),
            timeout_ms: 5_000,
        }
    }
}

impl PeerSettings {
    /// Every peer at one address (`c2m dev`).
    pub fn all_at(url: &str) -> Self {
        Self {
            handoff: url.into(),
            routing: url.into(),
            channel_gateway: url.into(),
            config: url.into(),
            reporting: url.into(),
            ..Self::default()
        }
    }
}

/// How long one minted service token is reused (it is valid for five minutes).
const TOKEN_REUSE: Duration = Duration::from_secs(60);

/// Adds this service's token to every outgoing call, minting one a minute rather than one a call.
#[derive(Debug, Clone)]
pub struct ServiceAuth {
    key: TokenKey,
    name: &'static str,
    minted: Arc<Mutex<Option<(MetadataValue<Ascii>, Instant)>>>,
}

impl ServiceAuth {
    fn header(&self) -> Result<MetadataValue<Ascii>, Status> {
        let mut minted = self.minted.lock().expect("token cache");
        if let Some((value, at)) = minted.as_ref()
            && at.elapsed() < TOKEN_REUSE
        {
            return Ok(value.clone());
        }
        let value: MetadataValue<Ascii> = format!("Bearer {}", self.key.service_token(self.name))
            .parse()
            .map_err(|_| Status::internal("service token is not ascii"))?;
        *minted = Some((value.clone(), Instant::now()));
        Ok(value)
    }
}

impl Interceptor for ServiceAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value = self.header()?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, ServiceAuth>;

/// Lazily connected channels to every peer.
#[derive(Debug, Clone)]
pub struct Peers {
    handoff: Channel,
    routing: Channel,
    channel_gateway: Channel,
    config: Channel,
    reporting: Channel,
    auth: ServiceAuth,
}

impl Peers {
    /// Fails only on a malformed URL; connections are made on first use.
    pub fn new(
        settings: &PeerSettings,
        key: TokenKey,
        name: &'static str,
    ) -> Result<Self, tonic::transport::Error> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let lazy = |url: &str| -> Result<Channel, tonic::transport::Error> {
            Ok(Endpoint::from_shared(url.to_owned())?
                .timeout(timeout)
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy())
        };
        Ok(Self {
            handoff: lazy(&settings.handoff)?,
            routing: lazy(&settings.routing)?,
            channel_gateway: lazy(&settings.channel_gateway)?,
            config: lazy(&settings.config)?,
            reporting: lazy(&settings.reporting)?,
            auth: ServiceAuth {
                key,
                name,
                minted: Arc::default(),
            },
        })
    }

    pub fn handoff(&self) -> HandoffServiceClient<Authed> {
        HandoffServiceClient::with_interceptor(self.handoff.clone(), self.auth.clone())
    }

    pub fn routing(&self) -> RoutingServiceClient<Authed> {
        RoutingServiceClient::with_interceptor(self.routing.clone(), self.auth.clone())
    }

    pub fn channel_gateway(&self) -> ChannelGatewayServiceClient<Authed> {
        ChannelGatewayServiceClient::with_interceptor(
            self.channel_gateway.clone(),
            self.auth.clone(),
        )
    }

    pub fn config(&self) -> ConfigServiceClient<Authed> {
        ConfigServiceClient::with_interceptor(self.config.clone(), self.auth.clone())
    }

    pub fn reporting(&self) -> ReportingServiceClient<Authed> {
        ReportingServiceClient::with_interceptor(self.reporting.clone(), self.auth.clone())
    }
}
