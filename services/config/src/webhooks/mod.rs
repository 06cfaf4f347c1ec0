//! Posting handoff stages and conversation events to brands' webhook endpoints. The dispatcher
//! follows two durable feeds for each endpoint: Reporting's event log (`ListEvents`, every stage
//! of every handoff, in the order recorded) and the routing role's `WatchConversations`, the same
//! stream a desk follows. Each endpoint keeps its position in both (a log position and a cursor)
//! in Config's schema, so nothing is lost across restarts and an event is posted again, with the
//! same `webhook-id`, only if a replica stopped between the post and saving the position. One replica at a time delivers for an endpoint (a
//! lease renewed every second); each endpoint has its own task, so a slow or failing receiver
//! holds up nobody else's events. A failing delivery is retried, in order, with exponential
//! backoff and jitter, until it succeeds or the endpoint has failed for `disable_after_hours`
//! and is disabled.

pub(crate) mod post;

use std::{collections::HashMap, sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, FunnelStage, conversation_event::Kind};
use c2m_runtime::peers::Peers;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{ConfigStore, LeasedWebhook, WebhookPosition};

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
/// How often an endpoint that has read all of Reporting's log asks again.
const HANDOFF_POLL: Duration = Duration::from_millis(500);
/// Events read from Reporting's log at once.
const HANDOFF_PAGE: i32 = 200;
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

/// The `type` of a handoff stage's payload; `None` for the stages conversation events tell
/// (opened, answered, transferred, closed) and the consent changes, which carry no handoff.
pub(crate) fn handoff_event_type(stage: FunnelStage) -> Option<&'static str> {
    Some(match stage {
        FunnelStage::Attempted => "handoff.attempted",
        FunnelStage::Sent => "handoff.sent",
        FunnelStage::Delivered => "handoff.delivered",
        FunnelStage::Read => "handoff.read",
        FunnelStage::Failed => "handoff.failed",
        FunnelStage::Responded => "handoff.responded",
        FunnelStage::SkippedOpenConversation => "handoff.skipped_open_conversation",
        FunnelStage::SkippedRecentHandoff => "handoff.skipped_recent_handoff",
        FunnelStage::RejectedLandline => "handoff.rejected_landline",
        FunnelStage::RejectedOptedOut => "handoff.rejected_opted_out",
        FunnelStage::NoEligibleChannel => "handoff.no_eligible_channel",
        FunnelStage::Unspecified
        | FunnelStage::OptedOut
        | FunnelStage::OptedIn
        | FunnelStage::ConversationOpened
        | FunnelStage::ConversationClosed
        | FunnelStage::ConversationTransferred
        | FunnelStage::Answered => return None,
    })
}

/// One message for an endpoint: its `webhook-id` (the same on every attempt and every replica),
/// its type, and the signed body.
pub(crate) struct Outgoing {
    pub webhook_id: String,
    pub kind: &'static str,
    pub body: Vec<u8>,
}

