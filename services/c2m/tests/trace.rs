//! One handoff is one trace: from the IVR's call through every service it reaches to the
//! provider's HTTP API, exported over OTLP by a real `c2m dev`.

mod support;

use std::time::Duration;

use c2m_proto::v1::{HandoffStatus, handoff_service_client::HandoffServiceClient};
use c2m_test_support::{TestDatabase, TestRedis, TwilioEmulator};
use support::{
    acme::{authed, environment, onboard_on, request},
    dev::{Dev, Mesh},
    otlp,
};
use tonic::transport::Channel;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace the IVR's call below is made in, and the span it is made from.
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const IVR_SPAN: &str = "b7ad6b7169203331";

/// One handoff asked for inside the IVR's trace, on `handoff` with Acme onboarded through
/// `config` and `gateway`; what Twilio was told of the trace.
async fn traced_handoff(
    handoff: &Channel,
    config: &Channel,
    gateway: &Channel,
    twilio: &TwilioEmulator,
) -> String {
    let api_key = onboard_on(config, gateway, twilio).await;
    let mut call = authed(request("+14155550900", "traced-1"), &api_key);
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{IVR_SPAN}-01")
            .parse()
            .expect("ascii"),
    );
    let handoff = HandoffServiceClient::new(handoff.clone())
        .create_handoff(call)
        .await
        .expect("handoff")
        .into_inner()
        .handoff
        .expect("a handoff");
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    let sent = twilio.sent();
    assert_eq!(sent.len(), 1);
    let carried = sent[0]
        .traceparent
        .clone()
        .expect("twilio got a traceparent");
    assert_eq!(carried.split('-').nth(1), Some(TRACE_ID), "{carried}");
    carried
}

/// The exported spans hold the whole handoff in the IVR's trace, one tree under the IVR's span,
/// down to the provider call whose span Twilio was told of (`carried`).
async fn assert_one_trace(collector: &otlp::Collector, carried: &str) {
    let spans: Vec<_> = collector
        .spans()
        .await
        .into_iter()
        .filter(|s| hex(&s.trace_id) == TRACE_ID)
        .collect();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "c2m.v1.HandoffService/CreateHandoff",
        "c2m.v1.ConfigService/GetHandoffConfig",
        "c2m.v1.RoutingService/CheckConsumer",
        "c2m.v1.ChannelGatewayService/SendMessage",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not in the trace: {names:?}"
        );
    }
    let provider = spans
        .iter()
        .find(|s| s.name.starts_with("POST "))
        .unwrap_or_else(|| panic!("no provider call in the trace: {names:?}"));
    assert_eq!(
        carried.split('-').nth(2),
        Some(hex(&provider.span_id).as_str())
    );
    let ids: Vec<String> = spans.iter().map(|s| hex(&s.span_id)).collect();
    for span in &spans {
        let parent = hex(&span.parent_span_id);
        assert!(
            parent == IVR_SPAN || ids.contains(&parent),
            "{} has a parent outside the trace",
            span.name
        );
    }
}

fn traced_environment(
    twilio: &TwilioEmulator,
    collector: &otlp::Collector,
) -> Vec<(&'static str, String)> {
    let mut env = environment(twilio);
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.clone()));
    env
}

/// `c2m dev`: the services call each other in process, each call a span as over the network.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_is_one_trace_from_the_ivr_to_the_provider_in_one_process() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let collector = otlp::Collector::start().await;
    let env = traced_environment(&twilio, &collector);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut dev = Dev::start(&db, &redis, &env).await;
    let channel = dev.until_serving().await;
    let carried = traced_handoff(&channel, &channel, &channel, &twilio).await;
    // Shutdown flushes the exporter.
    dev.sigterm();
    assert_eq!(dev.exit_code(Duration::from_secs(10)).await, Some(0));
    assert_one_trace(&collector, &carried).await;
}

/// Five processes: the trace context crosses the network with every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_is_one_trace_from_the_ivr_to_the_provider_across_processes() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let collector = otlp::Collector::start().await;
    let mut mesh = Mesh::start(&db, &redis, traced_environment(&twilio, &collector)).await;
    let c = mesh.channels.clone();
    let carried = traced_handoff(&c[0], &c[3], &c[2], &twilio).await;
    mesh.stop(Duration::from_secs(10)).await;
    assert_one_trace(&collector, &carried).await;
}
