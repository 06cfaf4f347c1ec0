//! Metrics for operators: a process-wide registry of counters, gauges and histograms with labels,
//! served in Prometheus' text exposition format at `GET /metrics` on every server's port (HTTP/1.1
//! is accepted beside gRPC). Small on purpose: the few figures an operator alerts on, no
//! dependency.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Mutex, OnceLock},
    time::Duration,
};

/// Histogram buckets, in seconds: from a millisecond to five seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug)]
struct Family {
    help: &'static str,
    kind: Kind,
    series: BTreeMap<Labels, Series>,
}

#[derive(Debug, Clone, Default)]
struct Series {
    /// The counter's or gauge's value; the histogram's sum.
    value: f64,
    /// Histogram: observations at or under each bucket, and in all.
    buckets: [u64; BUCKETS.len()],
    count: u64,
}

fn registry() -> &'static Mutex<BTreeMap<&'static str, Family>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<&'static str, Family>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

fn with_series(
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &[(&'static str, &str)],
    update: impl FnOnce(&mut Series),
) {
    let mut families = registry().lock().unwrap_or_else(|p| p.into_inner());
    let family = families.entry(name).or_insert_with(|| Family {
        help,
        kind,
        series: BTreeMap::new(),
    });
    let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    update(family.series.entry(labels).or_default());
}

/// Adds one to a counter.
pub fn inc(name: &'static str, help: &'static str, labels: &[(&'static str, &str)]) {
    with_series(name, help, Kind::Counter, labels, |s| s.value += 1.0);
}

/// Sets a gauge.
pub fn set(name: &'static str, help: &'static str, labels: &[(&'static str, &str)], value: f64) {
    with_series(name, help, Kind::Gauge, labels, |s| s.value = value);
}

/// `c2m_redis_degraded{service}`: 1 while `service` works without Redis, else 0.
pub fn redis_degraded(service: &'static str, yes: bool) {
    set(
        "c2m_redis_degraded",
        "1 while the service works without Redis (per-replica limits and leases), else 0.",
        &[("service", service)],
        if yes { 1.0 } else { 0.0 },
    );
}

/// Records one observation in a histogram (seconds).
pub fn observe(
    name: &'static str,
    help: &'static str,
    labels: &[(&'static str, &str)],
    took: Duration,
) {
    let seconds = took.as_secs_f64();
    with_series(name, help, Kind::Histogram, labels, |s| {
        s.value += seconds;
        s.count += 1;
        for (bucket, bound) in s.buckets.iter_mut().zip(BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    });
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_text(labels: &Labels, extra: Option<(&str, String)>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Every metric in the text exposition format (version 0.0.4).
pub fn render() -> String {
    let families = registry().lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for (name, family) in families.iter() {
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}", family.help);
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, series) in &family.series {
            if family.kind != Kind::Histogram {
                let _ = writeln!(out, "{name}{} {}", label_text(labels, None), series.value);
                continue;
            }
            for (bound, count) in BUCKETS.iter().zip(series.buckets) {
                let le = Some(("le", bound.to_string()));
                let _ = writeln!(out, "{name}_bucket{} {count}", label_text(labels, le));
            }
            let inf = Some(("le", "+Inf".to_owned()));
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                label_text(labels, inf),
                series.count
            );
            let _ = writeln!(
                out,
                "{name}_sum{} {}",
                label_text(labels, None),
                series.value
            );
            let _ = writeln!(
                out,
                "{name}_count{} {}",
                label_text(labels, None),
                series.count
            );
        }
    }
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
                    "text/plain; version=0.0.4; charset=utf-8",
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
        inc("t_requests_total", "Requests.", &[("status", "ok")]);
        inc("t_requests_total", "Requests.", &[("status", "ok")]);
        inc("t_requests_total", "Requests.", &[("status", "a\"b")]);
        set("t_degraded", "Degraded.", &[], 1.0);
        observe(
            "t_seconds",
            "Latency.",
            &[("rpc", "x")],
            Duration::from_millis(3),
        );
        let text = render();
        assert!(text.contains("# TYPE t_requests_total counter\n"), "{text}");
        assert!(
            text.contains("t_requests_total{status=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_requests_total{status=\"a\\\"b\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("t_degraded 1\n"), "{text}");
        assert!(
            text.contains("t_seconds_bucket{rpc=\"x\",le=\"0.0025\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{rpc=\"x\",le=\"0.005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{rpc=\"x\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("t_seconds_count{rpc=\"x\"} 1\n"), "{text}");
    }
}