fn rfc3339(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(c2m_proto::from_timestamp)
        .unwrap_or_else(chrono::Utc::now)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Outgoing {
    fn conversation(event: &pb::ConversationEvent) -> Self {
        let kind = event_type(event);
        Self {
            webhook_id: format!("evt_{}", event.cursor),
            kind,
            body: payload(
                kind,
                rfc3339(event.at.as_ref()),
                c2m_proto::to_json("c2m.v1.ConversationEvent", event),
            ),
        }
    }

    /// `None` when the event is not a handoff stage.
    fn handoff(event: &pb::Event) -> Option<Self> {
        let kind = handoff_event_type(FunnelStage::try_from(event.stage).ok()?)?;
        Some(Self {
            // Reporting's de-duplication key: one event, one id, whoever reported it twice.
            webhook_id: event.event_id.clone(),
            kind,
            body: payload(
                kind,
                rfc3339(event.occurred_at.as_ref()),
                c2m_proto::to_json("c2m.v1.Event", event),
            ),
        })
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

    /// Follows the endpoint's two feeds, each from its own position, until `stop`, the lease is
    /// lost, or the endpoint is disabled. When one feed must stop, so does the other.
    async fn deliver(self, leased: LeasedWebhook, stop: CancellationToken) {
        let mut secrets: Vec<&[u8]> = vec![&leased.secret];
        if let Some(previous) = &leased.previous_secret {
            secrets.push(previous);
        }
        let conversations = async {
            self.follow_conversations(&leased, &secrets, &stop).await;
            stop.cancel();
        };
        let handoffs = async {
            self.follow_handoffs(&leased, &secrets, &stop).await;
            stop.cancel();
        };
        tokio::join!(conversations, handoffs);
    }

    /// Reads the account's handoff stages from Reporting's log after the endpoint's position,
    /// posting what it subscribed to.
    async fn follow_handoffs(
        &self,
        leased: &LeasedWebhook,
        secrets: &[&[u8]],
        stop: &CancellationToken,
    ) {
        let endpoint = &leased.endpoint;
        let mut position = leased.handoff_position;
        while !stop.is_cancelled() {
            let request = pb::ListEventsRequest {
                account_id: endpoint.account_id.clone(),
                after_position: position.unwrap_or(0),
                since: position
                    .is_none()
                    .then(|| c2m_proto::timestamp(endpoint.created_at)),
                page_size: HANDOFF_PAGE,
            };
            let events = match self.peers.reporting().list_events(request).await {
                Ok(page) => page.into_inner().events,
                Err(status) => {
                    tracing::debug!(%status, endpoint_id = %endpoint.id, "webhooks: reporting's log unavailable");
                    if sleep_or_stop(Duration::from_secs(1), stop).await {
                        return;
                    }
                    continue;
                }
            };
            if events.is_empty() && sleep_or_stop(HANDOFF_POLL, stop).await {
                return;
            }
            // A delivered event's position is saved at once (a replica that stops posts again
            // at most that one); events passed over only move the position, saved once for the
            // page, so an endpoint that wants few types costs no write per event of the account.
            let mut passed = None;
            for logged in events {
                let outgoing = logged.event.as_ref().and_then(Outgoing::handoff);
                match outgoing {
                    Some(outgoing) if endpoint.wants(outgoing.kind) => {
                        if !self
                            .post_until_taken(leased, secrets, &outgoing, stop)
                            .await
                        {
                            return;
                        }
                        match self
                            .handoffs_passed(endpoint, logged.position, true, stop)
                            .await
                        {
                            Some(true) => {
                                position = Some(logged.position);
                                passed = None;
                            }
                            Some(false) => break,
                            None => return,
                        }
                    }
                    _ => passed = Some(logged.position),
                }
            }
            if let Some(at) = passed {
                match self.handoffs_passed(endpoint, at, false, stop).await {
                    Some(true) => position = Some(at),
                    Some(false) => {}
                    None => return,
                }
            }
        }
    }

    /// Saves the endpoint's position in Reporting's log: `Some(true)` saved, `Some(false)` not
    /// saved (read again from the last saved one), `None` when delivering must stop (asked to,
    /// the lease is lost, or the endpoint was disabled).
    async fn handoffs_passed(
        &self,
        endpoint: &crate::model::WebhookEndpoint,
        at: i64,
        delivered: bool,
        stop: &CancellationToken,
    ) -> Option<bool> {
        match self
            .store
            .webhook_passed(
                &endpoint.id,
                &self.owner,
                WebhookPosition::Handoffs(at),
                delivered,
            )
            .await
        {
            Ok(true) => Some(true),
            Ok(false) => None,
            Err(error) => {
                tracing::warn!(%error, endpoint_id = %endpoint.id, "webhooks: position not saved; posting from the last saved one");
                if sleep_or_stop(Duration::from_secs(1), stop).await {
                    None
                } else {
                    Some(false)
                }
            }
        }
    }

    /// Follows the account's conversation stream from the endpoint's cursor, posting what it
    /// subscribed to.
    async fn follow_conversations(
        &self,
        leased: &LeasedWebhook,
        secrets: &[&[u8]],
        stop: &CancellationToken,
    ) {
        let endpoint = &leased.endpoint;
        let mut cursor = leased.cursor.clone();
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
                    if sleep_or_stop(Duration::from_secs(1), stop).await {
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
                        if sleep_or_stop(Duration::from_millis(200), stop).await {
                            return;
                        }
                        continue 'stream;
                    }
                };
                let delivered = endpoint.wants(event_type(&event));
                if delivered
                    && !self
                        .post_until_taken(leased, secrets, &Outgoing::conversation(&event), stop)
                        .await
                {
                    return;
                }
                match self
                    .store
                    .webhook_passed(
                        &endpoint.id,
                        &self.owner,
                        WebhookPosition::Conversations(&event.cursor),
                        delivered,
                    )
                    .await
                {
                    Ok(true) => cursor = event.cursor,
                    // Another replica holds it now, or an admin disabled it.
                    Ok(false) => return,
                    Err(error) => {
                        tracing::warn!(%error, endpoint_id = %endpoint.id, "webhooks: position not saved; posting from the last saved one");
                        if sleep_or_stop(Duration::from_secs(1), stop).await {
                            return;
                        }
                        continue 'stream;
                    }
                }
            }
        }
    }

    /// Posts one message until the receiver takes it; `false` when delivering must stop (asked
    /// to, or the endpoint was disabled for failing too long).
    async fn post_until_taken(
        &self,
        leased: &LeasedWebhook,
        secrets: &[&[u8]],
        outgoing: &Outgoing,
        stop: &CancellationToken,
    ) -> bool {
        let endpoint = &leased.endpoint;
        let disable_after = Duration::from_secs(self.settings.disable_after_hours * 3600);
        for attempt in 1.. {
            let delivery = post::post(
                &self.http,
                &post::Message {
                    endpoint_id: &endpoint.id,
                    url: &endpoint.url,
                    secrets: secrets.to_vec(),
                    webhook_id: &outgoing.webhook_id,
                    event_type: outgoing.kind,
                    body: &outgoing.body,
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
            tracing::debug!(endpoint_id = %endpoint.id, webhook_id = %outgoing.webhook_id, attempt, error = %delivery.error, "webhook delivery failed");
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
