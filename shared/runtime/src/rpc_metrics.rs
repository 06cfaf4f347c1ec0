//! Rate, errors and duration of every gRPC method, recorded by one tower layer around each server
//! (and each in-process peer), not by handlers: `c2m_rpc_requests_total{service,method,code}` and
//! `c2m_rpc_duration_seconds{service,method}`.
//!
//! Only methods c2m serves are labelled by name (read from the descriptor set once); a request
//! for any other path is not counted, so no caller can add series. The code is the one in the
//! response headers, where tonic puts an error a handler returns; a call answered with data and
//! then an error in its trailers (a stream broken off) counts as `Ok`.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use tower::{Layer, Service};

use crate::metrics::{self, RpcLabels, RpcMethodLabels};

/// `/<service>/<method>` → its labels, for every method this binary serves.
static METHODS: LazyLock<HashMap<String, (&'static str, &'static str)>> = LazyLock::new(|| {
    let mut methods = HashMap::new();
    let mut add = |service: &str, method: &str| {
        // Leaked once per method at start: label values must live for the process.
        let labels: (&'static str, &'static str) = (
            Box::leak(service.to_owned().into_boxed_str()),
            Box::leak(method.to_owned().into_boxed_str()),
        );
        methods.insert(format!("/{service}/{method}"), labels);
    };
    for service in c2m_proto::DESCRIPTORS.services() {
        for method in service.methods() {
            add(service.full_name(), method.name());
        }
    }
    add("grpc.health.v1.Health", "Check");
    add("grpc.health.v1.Health", "Watch");
    for reflection in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        add(reflection, "ServerReflectionInfo");
    }
    methods
});

#[derive(Debug, Clone, Copy)]
pub(crate) struct RpcMetricsLayer;

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RpcMetrics<S> {
    inner: S,
}

type Boxed<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, R> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Boxed<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = METHODS.get(request.uri().path()).copied();
        let call = self.inner.call(request);
        let Some((service, method)) = method else {
            return Box::pin(call);
        };
        let started = Instant::now();
        Box::pin(async move {
            let answer = call.await;
            let code = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .map_or(tonic::Code::Ok, |v| tonic::Code::from_bytes(v.as_bytes())),
                Err(_) => tonic::Code::Unknown,
            };
            let m = metrics::metrics();
            m.rpc_requests
                .get_or_create(&RpcLabels {
                    service,
                    method,
                    code: metrics::code_name(code),
                })
                .inc();
            m.rpc_duration
                .get_or_create(&RpcMethodLabels { service, method })
                .observe(metrics::seconds(started.elapsed()));
            answer
        })
    }
}
