//! `cargo bench -p c2m-e2e --bench fanout`: how long a consumer's message takes to reach the agents
//! and desks watching for it. 1,000 WatchConversations streams (an agent's token each, over ten
//! connections) and one webhook endpoint follow one account; a consumer's SMS reaches the gateway
//! as Twilio's signed webhook, one after another; each arrival is timed from the moment before
//! the webhook was posted. In the same run, as denominators: a bare tonic server streaming one
//! broadcast to as many streams (what gRPC fan-out alone costs here) and the bare unary echo
//! (how fast this machine is today). Prints figures; asserts nothing.
//!
//! Knobs (environment): C2M_BENCH_STREAMS (1000), C2M_BENCH_MESSAGES (200),
//! C2M_BENCH_TOPOLOGY (`dev`, or `separate`).

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[allow(dead_code)]
#[path = "cpu.rs"]
mod cpu;
#[allow(dead_code)]
#[path = "../grpc.rs"]
mod grpc;
#[allow(dead_code)]
#[path = "../story.rs"]
mod story;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use c2m_proto::v1::{
    self as pb,
    conversation_event::Kind,
    conversation_service_client::ConversationServiceClient,
    conversation_service_server::{ConversationService, ConversationServiceServer},
};
use cpu::Cpu;
use story::{Story, Topology, agent, authed, handoff_request, onboard, token};
use tokio::sync::broadcast;
use tonic::transport::Channel;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Arrivals: for each subscriber, (message number, when it arrived).
type Arrivals = Arc<Mutex<Vec<(usize, Instant)>>>;

/// The message number in a text `fanout-<n>`.
fn number(text: &str) -> Option<usize> {
    text.strip_prefix("fanout-")?.parse().ok()
}

/// Latencies of every arrival against when its message was sent, sorted, in ms.
fn latencies(sent: &[Instant], arrivals: &[(usize, Instant)]) -> Vec<f64> {
    let mut ms: Vec<f64> = arrivals
        .iter()
        .filter_map(|(n, at)| Some(at.duration_since(*sent.get(*n)?).as_secs_f64() * 1000.0))
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

fn at(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn summary(sorted: &[f64]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} arrivals)",
        at(sorted, 0.5),
        at(sorted, 0.99),
        at(sorted, 1.0),
        sorted.len()
    )
}

/// Opens `count` streams over ten connections to `endpoint`, each recording the messages it sees.
async fn watchers(endpoint: &str, count: usize, credential: &str) -> Vec<Arrivals> {
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(grpc::channel(endpoint).await);
    }
    let mut all = Vec::with_capacity(count);
    for i in 0..count {
        let mut client = ConversationServiceClient::new(channels[i % channels.len()].clone());
        let mut stream = client
            .watch_conversations(authed(
                pb::WatchConversationsRequest {
                    account_id: "acme".into(),
                    ..Default::default()
                },
                credential,
            ))
            .await
            .expect("watching")
            .into_inner();
        let arrivals: Arrivals = Arc::default();
        all.push(arrivals.clone());
        tokio::spawn(async move {
            while let Ok(Some(item)) = stream.message().await {
                let n = match item.event.and_then(|e| e.kind) {
                    Some(Kind::Message(entry)) => number(&entry.text),
                    Some(Kind::Opened(_)) => Some(usize::MAX),
                    _ => None,
                };
                if let Some(n) = n {
                    arrivals.lock().expect("arrivals").push((n, Instant::now()));
                }
            }
        });
    }
    all
}

/// Waits until every watcher has seen the conversation open (they are all live).
async fn all_live(watchers: &[Arrivals]) {
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let live = watchers
            .iter()
            .filter(|a| {
                a.lock()
                    .expect("arrivals")
                    .iter()
                    .any(|(n, _)| *n == usize::MAX)
            })
            .count();
        if live == watchers.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not every watcher saw the conversation open");
}

