//! Clients for calling the other c2m services, authenticated as this service.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use c2m_proto::v1::{
    channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient,
    conversation_service_client::ConversationServiceClient,
    handoff_service_client::HandoffServiceClient, reporting_service_client::ReportingServiceClient,
    routing_service_client::RoutingServiceClient,
};
use serde::{Deserialize, Serialize};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Endpoint,
};
use tower::{ServiceExt, util::BoxCloneSyncService};

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

/// An `authorization` header and when it was minted.
type Minted = Option<(MetadataValue<Ascii>, Instant)>;

/// Adds this service's token to every outgoing call, minting one a minute rather than one a call,
/// and the caller's trace context, so the callee's span continues its trace.
#[derive(Debug, Clone)]
pub struct ServiceAuth {
    key: TokenKey,
    name: &'static str,
    minted: Arc<Mutex<Minted>>,
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
        crate::trace_layer::inject_metadata(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// Adds a person's own credential to every call, in place of this service's: what the console
/// does for the signed-in user, so the callee checks that user's account and role.
#[derive(Debug, Clone)]
pub struct OnBehalf {
    header: MetadataValue<Ascii>,
}

impl Interceptor for OnBehalf {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        crate::trace_layer::inject_metadata(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// A peer client that calls as a person (see [`Peers::reporting_for`]).
pub type AsUser = InterceptedService<PeerService, OnBehalf>;

/// A call to a peer that ended without its answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Reaching a peer over the network failed, or took longer than `peers.timeout_ms`.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
    /// An in-process peer took longer than `peers.timeout_ms`: `CANCELLED`, as a network
    /// peer's timeout is.
    #[error("{0}")]
    Timeout(#[source] tonic::TimeoutExpired),
}

/// How a peer is reached: a gRPC channel over the network, or the peer's own tonic service when
/// it runs in this process (`c2m dev`, or several roles on one server). Either way the request is
/// the same protobuf with the same service token, and the peer checks it the same way.
pub type PeerService = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    PeerError,
>;

pub type Authed = InterceptedService<PeerService, ServiceAuth>;

/// The peers that run in this process, filled in once they are built; shared by every service's
/// [`Peers`], so each calls the others directly instead of through its own network listener.
/// A call waits for its answer at most as long as a call over the network would.
#[derive(Clone)]
pub struct LocalPeers {
    services: Arc<[OnceLock<PeerService>; 5]>,
    timeout: Duration,
}

impl std::fmt::Debug for LocalPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let here: Vec<usize> = (0..5)
            .filter(|i| self.services[*i].get().is_some())
            .collect();
        f.debug_tuple("LocalPeers").field(&here).finish()
    }
}

/// Which peer a [`LocalPeers`] slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Handoff = 0,
    Routing = 1,
    ChannelGateway = 2,
    Config = 3,
    Reporting = 4,
}

impl LocalPeers {
    /// No peers yet; calls to the ones registered end after `timeout` without an answer.
    pub fn new(timeout: Duration) -> Self {
        Self {
            services: Arc::default(),
            timeout,
        }
    }

    /// Serves calls to `peer` with `service`, a tonic server of this process. The first
    /// registration wins.
    pub fn register<S>(&self, peer: Peer, service: S)
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let timeout = self.timeout;
        // A span and the method's metrics per call, as the server gives a call that comes over
        // the network.
        let service = tower::ServiceBuilder::new()
            .layer(crate::trace_layer::TraceLayer)
            .layer(crate::rpc_metrics::RpcMetricsLayer)
            .service(service);
        let timed = tower::service_fn(move |request| {
            let call = service.clone().oneshot(request);
            async move {
                match tokio::time::timeout(timeout, call).await {
                    Ok(answer) => answer.map_err(|never| match never {}),
                    Err(_) => Err(PeerError::Timeout(tonic::TimeoutExpired(()))),
                }
            }
        });
        let _ = self.services[peer as usize].set(BoxCloneSyncService::new(timed));
    }
}

/// Lazily connected channels to every peer.
#[derive(Debug, Clone)]
pub struct Peers {
    remote: [PeerService; 5],
    local: LocalPeers,
    auth: ServiceAuth,
    /// `peers.timeout_ms`: how long a call to a peer may take.
    timeout: Duration,
}

impl Peers {
    /// Fails only on a malformed URL; connections are made on first use.
    pub fn new(
        settings: &PeerSettings,
        key: TokenKey,
        name: &'static str,
    ) -> Result<Self, tonic::transport::Error> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let lazy = |url: &str| -> Result<PeerService, tonic::transport::Error> {
            let channel = Endpoint::from_shared(url.to_owned())?
                .timeout(timeout)
                .connect_timeout(timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            Ok(BoxCloneSyncService::new(channel.map_err(PeerError::from)))
        };
        Ok(Self {
            remote: [
                lazy(&settings.handoff)?,
                lazy(&settings.routing)?,
                lazy(&settings.channel_gateway)?,
                lazy(&settings.config)?,
                lazy(&settings.reporting)?,
            ],
            local: LocalPeers::new(timeout),
            auth: ServiceAuth {
                key,
                name,
                minted: Arc::default(),
            },
            timeout,
        })
    }

