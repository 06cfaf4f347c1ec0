//! Posting conversation events to brands' webhook endpoints. The dispatcher is a client of the
//! routing role's `WatchConversations`, the same durable stream a desk follows: each endpoint
//! keeps its position (the last cursor posted) in Config's schema, so nothing is lost across
//! restarts and an event is posted again, with the same `webhook-id`, only if a replica stopped
//! between the post and saving the position. One replica at a time delivers for an endpoint (a
//! lease renewed every second); each endpoint has its own task, so a slow or failing receiver
//! holds up nobody else's events. A failing delivery is retried, in order, with exponential
//! backoff and jitter, until it succeeds or the endpoint has failed for `disable_after_hours`
//! and is disabled.

pub(crate) mod post;

use std::{collections::HashMap, sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, conversation_event::Kind};
use c2m_runtime::peers::Peers;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{ConfigStore, LeasedWebhook};

/// `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookSettings {
    /// Milliseconds a receiver has to answer a delivery.
    pub timeout_ms: u64,
    /// The first retry's wait; each further one doubles it, up to `retry_max_ms`.
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Hours an endpoint may fail before it is disabled (72: three days).
    pub disable_after_hours: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            retry_base_ms: 5_000,
            retry_max_ms: 3_600_000,
            disable_after_hours: 72,
        }
    }
}

/// How long a replica's claim on an endpoint lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);
/// How often leases are renewed and endpoints picked up.
const RENEW: Duration = Duration::from_secs(1);
/// How long delivery attempts are kept for ListWebhookDeliveries.
const KEEP_DELIVERIES: Duration = Duration::from_secs(7 * 24 * 3600);

/// The `type` of an event's payload.
pub(crate) fn event_type(event: &pb::ConversationEvent) -> &'static str {
    match &event.kind {
        Some(Kind::Opened(_)) => "conversation.opened",
        Some(Kind::Message(_)) => "conversation.message",
        Some(Kind::MessageStage(_)) => "conversation.message_stage",
        Some(Kind::Assigned(_)) => "conversation.assigned",
        Some(Kind::Released(_)) => "conversation.released",
        Some(Kind::Transferred(_)) => "conversation.transferred",
        Some(Kind::Closed(_)) | None => "conversation.closed",
    }
}

/// The JSON posted: the type, when it happened, and the event as the gRPC API's JSON mapping
/// has it.
pub(crate) fn payload(event_type: &str, timestamp: String, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": event_type,
        "timestamp": timestamp,
        "data": data,
    }))
    .expect("json values serialize")
}

