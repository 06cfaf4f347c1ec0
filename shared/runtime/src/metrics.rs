//! Metrics for operators, served in Prometheus' text format at `GET /metrics` on every server's
//! port (HTTP/1.1 is accepted beside gRPC).
//!
//! Every metric is declared once, here, with its name, help and label set ([`Metrics`]). Label
//! values are `&'static str` or enums: nothing a request or a provider sends can become a label
//! value, so each metric has as many series as its labels' values allow and no more.

use std::{sync::LazyLock, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Histogram buckets, in seconds: from a millisecond to five seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// `CreateHandoff`'s answer: a handoff status, or the gRPC code of a refusal.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    pub status: &'static str,
    pub channel: &'static str,
}

/// What became of a message handed to a provider.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SendResult {
    accepted,
    /// Refused: the provider's own code is on the message record and in the logs, not here.
    failed,
    /// No answer: the provider's reports settle it.
    unconfirmed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderSendLabels {
    pub channel: &'static str,
    pub outcome: SendResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboxLabels {
    pub outbox: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: &'static str,
}

/// One RPC method (`c2m.v1.HandoffService`, `CreateHandoff`), and the gRPC code it answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: &'static str,
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcMethodLabels {
    pub service: &'static str,
    pub method: &'static str,
}

/// Every metric c2m exports.
pub struct Metrics {
    /// `c2m_rpc_requests_total`: requests per method and code (rate, errors).
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// `c2m_rpc_duration_seconds`: how long each method took (duration).
    pub rpc_duration: Family<RpcMethodLabels, Histogram>,
    pub handoffs: Family<HandoffLabels, Counter>,
    pub handoff_duration: Histogram,
    /// Handoffs running now, counting those whose IVR stopped waiting.
    pub handoffs_in_progress: Gauge,
    pub handoff_save_retries: Counter,
    pub message_record_retries: Counter,
    pub provider_sends: Family<ProviderSendLabels, Counter>,
    pub outbox_flushes: Family<OutboxLabels, Counter>,
    pub outbox_dead_letters: Family<OutboxLabels, Counter>,
    pub webhooks_unavailable: Counter,
    pub redis_degraded: Family<ServiceLabels, Gauge>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let rpc_duration = Family::new_with_constructor(histogram as fn() -> Histogram);
        let mut m = Self {
            rpc_requests: Family::default(),
            rpc_duration,
            handoffs: Family::default(),
            handoff_duration: histogram(),
            handoffs_in_progress: Gauge::default(),
            handoff_save_retries: Counter::default(),
            message_record_retries: Counter::default(),
            provider_sends: Family::default(),
            outbox_flushes: Family::default(),
            outbox_dead_letters: Family::default(),
            webhooks_unavailable: Counter::default(),
            redis_degraded: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut m.registry;
        r.register(
            "c2m_rpc_requests",
            "gRPC requests served, by service, method and status code.",
            m.rpc_requests.clone(),
        );
        r.register(
            "c2m_rpc_duration_seconds",
            "How long gRPC requests took to answer, by service and method.",
            m.rpc_duration.clone(),
        );
        r.register(
            "c2m_handoffs",
            "CreateHandoff answers, by handoff status (or the gRPC code of a refusal) and channel.",
            m.handoffs.clone(),
        );
        r.register(
            "c2m_handoff_duration_seconds",
            "How long CreateHandoff took, the caller waiting on the line.",
            m.handoff_duration.clone(),
        );
        r.register(
            "c2m_handoffs_in_progress",
            "Handoffs this process is running, counting those whose IVR stopped waiting; \
             past handoff.max_in_progress a new one is refused (OVERLOADED).",
            m.handoffs_in_progress.clone(),
        );
        r.register(
            "c2m_handoff_save_retries",
            "Handoff saves PostgreSQL refused and that were offered again.",
            m.handoff_save_retries.clone(),
        );
        r.register(
            "c2m_message_record_retries",
            "Records of sent messages PostgreSQL refused, offered again.",
            m.message_record_retries.clone(),
        );
        r.register(
            "c2m_provider_sends",
            "Messages handed to a provider, by channel and outcome (accepted, failed, unconfirmed).",
            m.provider_sends.clone(),
        );
        r.register(
            "c2m_outbox_flushes",
            "Flushes of an outbox on demand (a reply that found no deflection, a check for a \
             pending Apple Messages invite), concurrent demands counted once.",
            m.outbox_flushes.clone(),
        );
        r.register(
            "c2m_outbox_dead_letters",
            "Outbox rows set aside because they can never be delivered (see outbox_dead_letters).",
            m.outbox_dead_letters.clone(),
        );
        r.register(
            "c2m_webhooks_unavailable",
            "Provider webhooks answered 503 (storage or Routing away); providers post them again.",
            m.webhooks_unavailable.clone(),
        );
        r.register(
            "c2m_redis_degraded",
            "1 while the service works without Redis (per-replica limits and leases), else 0.",
            m.redis_degraded.clone(),
        );
        m
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

/// `c2m_redis_degraded{service}`: 1 while `service` works without Redis, else 0.
pub fn redis_degraded(service: &'static str, yes: bool) {
    metrics()
        .redis_degraded
        .get_or_create(&ServiceLabels { service })
        .set(i64::from(yes));
}

/// A gRPC code's name (`ResourceExhausted`), for a label.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Seconds, as histograms take them.
pub fn seconds(took: Duration) -> f64 {
    took.as_secs_f64()
}

/// Every metric in the Prometheus text format (version 0.0.4).
pub fn render() -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &metrics().registry);
    out
}

/// `GET /metrics`.
pub fn router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )],
                render(),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_render_as_prometheus_reads_them() {
        // The registry is the process's: the series this test touches are its own.
        let m = metrics();
        let labels = OutboxLabels {
            outbox: "metrics_test_outbox",
        };
        m.outbox_dead_letters.get_or_create(&labels).inc();
        m.outbox_dead_letters.get_or_create(&labels).inc();
        redis_degraded("metrics-test", true);
        m.rpc_duration
            .get_or_create(&RpcMethodLabels {
                service: "metrics.Test",
                method: "Probe",
            })
            .observe(seconds(Duration::from_millis(3)));
        let text = render();
        assert!(
            text.contains("# TYPE c2m_outbox_dead_letters_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("c2m_outbox_dead_letters_total{outbox=\"metrics_test_outbox\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("c2m_redis_degraded{service=\"metrics-test\"} 1\n"),
            "{text}"
        );
        let bucket = |le: &str| {
            format!(
                "c2m_rpc_duration_seconds_bucket{{service=\"metrics.Test\",method=\"Probe\",le=\"{le}\"}}"
            )
        };
        assert!(
            text.contains(&format!("{} 0\n", bucket("0.0025"))),
            "{text}"
        );
        assert!(text.contains(&format!("{} 1\n", bucket("0.005"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", bucket("+Inf"))), "{text}");
    }
}
