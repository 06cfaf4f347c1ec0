//! The gRPC server every role runs: the role's services plus health (per service, tied to their
//! dependencies) and reflection (v1 and v1alpha), behind timeouts, a concurrency limit and a
//! tracing layer, shut down gracefully.

use std::{convert::Infallible, future::Future, sync::Arc};

use futures::future::BoxFuture;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    server::NamedService,
    service::RoutesBuilder,
    transport::{Server, server::TcpIncoming},
};
use tower::{Service, limit::GlobalConcurrencyLimitLayer};

use crate::{
    health::{HealthEntry, Probe, Supervisor},
    settings::ServerSettings,
    trace_layer::TraceLayer,
};

/// What every server hosts besides its components, as reflection lists them.
const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

type AddRoutes = Box<dyn FnOnce(&mut RoutesBuilder) + Send>;
type Task = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// One gRPC service a server hosts, with the dependencies its health depends on and the
/// background work it needs (outbox relays, webhook listeners).
pub struct Component {
    name: &'static str,
    probes: Vec<Arc<dyn Probe>>,
    optional: Vec<Arc<dyn Probe>>,
    add: AddRoutes,
    tasks: Vec<Task>,
    http: Vec<axum::Router>,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component")
            .field("name", &self.name)
            .field(
                "probes",
                &self.probes.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Component {
    /// Wraps a tonic service; its health is the fully-qualified name the client asks for.
    pub fn new<S>(service: S) -> Self
    where
        S: Service<http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        Self {
            name: S::NAME,
            probes: Vec::new(),
            optional: Vec::new(),
            add: Box::new(move |routes| {
                routes.add_service(service);
            }),
            tasks: Vec::new(),
            http: Vec::new(),
        }
    }

    /// Plain HTTP routes (REST, documents) served on the same port as gRPC, for clients that
    /// cannot speak gRPC. Their paths must not look like gRPC paths (`/package.Service/Method`).
    pub fn with_http(mut self, router: axum::Router) -> Self {
        self.http.push(router);
        self
    }

    /// Runs `task` for as long as the server does: it starts before the server accepts requests
    /// and is cancelled only after in-flight requests have drained.
    pub fn with_task<F, Fut>(mut self, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks
            .push(Box::new(move |token| Box::pin(task(token))));
        self
    }

    /// The service is SERVING only while `probe` passes.
    pub fn with_probe(mut self, probe: Arc<dyn Probe>) -> Self {
        self.probes.push(probe);
        self
    }

    /// A dependency the service keeps serving without, in a degraded mode: its health is
    /// reported as `<service>/<probe name>` (e.g. `c2m.v1.HandoffService/redis`) and leaves the
    /// service's own status alone.
    pub fn with_optional_probe(mut self, probe: Arc<dyn Probe>) -> Self {
        self.optional.push(probe);
        self
    }

    /// The fully-qualified gRPC service name, e.g. `c2m.v1.HandoffService`.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot read the listener's address: {0}")]
    Listener(#[from] std::io::Error),
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Serves `components` on `listener` until `shutdown` is cancelled, then: every service NOT_SERVING,
/// wait `drain_delay`, stop accepting, let in-flight requests finish within the grace period.
/// Returns `Ok` after a clean drain and after a drain cut short by the grace period alike.
pub async fn run(
    listener: TcpListener,
    components: Vec<Component>,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();

    let names: Vec<&'static str> = components.iter().map(|c| c.name).collect();
    let mut routes = RoutesBuilder::default();
    let mut services = Vec::with_capacity(components.len());
    let background = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut http = Vec::new();
    for component in components {
        (component.add)(&mut routes);
        http.extend(component.http);
        services.push(HealthEntry {
            name: component.name.to_owned(),
            probes: component.probes,
            counts_for_server: true,
        });
        for probe in component.optional {
            services.push(HealthEntry {
                name: format!("{}/{}", component.name, probe.name()),
                probes: vec![probe],
                counts_for_server: false,
            });
        }
        for task in component.tasks {
            tasks.push(tokio::spawn(task(background.clone())));
        }
    }
    routes
        .add_service(health_service)
        .add_service(reflection(&names).build_v1()?)
        .add_service(reflection(&names).build_v1alpha()?);

    let supervisor = Supervisor::new(reporter, services);
    supervisor.start().await;
    let probes = tokio::spawn(
        supervisor
            .clone()
            .run(settings.health_interval(), shutdown.clone()),
    );

    let drain_delay = settings.drain_delay();
    let signal = {
        let shutdown = shutdown.clone();
        let supervisor = supervisor.clone();
        async move {
            shutdown.cancelled().await;
            supervisor.stop().await;
            tokio::time::sleep(drain_delay).await;
            tracing::info!(%addr, "draining in-flight requests");
        }
    };
    let mut router = routes
        .routes()
        .into_axum_router()
        .merge(crate::metrics::router());
    for extra in http {
        router = router.merge(extra);
    }
    let server = Server::builder()
        .accept_http1(true)
        .timeout(settings.request_timeout())
        .layer(TraceLayer)
        .layer(GlobalConcurrencyLimitLayer::new(settings.concurrency_limit))
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);

    tracing::info!(%addr, services = ?names, "serving");
    let grace = drain_delay + settings.grace_period();
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(%addr, grace_secs = grace.as_secs_f64(), "grace period over, closing remaining connections");
            Ok(())
        }
    };
    // A server that failed on its own must still stop its probes and tasks.
    shutdown.cancel();
    background.cancel();
    let _ = probes.await;
    for task in tasks {
        let _ = task.await;
    }
    if result.is_ok() {
        tracing::info!(%addr, "stopped");
    }
    result
}

/// Reflection lists exactly what this server hosts: its services, health and reflection itself.
fn reflection(names: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    names.iter().chain(&STANDARD_SERVICES).fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(c2m_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(*name),
    )
}
