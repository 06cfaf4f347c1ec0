//! Readiness as named components. Each gRPC service is SERVING only while every probe it depends on
//! passes (its PostgreSQL schema, Redis); it starts NOT_SERVING and returns to NOT_SERVING on
//! shutdown, before the server stops accepting work.

use std::{collections::HashMap, future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// What a probe's check returns: `Err` carries a short reason for logs.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// One dependency a service needs before it can serve, checked periodically.
pub trait Probe: Send + Sync + 'static {
    /// A stable name for logs, e.g. `postgres:handoff` or `redis`.
    fn name(&self) -> &str;
    /// Checks the dependency once. Must not take longer than the dependency's own timeouts.
    fn check(&self) -> ProbeFuture<'_>;
}

/// A name health checks answer for, with the probes it depends on.
pub struct HealthEntry {
    /// A gRPC service name, or `<service>/<dependency>` for a dependency the service can do
    /// without (reported, but not part of the service's own status).
    pub name: String,
    pub probes: Vec<Arc<dyn Probe>>,
    /// Whether the whole server (`""`) is SERVING only while this entry is.
    pub counts_for_server: bool,
}

/// The health of every service one server hosts, kept current by [`Supervisor::run`].
#[derive(Clone)]
pub struct Supervisor {
    reporter: HealthReporter,
    services: Arc<Vec<HealthEntry>>,
    state: Arc<tokio::sync::Mutex<Reported>>,
}

/// What has been reported, so that watchers only hear of changes.
#[derive(Default)]
struct Reported {
    /// Set once by [`Supervisor::stop`]; checked under the lock by every status update, so a probe
    /// round that finishes after shutdown began cannot flip a service back to SERVING.
    stopped: bool,
    statuses: HashMap<String, ServingStatus>,
    /// Whether "ready" was logged: once, the first time every service is SERVING.
    announced: bool,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field(
                "services",
                &self
                    .services
                    .iter()
                    .map(|entry| &entry.name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Supervisor {
    pub fn new(reporter: HealthReporter, services: Vec<HealthEntry>) -> Self {
        Self {
            reporter,
            services: Arc::new(services),
            state: Arc::default(),
        }
    }

    /// Marks every service, and the server as a whole (`""`), NOT_SERVING until the first probe
    /// round says otherwise.
    pub async fn start(&self) {
        for entry in self.services.iter() {
            self.set(&entry.name, false).await;
        }
        self.set("", false).await;
    }

    /// Marks every service, and the server as a whole (`""`), NOT_SERVING for good.
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        state.stopped = true;
        for entry in self.services.iter() {
            self.reporter
                .set_service_status(&entry.name, ServingStatus::NotServing)
                .await;
        }
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Probes every `interval` until `shutdown`, updating each service's status. Logs a probe
    /// only when its result changes, so a dead dependency does not flood the logs.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        let mut last: HashMap<String, bool> = HashMap::new();
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let mut all_serving = true;
            for entry in self.services.iter() {
                let mut serving = true;
                for probe in &entry.probes {
                    let ok = self.check(probe.as_ref(), &mut last).await;
                    serving &= ok;
                }
                if entry.counts_for_server {
                    all_serving &= serving;
                }
                self.set(&entry.name, serving).await;
            }
            self.set("", all_serving).await;
        }
    }

    async fn set(&self, service: &str, serving: bool) {
        let mut state = self.state.lock().await;
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if state.stopped || state.statuses.get(service) == Some(&status) {
            return;
        }
        state.statuses.insert(service.to_owned(), status);
        self.reporter.set_service_status(service, status).await;
        if service.is_empty() && serving && !state.announced {
            state.announced = true;
            let services: Vec<&str> = self
                .services
                .iter()
                .filter(|e| e.counts_for_server)
                .map(|e| e.name.as_str())
                .collect();
            tracing::info!(?services, "ready: every service is SERVING");
        }
    }

    async fn check(&self, probe: &dyn Probe, last: &mut HashMap<String, bool>) -> bool {
        let result = probe.check().await;
        let ok = result.is_ok();
        let previous = last.insert(probe.name().to_owned(), ok);
        match (previous, result) {
            (Some(false) | None, Ok(())) => {
                tracing::info!(probe = probe.name(), "dependency ready")
            }
            (Some(true) | None, Err(reason)) => {
                tracing::warn!(probe = probe.name(), %reason, "dependency not ready")
            }
            _ => {}
        }
        ok
    }
}
