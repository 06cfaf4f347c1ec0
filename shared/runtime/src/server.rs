//! The gRPC server every role runs: the role's services plus health (per service, tied to their
//! dependencies) and reflection (v1 and v1alpha), behind timeouts, a concurrency limit and a
//! tracing layer, shut down gracefully.

use std::{convert::Infallible, future::Future, sync::Arc};
use tracing::Instrument;

use futures::future::BoxFuture;

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{
    body::Body,
    server::NamedService,
    service::RoutesBuilder,
    transport::{Server, server::TcpIncoming},
};
use tower::{Service, limit::GlobalConcurrencyLimitLayer};

use crate::{
    health::{HealthEntry, Probe, Supervisor},
    rpc_metrics::RpcMetricsLayer,
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
    detached: Vec<TaskTracker>,
    draining: Vec<CancellationToken>,
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
            detached: Vec::new(),
            draining: Vec::new(),
        }
    }

    /// `token` is cancelled when the server stops taking requests, after health has said
    /// NOT_SERVING for the drain delay: long-lived streams end on it, so that their clients
    /// reconnect elsewhere instead of being cut off at the end of the grace period.
    pub fn with_draining(mut self, token: CancellationToken) -> Self {
        self.draining.push(token);
        self
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

    /// Work the service spawns on `tracker` that outlives the request that started it (a handoff
    /// whose IVR stopped waiting, a record PostgreSQL refused): a shutdown lets it finish, as it
    /// does in-flight requests, within the same grace period.
    pub fn with_detached(mut self, tracker: TaskTracker) -> Self {
        self.detached.push(tracker);
        self
    }

    /// The service is SERVING only while `probe` passes.
    pub fn with_probe(mut self, probe: Arc<dyn Probe>) -> Self {
        self.probes.push(probe);
        self
    }

    /// A dependency the service keeps serving without, in a degraded mode: its health is
    /// reported as `<service>/<probe name>` (e.g. `c2m.v1.HandoffService/redis`) and leaves the
    /// service's own status alone. `None`: a dependency that cannot be unreachable (one in this
    /// process).
    pub fn with_optional_probe(mut self, probe: impl Into<Option<Arc<dyn Probe>>>) -> Self {
        self.optional.extend(probe.into());
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
    let mut detached = Vec::new();
    let mut draining = Vec::new();
    for component in components {
        (component.add)(&mut routes);
        http.extend(component.http);
        detached.extend(component.detached);
        draining.extend(component.draining);
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
            .run(settings.health_interval(), shutdown.clone())
            .instrument(tracing::info_span!("health", %addr)),
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
            for token in &draining {
                token.cancel();
            }
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
        .layer(RpcMetricsLayer)
        .layer(GlobalConcurrencyLimitLayer::new(settings.concurrency_limit))
        .add_routes(tonic::service::Routes::from(router))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), signal);

    tracing::info!(%addr, services = ?names, "serving");
    let grace = drain_delay + settings.grace_period();
    let grace_over = CancellationToken::new();
    let timer = {
        let (shutdown, grace_over) = (shutdown.clone(), grace_over.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            grace_over.cancel();
        })
    };
    let result = tokio::select! {
        result = server => result.map_err(ServeError::from),
        _ = grace_over.cancelled() => {
            tracing::warn!(%addr, grace_secs = grace.as_secs_f64(), "grace period over, closing remaining connections");
            Ok(())
        }
    };
    // A server that failed on its own must still stop its probes and tasks.
    shutdown.cancel();
    // Work that outlived its request ends too, within what is left of the grace period: cut off
    // by the exit, a handoff that sent its message would go unrecorded.
    for tracker in &detached {
        tracker.close();
    }
    tokio::select! {
        _ = async { for tracker in &detached { tracker.wait().await } } => {}
        _ = grace_over.cancelled() => {
            let left: usize = detached.iter().map(TaskTracker::len).sum();
            tracing::warn!(%addr, left, "grace period over, detached work cut short");
        }
    }
    timer.abort();
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
            .register_encoded_file_descriptor_set(c2m_proto::ERROR_DETAILS_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
        |builder, name| builder.with_service_name(*name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        task::{Context, Poll},
        time::Duration,
    };

    /// A gRPC service with no methods: a server to host.
    #[derive(Clone)]
    struct Empty;

    impl NamedService for Empty {
        const NAME: &'static str = "c2m.test.Empty";
    }

    impl Service<http::Request<Body>> for Empty {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(Ok(http::Response::new(Body::empty())))
        }
    }

    /// A server hosting `Empty` with `detached` work, and the token that shuts it down.
    async fn serve(
        detached: TaskTracker,
        grace_period_secs: u64,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), ServeError>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let settings = ServerSettings {
            grace_period_secs,
            ..ServerSettings::default()
        };
        let shutdown = CancellationToken::new();
        let component = Component::new(Empty).with_detached(detached);
        let stop = shutdown.clone();
        let server =
            tokio::spawn(async move { run(listener, vec![component], &settings, stop).await });
        (shutdown, server)
    }

    #[tokio::test]
    async fn a_shutdown_lets_detached_work_finish() {
        let detached = TaskTracker::new();
        let release = Arc::new(tokio::sync::Notify::new());
        let finished = Arc::new(AtomicBool::new(false));
        detached.spawn({
            let (release, finished) = (release.clone(), finished.clone());
            async move {
                release.notified().await;
                finished.store(true, Ordering::SeqCst);
            }
        });
        let (shutdown, mut server) = serve(detached, 20).await;
        shutdown.cancel();
        // Nothing is in flight, so the server has drained at once; it still waits for the work.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut server)
                .await
                .is_err(),
            "stopped with detached work running"
        );
        release.notify_one();
        server.await.expect("joins").expect("stops cleanly");
        assert!(finished.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn detached_work_is_cut_short_when_the_grace_period_ends() {
        let detached = TaskTracker::new();
        detached.spawn(std::future::pending::<()>());
        let (shutdown, server) = serve(detached, 1).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stops within the grace period")
            .expect("joins")
            .expect("stops cleanly");
    }
}