/// Waits (two minutes at most) until every one of `all` has message `last`.
async fn arrived(all: &[Arrivals], last: usize) {
    let until = Instant::now() + Duration::from_secs(120);
    let done = |a: &Arrivals| a.lock().expect("arrivals").iter().any(|(n, _)| *n == last);
    while Instant::now() < until && !all.iter().all(done) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver recording the messages it is posted.
async fn receiver() -> (String, Arrivals) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binds");
    let url = format!("http://{}/hooks", listener.local_addr().expect("addr"));
    let arrivals: Arrivals = Arc::default();
    let recorded = arrivals.clone();
    let app = axum::Router::new().route(
        "/hooks",
        axum::routing::post(move |body: axum::body::Bytes| {
            let recorded = recorded.clone();
            async move {
                let at = Instant::now();
                let payload: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Some(n) = payload["data"]["message"]["text"].as_str().and_then(number) {
                    recorded.lock().expect("arrivals").push((n, at));
                }
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, arrivals)
}

/// A conversation service that only fans one broadcast out to its watchers: gRPC streaming and
/// nothing else, no database, no log.
#[derive(Clone)]
struct Skeleton(broadcast::Sender<pb::ConversationEvent>);

#[tonic::async_trait]
impl ConversationService for Skeleton {
    async fn watch_conversations(
        &self,
        _request: tonic::Request<pb::WatchConversationsRequest>,
    ) -> Result<
        tonic::Response<
            std::pin::Pin<
                Box<
                    dyn futures::Stream<
                            Item = Result<pb::WatchConversationsResponse, tonic::Status>,
                        > + Send,
                >,
            >,
        >,
        tonic::Status,
    > {
        let mut events = self.0.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                let item = Ok(pb::WatchConversationsResponse { event: Some(event) });
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn message_event(text: String) -> pb::ConversationEvent {
    pb::ConversationEvent {
        kind: Some(Kind::Message(pb::TranscriptEntry {
            text,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The same fan-out against [`Skeleton`]: latencies from the broadcast to each watcher.
async fn skeleton(streams: usize, messages: usize) -> Vec<f64> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binds");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let (sender, _) = broadcast::channel(4096);
    let service = ConversationServiceServer::new(Skeleton(sender.clone()));
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("skeleton serves");
    });
    let watchers = watchers(&endpoint, streams, "none").await;
    sender
        .send(pb::ConversationEvent {
            kind: Some(Kind::Opened(pb::Conversation::default())),
            ..Default::default()
        })
        .expect("watchers");
    all_live(&watchers).await;
    let mut sent = Vec::with_capacity(messages);
    for n in 0..messages {
        sent.push(Instant::now());
        sender
            .send(message_event(format!("fanout-{n}")))
            .expect("watchers");
        // Paced like the mesh's messages, which wait for their webhook's answer.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    arrived(&watchers, messages - 1).await;
    let arrivals: Vec<(usize, Instant)> = watchers
        .iter()
        .flat_map(|a| a.lock().expect("arrivals").clone())
        .collect();
    server.abort();
    latencies(&sent, &arrivals)
}

/// Unary calls per second to a bare tonic server (64 callers, 5 s): today's machine speed.
async fn echo() -> f64 {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("binds");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let (_reporter, health) = tonic_health::server::health_reporter();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("echo serves");
    });
    let channel: Channel = grpc::channel(&endpoint).await;
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(5);
    let started = Instant::now();
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let calls = calls.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    client
                        .check(tonic_health::pb::HealthCheckRequest::default())
                        .await
                        .expect("echo");
                    calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    server.abort();
    calls.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let streams = knob("C2M_BENCH_STREAMS", 1000) as usize;
    let messages = knob("C2M_BENCH_MESSAGES", 200) as usize;
    let topology = if std::env::var("C2M_BENCH_TOPOLOGY").is_ok_and(|t| t == "separate") {
        Topology::Separate
    } else {
        Topology::Dev
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let story = Story::start(topology).await;
        let key = onboard(&story, "acme").await;
        let (url, desk) = receiver().await;
        story
            .config()
            .await
            .create_webhook_endpoint(authed(
                pb::CreateWebhookEndpointRequest {
                    account_id: "acme".into(),
                    endpoint: Some(pb::WebhookEndpoint {
                        url,
                        event_types: vec!["conversation.message".into()],
                        ..Default::default()
                    }),
                },
                &token(c2m_runtime::auth::Role::Admin, Some("acme")),
            ))
            .await
            .expect("webhook endpoint");
        let routing = story.peers().routing;
        let watchers = watchers(&routing, streams, &agent("acme", "bench", &[])).await;
        let consumer = "+14155550999";
        story
            .deflect(handoff_request("acme", consumer, "fanout"), &key)
            .await;
        story.sms_to_acme(consumer, "hello").await;
        all_live(&watchers).await;

        let before = Cpu::now();
        let started = Instant::now();
        let mut sent = Vec::with_capacity(messages);
        for n in 0..messages {
            sent.push(Instant::now());
            story.sms_to_acme(consumer, &format!("fanout-{n}")).await;
        }
        let sending = started.elapsed();
        // Everything in: every watcher and the desk have the last message.
        arrived(&watchers, messages - 1).await;
        arrived(std::slice::from_ref(&desk), messages - 1).await;
        let after = Cpu::now();
        let flowed = started.elapsed();
        let streamed: Vec<(usize, Instant)> = watchers
            .iter()
            .flat_map(|a| a.lock().expect("arrivals").clone())
            .filter(|(n, _)| *n != usize::MAX)
            .collect();
        let streamed = latencies(&sent, &streamed);
        let posted = latencies(&sent, &desk.lock().expect("arrivals").clone());
        story.stop().await;

        let bare = skeleton(streams, messages).await;
        let echo = echo().await;
        println!(
            "c2m fan-out benchmark ({topology:?}): {messages} consumer messages, one every {:.1} ms, to {streams} streams and one webhook endpoint",
            sending.as_secs_f64() * 1000.0 / messages as f64
        );
        println!("  inbound webhook -> stream:  {}", summary(&streamed));
        println!("  inbound webhook -> webhook: {}", summary(&posted));
        println!("  bare tonic fan-out, same streams: {}", summary(&bare));
        println!(
            "  ratio of p50s, c2m stream / bare fan-out: {:.1}",
            at(&streamed, 0.5) / at(&bare, 0.5)
        );
        println!("  bare unary echo this run: {echo:.0} calls/s");
        println!(
            "  cpu while messages flowed ({:.1} s): {:.2} s in this process, {:.2} s in postgres",
            flowed.as_secs_f64(),
            after.this - before.this,
            after.postgres - before.postgres
        );
    });
}
