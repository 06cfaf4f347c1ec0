//! Handoff stages and conversation events posted to brands' webhook endpoints: every delivery
//! verified by an implementation of Standard Webhooks that is not ours; a receiver that is down
//! for a while gets everything afterwards, in order, under the same ids; one that never answers
//! holds up nobody else and is disabled once it has failed for too long; secrets rotate; only
//! admins manage them.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use c2m_config::webhooks::WebhookSettings;
use c2m_proto::v1 as pb;
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::{eventually, eventually_eq};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    conversations::{CONSUMER, assign, close, deflect_and_reply, next, reply, send, watch},
    story::{Options, Story, Topology, agent, authed, onboard, token},
};

/// How a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    /// 503 to everything.
    Failing,
    /// Never answers.
    Hanging,
}

/// One delivery a receiver verified: its `webhook-id`, its payload's `type`, the conversation
/// event's cursor (empty for other types), and the payload's `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    id: String,
    kind: String,
    cursor: String,
    data: serde_json::Value,
}

#[derive(Clone)]
struct Receiver {
    secret: Arc<Mutex<Option<String>>>,
    mode: Arc<Mutex<Mode>>,
    taken: Arc<Mutex<Vec<Received>>>,
    /// Deliveries whose signature did not verify.
    forged: Arc<Mutex<usize>>,
    url: String,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::http::StatusCode {
    let mode = *r.mode.lock().expect("mode");
    match mode {
        Mode::Up => {}
        Mode::Failing => return axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Mode::Hanging => std::future::pending::<()>().await,
    }
    let secret = r.secret.lock().expect("secret").clone().expect("a secret");
    let verifier = standardwebhooks::Webhook::new(&secret).expect("a whsec_ secret");
    if verifier.verify(&body, &headers).is_err() {
        *r.forged.lock().expect("forged") += 1;
        return axum::http::StatusCode::UNAUTHORIZED;
    }
    let payload: serde_json::Value = serde_json::from_slice(&body).expect("json");
    r.taken.lock().expect("taken").push(Received {
        id: headers["webhook-id"].to_str().expect("ascii").to_owned(),
        kind: payload["type"].as_str().expect("a type").to_owned(),
        cursor: payload["data"]["cursor"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        data: payload["data"].clone(),
    });
    axum::http::StatusCode::NO_CONTENT
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("binds");
        let receiver = Self {
            secret: Arc::default(),
            mode: Arc::new(Mutex::new(Mode::Up)),
            taken: Arc::default(),
            forged: Arc::default(),
            url: format!("http://{}/hooks/c2m", listener.local_addr().expect("addr")),
        };
        let app = Router::new()
            .route("/hooks/c2m", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("mode") = mode;
    }

    fn taken(&self) -> Vec<Received> {
        self.taken.lock().expect("taken").clone()
    }

    /// What it took of the types starting with `prefix`.
    fn taken_of(&self, prefix: &str) -> Vec<Received> {
        self.taken()
            .into_iter()
            .filter(|r| r.kind.starts_with(prefix))
            .collect()
    }
}

async fn create_endpoint(story: &Story, receiver: &Receiver, description: &str) -> String {
    create_endpoint_for(story, receiver, description, &[]).await
}

/// An endpoint for `event_types` (empty: all).
async fn create_endpoint_for(
    story: &Story,
    receiver: &Receiver,
    description: &str,
    event_types: &[&str],
) -> String {
    let created = story
        .config()
        .await
        .create_webhook_endpoint(authed(
            pb::CreateWebhookEndpointRequest {
                account_id: "acme".into(),
                endpoint: Some(pb::WebhookEndpoint {
                    url: receiver.url.clone(),
                    description: description.into(),
                    event_types: event_types.iter().map(|t| (*t).to_owned()).collect(),
                    ..Default::default()
                }),
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("an admin creates an endpoint")
        .into_inner();
    assert!(created.secret.starts_with("whsec_"));
    *receiver.secret.lock().expect("secret") = Some(created.secret);
    created.endpoint.expect("endpoint").webhook_endpoint_id
}

async fn endpoint(story: &Story, id: &str) -> pb::WebhookEndpoint {
    story
        .config()
        .await
        .get_webhook_endpoint(authed(
            pb::GetWebhookEndpointRequest {
                account_id: "acme".into(),
                webhook_endpoint_id: id.into(),
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("endpoint")
        .into_inner()
        .endpoint
        .expect("endpoint")
}

async fn deliveries(story: &Story, id: &str) -> Vec<pb::WebhookDelivery> {
    story
        .config()
        .await
        .list_webhook_deliveries(authed(
            pb::ListWebhookDeliveriesRequest {
                account_id: "acme".into(),
                webhook_endpoint_id: id.into(),
                page_size: 100,
                page_token: String::new(),
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("deliveries")
        .into_inner()
        .deliveries
}

#[tokio::test]
async fn every_conversation_event_reaches_the_endpoint_signed_in_order_through_an_outage() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            webhooks: Some(WebhookSettings {
                timeout_ms: 1_000,
                retry_base_ms: 20,
                retry_max_ms: 200,
                disable_after_hours: 72,
            }),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let (desk, stuck) = (Receiver::start().await, Receiver::start().await);
    let desk_id = create_endpoint(&story, &desk, "the brand's desk").await;
    stuck.set(Mode::Hanging);
    let stuck_id = create_endpoint(&story, &stuck, "a receiver that never answers").await;

    // An admin tries the endpoint out.
    let tried = story
        .config()
        .await
        .send_test_webhook(authed(
            pb::SendTestWebhookRequest {
                account_id: "acme".into(),
                webhook_endpoint_id: desk_id.clone(),
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("tested")
        .into_inner()
        .delivery
        .expect("delivery");
    assert!(tried.succeeded, "{tried:?}");
    assert_eq!(tried.http_status, 204);
    assert_eq!(desk.taken()[0].kind, "webhook.test");

    // What an agent's stream shows is what the desk must get.
    let ada = agent("acme", "agent-ada", &[]);
    let mut stream = watch(&story, &ada, "").await;
    deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let opened = next(&mut stream).await;
    let id = opened.conversation_id.clone();
    assign(&story, &ada, &id).await.expect("claimed");
    send(&story, &ada, reply(&id, "m-1", "Hello"))
        .await
        .expect("sent");
    let mut events = vec![opened];
    for _ in 0..3 {
        events.push(next(&mut stream).await);
    }
    let expected = |events: &[pb::ConversationEvent]| -> Vec<(String, String)> {
        events
            .iter()
            .map(|e| (format!("evt_{}", e.cursor), e.cursor.clone()))
            .collect()
    };
    let received = |receiver: &Receiver| -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = Vec::new();
        for r in receiver.taken_of("conversation.") {
            // A repeat (a replica stopped between posting and saving) must keep its id.
            if let Some(earlier) = seen.iter().find(|(_, cursor)| *cursor == r.cursor) {
                assert_eq!(earlier.0, r.id, "one event, one id");
                continue;
            }
            seen.push((r.id, r.cursor));
        }
        seen
    };
    eventually_eq(
        "the desk has every event so far",
        Duration::from_secs(10),
        &expected(&events),
        || async { received(&desk) },
    )
    .await;
    let kinds: Vec<String> = desk
        .taken_of("conversation.")
        .iter()
        .map(|r| r.kind.clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "conversation.opened",
            "conversation.assigned",
            "conversation.message",
            "conversation.message_stage"
        ]
    );

    // The desk goes down; the conversation goes on.
    desk.set(Mode::Failing);
    send(&story, &ada, reply(&id, "m-2", "Still there?"))
        .await
        .expect("sent");
    for _ in 0..2 {
        events.push(next(&mut stream).await);
    }
    eventually(
        "the desk's endpoint failing",
        Duration::from_secs(10),
        || async { endpoint(&story, &desk_id).await.failing_since.is_some() },
    )
    .await;
    eventually(
        "several failed attempts",
        Duration::from_secs(10),
        || async {
            deliveries(&story, &desk_id)
                .await
                .iter()
                .filter(|d| !d.succeeded && d.http_status == 503)
                .count()
                >= 3
        },
    )
    .await;
    close(&story, &ada, &id, "resolved").await;
    events.push(next(&mut stream).await);

    // Back up: everything arrives, in order, once each under its own id.
    desk.set(Mode::Up);
    eventually_eq(
        "the desk has caught up",
        Duration::from_secs(10),
        &expected(&events),
        || async { received(&desk) },
    )
    .await;
    eventually(
        "the endpoint healthy again",
        Duration::from_secs(10),
        || async { endpoint(&story, &desk_id).await.failing_since.is_none() },
    )
    .await;
    assert_eq!(
        *desk.forged.lock().expect("forged"),
        0,
        "every delivery verified"
    );

    // The receiver that never answers got nothing, held up nobody, and is still retried.
    assert!(stuck.taken().is_empty());
    let stuck_attempts = deliveries(&story, &stuck_id).await;
    assert!(
        stuck_attempts
            .iter()
            .all(|d| !d.succeeded && d.error == "no answer in time")
    );
    // Failing for more than three days: the next failure disables it, saying why.
    let mut db = story.db.connect().await;
    sqlx::query(
        "UPDATE config.webhook_endpoints SET failing_since = now() - interval '73 hours' \
         WHERE webhook_endpoint_id = $1",
    )
    .bind(&stuck_id)
    .execute(&mut db)
    .await
    .expect("three days of failures");
    eventually(
        "the stuck endpoint disabled",
        Duration::from_secs(10),
        || async {
            endpoint(&story, &stuck_id).await.state == pb::WebhookEndpointState::Disabled as i32
        },
    )
    .await;
    let disabled = endpoint(&story, &stuck_id).await;
    assert!(
        disabled
            .disabled_reason
            .starts_with("deliveries failed since"),
        "{}",
        disabled.disabled_reason
    );
    story.stop().await;
}

/// The handoff stages Reporting recorded for the account, in its log's order, as the desk should
/// get them: (webhook-id, type, handoff id).
async fn handoff_stages(story: &Story) -> Vec<(String, String, String)> {
    let mut stages = Vec::new();
    let mut after = 0;
    loop {
        let page = story
            .reporting()
            .await
            .list_events(authed(
                pb::ListEventsRequest {
                    account_id: "acme".into(),
                    after_position: after,
                    since: None,
                    page_size: 3,
                },
                &token(AuthRole::Viewer, Some("acme")),
            ))
            .await
            .expect("a viewer reads the log")
            .into_inner();
        if page.events.is_empty() {
            return stages;
        }
        after = page.last_position;
        for logged in page.events {
            let event = logged.event.expect("event");
            let kind = match pb::FunnelStage::try_from(event.stage).expect("a stage") {
                pb::FunnelStage::Attempted => "handoff.attempted",
                pb::FunnelStage::Sent => "handoff.sent",
                pb::FunnelStage::Delivered => "handoff.delivered",
                pb::FunnelStage::Read => "handoff.read",
                pb::FunnelStage::Failed => "handoff.failed",
                pb::FunnelStage::Responded => "handoff.responded",
                pb::FunnelStage::SkippedOpenConversation => "handoff.skipped_open_conversation",
                _ => continue,
            };
            stages.push((event.event_id, kind.to_owned(), event.handoff_id));
        }
    }
}

/// What a receiver took of the handoff types, each once (a repeat must keep its id).
fn handoff_deliveries(receiver: &Receiver) -> Vec<(String, String, String)> {
    let mut seen: Vec<(String, String, String)> = Vec::new();
    for r in receiver.taken_of("handoff.") {
        assert_eq!(
            r.data["eventId"].as_str(),
            Some(r.id.as_str()),
            "the webhook-id is Reporting's event id"
        );
        let delivery = (
            r.id,
            r.kind,
            r.data["handoffId"].as_str().unwrap_or_default().to_owned(),
        );
        if !seen.contains(&delivery) {
            seen.push(delivery);
        }
    }
    seen
}

#[tokio::test]
async fn every_handoff_stage_reaches_the_endpoint_signed_in_the_logs_order_through_an_outage() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            webhooks: Some(WebhookSettings {
                timeout_ms: 1_000,
                retry_base_ms: 20,
                retry_max_ms: 200,
                disable_after_hours: 72,
            }),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let (crm, inbox) = (Receiver::start().await, Receiver::start().await);
    let crm_id = create_endpoint_for(
        &story,
        &crm,
        "the brand's CRM",
        &[
            "handoff.attempted",
            "handoff.sent",
            "handoff.delivered",
            "handoff.read",
            "handoff.failed",
            "handoff.responded",
            "handoff.skipped_open_conversation",
        ],
    )
    .await;
    create_endpoint_for(&story, &inbox, "an inbox", &["conversation.opened"]).await;

    let first = deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let handoff_of_first = story
        .conversations()
        .await
        .get_conversation(authed(
            pb::GetConversationRequest {
                account_id: "acme".into(),
                conversation_id: first.clone(),
            },
            &token(AuthRole::Viewer, Some("acme")),
        ))
        .await
        .expect("the conversation")
        .into_inner()
        .conversation
        .expect("conversation")
        .handoff_id;
    let kinds_of = |handoff: &str| -> Vec<String> {
        handoff_deliveries(&crm)
            .into_iter()
            .filter(|(_, _, h)| h == handoff)
            .map(|(_, kind, _)| kind)
            .collect()
    };
    // Handoff's events (attempted, sent) and the reply's reach Reporting's log through different
    // outboxes, so the reply may be logged, and delivered, before the send: wait for all three.
    eventually(
        "the CRM has the first handoff's stages up to the reply",
        Duration::from_secs(10),
        || async {
            let kinds = kinds_of(&handoff_of_first);
            ["handoff.attempted", "handoff.sent", "handoff.responded"]
                .iter()
                .all(|stage| kinds.contains(&(*stage).to_owned()))
        },
    )
    .await;

    // The CRM goes down; a second caller is deflected, and the first calls again while their
    // conversation is open.
    crm.set(Mode::Failing);
    let second = story
        .deflect(
            crate::story::handoff_request("acme", "+14155550302", "call-2"),
            &key,
        )
        .await;
    let skipped = story
        .deflect(
            crate::story::handoff_request("acme", CONSUMER, "call-3"),
            &key,
        )
        .await;
    assert_eq!(
        skipped.status,
        pb::HandoffStatus::SkippedOpenConversation as i32
    );
    eventually(
        "the CRM's endpoint failing",
        Duration::from_secs(10),
        || async { endpoint(&story, &crm_id).await.failing_since.is_some() },
    )
    .await;

    // Back up: every stage Reporting recorded, in its log's order, once each under its event id.
    crm.set(Mode::Up);
    eventually(
        "the CRM has every stage of the three handoffs",
        Duration::from_secs(10),
        || async {
            let recorded = handoff_stages(&story).await;
            [&second.handoff_id, &skipped.handoff_id]
                .iter()
                .all(|h| recorded.iter().any(|(_, _, of)| of == *h))
                && handoff_deliveries(&crm) == recorded
        },
    )
    .await;
    assert!(
        kinds_of(&skipped.handoff_id).contains(&"handoff.skipped_open_conversation".to_owned())
    );
    assert_eq!(
        *crm.forged.lock().expect("forged"),
        0,
        "every delivery verified"
    );
    assert!(
        crm.taken_of("conversation.").is_empty(),
        "the CRM subscribed to handoffs only"
    );
    eventually(
        "the endpoint healthy again",
        Duration::from_secs(10),
        || async { endpoint(&story, &crm_id).await.failing_since.is_none() },
    )
    .await;
    // The inbox subscribed to openings only.
    let inbox_kinds: Vec<String> = inbox.taken().into_iter().map(|r| r.kind).collect();
    assert_eq!(inbox_kinds, ["conversation.opened"]);
    story.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_signs_new_deliveries_and_only_admins_manage_endpoints() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let desk = Receiver::start().await;
    let id = create_endpoint(&story, &desk, "desk").await;
    let admin = token(AuthRole::Admin, Some("acme"));
    let rotated = story
        .config()
        .await
        .rotate_webhook_secret(authed(
            pb::RotateWebhookSecretRequest {
                account_id: "acme".into(),
                webhook_endpoint_id: id.clone(),
            },
            &admin,
        ))
        .await
        .expect("rotated")
        .into_inner()
        .secret;
    let old = desk.secret.lock().expect("secret").replace(rotated);
    assert_ne!(
        old.as_deref(),
        desk.secret.lock().expect("secret").as_deref()
    );
    let tried = story
        .config()
        .await
        .send_test_webhook(authed(
            pb::SendTestWebhookRequest {
                account_id: "acme".into(),
                webhook_endpoint_id: id.clone(),
            },
            &admin,
        ))
        .await
        .expect("tested")
        .into_inner()
        .delivery
        .expect("delivery");
    assert!(tried.succeeded, "the new secret verifies: {tried:?}");

    let create = |credential: String, url: &str, event_types: Vec<String>| {
        let request = authed(
            pb::CreateWebhookEndpointRequest {
                account_id: "acme".into(),
                endpoint: Some(pb::WebhookEndpoint {
                    url: url.into(),
                    event_types,
                    ..Default::default()
                }),
            },
            &credential,
        );
        let story = &story;
        async move { story.config().await.create_webhook_endpoint(request).await }
    };
    for credential in [
        token(AuthRole::Editor, Some("acme")),
        token(AuthRole::Admin, Some("globex")),
        agent("acme", "agent-ada", &[]),
    ] {
        let refused = create(credential, &desk.url, Vec::new())
            .await
            .expect_err("admins only");
        assert_eq!(refused.code(), Code::PermissionDenied);
    }
    let field = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument);
        status
            .get_details_bad_request()
            .expect("fields")
            .field_violations[0]
            .field
            .clone()
    };
    let plain = create(admin.clone(), "http://desk.example.com/hooks", Vec::new()).await;
    assert_eq!(field(plain.expect_err("https only")), "endpoint.url");
    let unknown = create(admin.clone(), &desk.url, vec!["handoff.exploded".into()]).await;
    assert_eq!(
        field(unknown.expect_err("no such type")),
        "endpoint.event_types[0]"
    );
    story.stop().await;
}

/// On separate servers Config follows Routing's stream over the network, where a call to a peer
/// may take `peers.timeout_ms`: the stream outlives that timeout, and later events still reach the
/// desk.
#[tokio::test]
async fn the_webhook_stream_outlives_the_peer_timeout_on_separate_servers() {
    let story = Story::start_with(
        Topology::Separate,
        Options {
            peer_timeout_ms: Some(1_000),
            provider_timeout_ms: Some(500),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let desk = Receiver::start().await;
    create_endpoint(&story, &desk, "desk").await;
    let kinds = || -> Vec<String> { desk.taken().into_iter().map(|r| r.kind).collect() };
    let id = deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    eventually("the opening posted", Duration::from_secs(10), || async {
        kinds().contains(&"conversation.opened".to_owned())
    })
    .await;
    // Time passes with the stream open, beyond the peers' timeout: that is what is tested.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assign(&story, &agent("acme", "agent-ada", &[]), &id)
        .await
        .expect("claimed");
    eventually("the claim posted", Duration::from_secs(10), || async {
        kinds().contains(&"conversation.assigned".to_owned())
    })
    .await;
    story.stop().await;
}