    /// How long a call to a peer may take (`peers.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Calls the peers registered in `local` in process; the others over the network.
    pub fn with_local(mut self, local: LocalPeers) -> Self {
        self.local = local;
        self
    }

    fn service(&self, peer: Peer) -> PeerService {
        self.local.services[peer as usize]
            .get()
            .unwrap_or(&self.remote[peer as usize])
            .clone()
    }

    pub fn handoff(&self) -> HandoffServiceClient<Authed> {
        HandoffServiceClient::with_interceptor(self.service(Peer::Handoff), self.auth.clone())
    }

    pub fn routing(&self) -> RoutingServiceClient<Authed> {
        RoutingServiceClient::with_interceptor(self.service(Peer::Routing), self.auth.clone())
    }

    /// The agents' API, which the routing role serves beside `RoutingService`.
    pub fn conversations(&self) -> ConversationServiceClient<Authed> {
        ConversationServiceClient::with_interceptor(self.service(Peer::Routing), self.auth.clone())
    }

    pub fn channel_gateway(&self) -> ChannelGatewayServiceClient<Authed> {
        ChannelGatewayServiceClient::with_interceptor(
            self.service(Peer::ChannelGateway),
            self.auth.clone(),
        )
    }

    pub fn config(&self) -> ConfigServiceClient<Authed> {
        ConfigServiceClient::with_interceptor(self.service(Peer::Config), self.auth.clone())
    }

    pub fn reporting(&self) -> ReportingServiceClient<Authed> {
        ReportingServiceClient::with_interceptor(self.service(Peer::Reporting), self.auth.clone())
    }

    /// Reporting, called with `credential` (a person's token) rather than this service's.
    pub fn reporting_for(
        &self,
        credential: &str,
    ) -> Result<ReportingServiceClient<AsUser>, Status> {
        Ok(ReportingServiceClient::with_interceptor(
            self.service(Peer::Reporting),
            on_behalf(credential)?,
        ))
    }

    /// The agents' API, called with `credential`.
    pub fn conversations_for(
        &self,
        credential: &str,
    ) -> Result<ConversationServiceClient<AsUser>, Status> {
        Ok(ConversationServiceClient::with_interceptor(
            self.service(Peer::Routing),
            on_behalf(credential)?,
        ))
    }

    /// The channel gateway, called with `credential`.
    pub fn channel_gateway_for(
        &self,
        credential: &str,
    ) -> Result<ChannelGatewayServiceClient<AsUser>, Status> {
        Ok(ChannelGatewayServiceClient::with_interceptor(
            self.service(Peer::ChannelGateway),
            on_behalf(credential)?,
        ))
    }

    /// Handoff, called with `credential` (a person's token or an API key).
    pub fn handoff_for(&self, credential: &str) -> Result<HandoffServiceClient<AsUser>, Status> {
        Ok(HandoffServiceClient::with_interceptor(
            self.service(Peer::Handoff),
            on_behalf(credential)?,
        ))
    }
}

fn on_behalf(credential: &str) -> Result<OnBehalf, Status> {
    Ok(OnBehalf {
        header: format!("Bearer {credential}")
            .parse()
            .map_err(|_| Status::unauthenticated("a credential is ASCII"))?,
    })
}

#[cfg(test)]
mod tests {
    use c2m_proto::v1::CheckConsumerRequest;

    use super::*;

    #[tokio::test]
    async fn an_in_process_peer_that_does_not_answer_is_given_up_on_like_a_network_one() {
        let settings = PeerSettings {
            timeout_ms: 50,
            ..PeerSettings::default()
        };
        let local = LocalPeers::new(Duration::from_millis(settings.timeout_ms));
        // A Routing in this process that never answers.
        local.register(
            Peer::Routing,
            tower::service_fn(|_: http::Request<tonic::body::Body>| {
                std::future::pending::<
                    Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
                >()
            }),
        );
        let peers = Peers::new(&settings, TokenKey::new(b"peers test secret"), "handoff")
            .expect("peers")
            .with_local(local);
        let mut routing = peers.routing();
        let call = routing.check_consumer(CheckConsumerRequest::default());
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("the call ends on its own")
            .expect_err("no answer came");
        assert_eq!(status.code(), tonic::Code::Cancelled, "{status}");
    }
}