/// Delivers for the endpoints this replica holds.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    store: Arc<dyn ConfigStore>,
    peers: Peers,
    http: reqwest::Client,
    settings: WebhookSettings,
    /// This replica, as leases name it.
    owner: String,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn ConfigStore>,
        peers: Peers,
        http: reqwest::Client,
        settings: WebhookSettings,
    ) -> Self {
        Self {
            store,
            peers,
            http,
            settings,
            owner: c2m_runtime::ids::generate("cfg"),
        }
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Renews this replica's leases every [`RENEW`] and runs a task per endpoint it holds,
    /// starting one again when an admin changed the endpoint, until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut running: HashMap<String, (i64, CancellationToken)> = HashMap::new();
        let mut every = tokio::time::interval(RENEW);
        let mut pruned_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = every.tick() => {}
            }
            let held = match self.store.lease_webhooks(&self.owner, LEASE).await {
                Ok(held) => held,
                Err(error) => {
                    tracing::warn!(%error, "webhooks: cannot renew leases");
                    continue;
                }
            };
            // A task ends its token when it stops on its own; one whose endpoint changed, or is
            // no longer this replica's, is stopped. Both are started again if still held.
            running.retain(|id, (version, stop)| {
                let keep = !stop.is_cancelled()
                    && held
                        .iter()
                        .any(|h| &h.endpoint.id == id && h.version == *version);
                if !keep {
                    stop.cancel();
                }
                keep
            });
            for leased in held {
                if running.contains_key(&leased.endpoint.id) {
                    continue;
                }
                let stop = shutdown.child_token();
                running.insert(leased.endpoint.id.clone(), (leased.version, stop.clone()));
                let dispatcher = self.clone();
                tokio::spawn(async move {
                    dispatcher.deliver(leased, stop.clone()).await;
                    stop.cancel();
                });
            }
            if pruned_at.elapsed() > Duration::from_secs(3600) {
                pruned_at = tokio::time::Instant::now();
                if let Err(error) = self.store.prune_webhook_deliveries(KEEP_DELIVERIES).await {
                    tracing::warn!(%error, "webhooks: old deliveries not pruned");
                }
            }
        }
        for (_, (_, stop)) in running {
            stop.cancel();
        }
    }

    /// Follows the account's conversation stream from the endpoint's position, posting what it
    /// subscribed to, until `stop`, the lease is lost, or the endpoint is disabled.
    async fn deliver(self, leased: LeasedWebhook, stop: CancellationToken) {
        let endpoint = &leased.endpoint;
        let mut cursor = leased.cursor.clone();
        let mut secrets: Vec<&[u8]> = vec![&leased.secret];
        if let Some(previous) = &leased.previous_secret {
            secrets.push(previous);
        }
        'stream: while !stop.is_cancelled() {
            let request = pb::WatchConversationsRequest {
                account_id: endpoint.account_id.clone(),
                skill_ids: Vec::new(),
                cursor: cursor.clone(),
                since: cursor
                    .is_empty()
                    .then(|| c2m_proto::timestamp(endpoint.created_at)),
            };
            let mut stream = match self
                .peers
                .conversations()
                .watch_conversations(request)
                .await
            {
                Ok(stream) => stream.into_inner(),
                // Disabled longer than the log keeps events: what it missed is gone. It goes
                // on from the oldest event kept, and says so.
                Err(status) if status.code() == tonic::Code::OutOfRange => {
                    tracing::warn!(endpoint_id = %endpoint.id, account_id = %endpoint.account_id, %status, "webhooks: events older than the conversation log keeps were never posted");
                    cursor.clear();
                    continue;
                }
                Err(status) => {
                    tracing::debug!(%status, endpoint_id = %endpoint.id, "webhooks: stream unavailable");
                    if sleep_or_stop(Duration::from_secs(1), &stop).await {
                        return;
                    }
                    continue;
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = stream.message() => next,
                };
                let event = match next {
                    Ok(Some(item)) => match item.event {
                        Some(event) => event,
                        None => continue,
                    },
                    Ok(None) | Err(_) => {
                        if sleep_or_stop(Duration::from_millis(200), &stop).await {
                            return;
                        }
                        continue 'stream;
                    }
                };
                let kind = event_type(&event);
                if endpoint.wants(kind)
                    && !self
                        .post_until_taken(&leased, &secrets, &event, &stop)
                        .await
                {
                    return;
                }
                match self
                    .store
                    .webhook_passed(&endpoint.id, &self.owner, &event.cursor)
                    .await
                {
                    Ok(true) => cursor = event.cursor,
                    // Another replica holds it now, or an admin disabled it.
                    Ok(false) => return,
                    Err(error) => {
                        tracing::warn!(%error, endpoint_id = %endpoint.id, "webhooks: position not saved; posting from the last saved one");
                        if sleep_or_stop(Duration::from_secs(1), &stop).await {
                            return;
                        }
                        continue 'stream;
                    }
                }
            }
        }
    }

    /// Posts one event until the receiver takes it; `false` when delivering must stop (asked
    /// to, or the endpoint was disabled for failing too long).
    async fn post_until_taken(
        &self,
        leased: &LeasedWebhook,
        secrets: &[&[u8]],
        event: &pb::ConversationEvent,
        stop: &CancellationToken,
    ) -> bool {
        let endpoint = &leased.endpoint;
        let kind = event_type(event);
        let timestamp = event
            .at
            .as_ref()
            .and_then(c2m_proto::from_timestamp)
            .unwrap_or_else(chrono::Utc::now)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = payload(
            kind,
            timestamp,
            c2m_proto::to_json("c2m.v1.ConversationEvent", event),
        );
        let webhook_id = format!("evt_{}", event.cursor);
        let disable_after = Duration::from_secs(self.settings.disable_after_hours * 3600);
        for attempt in 1.. {
            let delivery = post::post(
                &self.http,
                &post::Message {
                    endpoint_id: &endpoint.id,
                    url: &endpoint.url,
                    secrets: secrets.to_vec(),
                    webhook_id: &webhook_id,
                    event_type: kind,
                    body: &body,
                    attempt,
                },
            )
            .await;
            if let Err(error) = self.store.record_webhook_delivery(&delivery).await {
                tracing::warn!(%error, "webhooks: delivery not recorded");
            }
            if delivery.succeeded {
                return true;
            }
            tracing::debug!(endpoint_id = %endpoint.id, webhook_id, attempt, error = %delivery.error, "webhook delivery failed");
            match self
                .store
                .webhook_failed(&endpoint.id, &self.owner, disable_after)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(endpoint_id = %endpoint.id, account_id = %endpoint.account_id, "webhook endpoint disabled: its deliveries failed too long");
                    return false;
                }
                Err(error) => tracing::warn!(%error, "webhooks: failure not recorded"),
            }
            let wait = post::backoff(
                attempt,
                Duration::from_millis(self.settings.retry_base_ms),
                Duration::from_millis(self.settings.retry_max_ms),
            );
            if sleep_or_stop(wait, stop).await {
                return false;
            }
        }
        false
    }
}

/// Sleeps for `wait`; `true` if `stop` came first.
async fn sleep_or_stop(wait: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}
