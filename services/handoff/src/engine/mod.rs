//! The handoff pipeline, in the order it runs: the gate (idempotency, the consumer's lease, the
//! account's rate limit) → the context and the plan (`context.rs`, `plan.rs`) → the handoff
//! written in progress → the send (`send.rs`) → its outcome written over it (`record.rs`), with
//! its events, its pending fallback and its deflection for Routing. Everything a retry, a crash
//! or a second replica can do to it ends in one outcome and one message.

mod lookup;
mod record;

use record::outcome_stage;

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, Channel, HandoffStatus};
use c2m_runtime::{TaskTracker, auth::TokenKey, ids, peers::Peers};
use c2m_storage::outbox::Relay;
use chrono::Utc;

use crate::{
    deflections::ToRouting,
    error::Error,
    gate::{Ask, Gate, Passage},
    model::{Decision, Step},
    request::Deflection,
    send::{Recipient, Sender, Sending, Sends, event},
    store::{Fallback, HandoffStore, Intended, Intent, StoredHandoff},
    upstream::Upstream,
};

/// What runs handoffs: its peers, its storage, its gate. Shared by the RPCs and the background
/// work (fallbacks, unfinished handoffs, cache invalidation).
pub struct Engine {
    pub(crate) store: Arc<dyn HandoffStore>,
    /// The channel gateway, for sends and message lookups.
    pub(crate) peers: Peers,
    pub(crate) upstream: Arc<dyn Upstream>,
    pub(crate) relay: Relay,
    pub(crate) deflections: Relay<ToRouting>,
    pub(crate) gate: Gate,
    pub(crate) sender: Sender,
    /// `consumer_lease_ms`.
    pub(crate) consumer_lease: Duration,
    /// Handoffs running on after their IVR stopped waiting; a shutdown lets them finish.
    pub(crate) detached: TaskTracker,
    /// How many handoffs may run at once (`max_in_progress`).
    pub(crate) admission: Admission,
    /// Makes the consumer's opaque id on ATTEMPTED events.
    pub(crate) key: TokenKey,
}

/// The bound on handoffs running at once. A handoff holds its place until it ends, after its IVR
/// stopped waiting too, so an overload cannot pile up work that no caller waits for.
pub(crate) struct Admission {
    places: Arc<tokio::sync::Semaphore>,
    limit: u32,
}

/// A running handoff's place; given back when it is dropped.
pub(crate) struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        c2m_runtime::metrics::metrics().handoffs_in_progress.dec();
    }
}

impl Admission {
    pub(crate) fn new(limit: u32) -> Self {
        Self {
            places: Arc::new(tokio::sync::Semaphore::new(limit as usize)),
            limit,
        }
    }

    /// A place for a new handoff, or `Overloaded` at once when every place is taken.
    pub(crate) fn admit(&self) -> Result<Place, Error> {
        let permit = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| Error::Overloaded { limit: self.limit })?;
        c2m_runtime::metrics::metrics().handoffs_in_progress.inc();
        Ok(Place { _permit: permit })
    }
}

/// How a decided handoff is carried out.
#[derive(Debug, Clone, Copy)]
struct Carry {
    /// When it was first written, if an earlier request did (it is in progress).
    existing: Option<chrono::DateTime<Utc>>,
    sends: Sends,
    /// Take the consumer's lease in PostgreSQL when the handoff is written, as well as the
    /// gate's: a new handoff does. Redis can die between its admission and this write, and a
    /// replica deciding from memory then knows only what PostgreSQL holds; whichever of two
    /// handoffs for the consumer writes first there holds them, and the other is skipped. A
    /// handoff an earlier request left in progress does not: it may have sent already.
    take_lease: bool,
}

impl Carry {
    /// A new handoff, which may send.
    fn new() -> Self {
        Self {
            existing: None,
            sends: Sends::Allowed,
            take_lease: true,
        }
    }
}

/// How long past the peer timeout a handoff in progress is left to its sender before a retry
/// finishes it.
pub(crate) const TAKEOVER_MARGIN: Duration = Duration::from_secs(1);

/// What the gate let a new handoff do.
enum Gated {
    /// Admitted: the decision pipeline's answer.
    Admitted(Result<Decision, Error>),
    /// The idempotency key's first request (in flight, or just committed).
    Duplicate(String),
    /// The handoff that holds the consumer's lease.
    ConsumerBusy(String),
    /// Over the limit until a slot frees.
    Limited(Duration),
}

impl Engine {
    /// The handoff an earlier request with this idempotency key made, if it has committed; an
    /// error if that request had other parameters.
    async fn replay(
        &self,
        d: &Deflection,
        key: &str,
        fingerprint: &[u8],
    ) -> Result<Option<StoredHandoff>, Error> {
        match self.store.replay(&d.account_id, key).await? {
            Some((hash, existing)) if hash == fingerprint => Ok(Some(existing)),
            Some((_, existing)) => {
                // Which parameters differ, where the first request's are on its record; the
                // others (template variables, overrides) are known only by their hash.
                let differing: Vec<&str> = [
                    (
                        "consumer_phone",
                        d.consumer_phone == existing.consumer_phone,
                    ),
                    (
                        "handoff_config_id",
                        existing.handoff_config_id == d.handoff_config_id,
                    ),
                ]
                .into_iter()
                .filter(|(_, same)| !same)
                .map(|(field, _)| field)
                .collect();
                let which = if differing.is_empty() {
                    "template_variables, override_channel, override_message, override_skill_id \
                     or consumer_id differ"
                        .to_owned()
                } else {
                    format!("{} differs", differing.join(" and "))
                };
                Err(Error::KeyReused {
                    handoff_id: existing.handoff_id,
                    differing: which,
                })
            }
            None => Ok(None),
        }
    }

    /// The gate's answer for a new handoff and, when it is admitted, what the decision pipeline
    /// makes of the request; with the account's limit, for the refusal that names it.
    async fn gate_and_decide(&self, d: &Deflection, ask: Ask<'_>) -> Result<(u32, Gated), Error> {
        let limit = self.upstream.account(&d.account_id).await?.rate_limit;
        let decided = self.gate.decide(Ask { limit, ..ask }).await;
        let gated = match decided.passage {
            Passage::Admitted { open_conversation } => {
                Gated::Admitted(self.decide(d, open_conversation).await)
            }
            Passage::Duplicate { handoff_id } => Gated::Duplicate(handoff_id),
            Passage::ConsumerBusy { handoff_id } => Gated::ConsumerBusy(handoff_id),
            Passage::Limited { retry_after } => Gated::Limited(retry_after),
        };
        Ok((limit, gated))
    }

    pub(crate) async fn create(
        &self,
        d: Deflection,
        idempotency_key: String,
    ) -> Result<StoredHandoff, Error> {
        let fingerprint = d.fingerprint();
        let key = (idempotency_key.as_str(), fingerprint.as_slice());
        let handoff_id = ids::generate("ho");
        let ask = Ask {
            account_id: &d.account_id,
            handoff_id: &handoff_id,
            idempotency_key: &idempotency_key,
            consumer: &d.consumer_phone,
            // The account's, once the gate knows it; a release does not need it.
            limit: 0,
        };
        // PostgreSQL keeps a request's record for 24 hours, Redis its claim for a minute: the
        // record is looked up while the gate decides and, once it admits, while the consumer is
        // checked, so the lookup adds no wait. An earlier request's record wins over whatever
        // the gate said, and an admission that ends here gives back what it took.
        let (replayed, gated) = tokio::join!(
            self.replay(&d, &idempotency_key, &fingerprint),
            self.gate_and_decide(&d, ask),
        );
        let admitted = matches!(gated, Ok((_, Gated::Admitted(_))));
        if let Some(earlier) = replayed.transpose() {
            if admitted {
                self.gate.release(ask).await;
            }
            return self.resume(&d, earlier?, key, Sends::Allowed).await;
        }
        let (limit, gated) = gated?;
        let decision = match gated {
            Gated::Admitted(Ok(decision)) => decision,
            Gated::Admitted(Err(refusal)) => {
                self.gate.release(ask).await;
                return Err(refusal);
            }
            Gated::Duplicate(first) => {
                // The first request with this key has finished, is under way, or stopped (a
                // crash) before it wrote anything. In the last case this request carries on as
                // that handoff: were the first still alive, the two would write one row, and
                // the gateway sends each of its message ids once.
                return match self.replay(&d, &idempotency_key, &fingerprint).await? {
                    Some(earlier) => self.resume(&d, earlier, key, Sends::Allowed).await,
                    None => {
                        let decision = self.decide(&d, None).await?;
                        self.carry_out(&d, first, decision, key, Carry::new()).await
                    }
                };
            }
            Gated::ConsumerBusy(holder) => {
                return self.skip_recent(&d, handoff_id, holder, key, None).await;
            }
            Gated::Limited(retry_after) => {
                return Err(Error::RateLimited {
                    account_id: d.account_id.clone(),
                    limit,
                    retry_after,
                });
            }
        };
        self.carry_out(&d, handoff_id, decision, key, Carry::new())
            .await
    }

    /// An earlier request's handoff under the same key: as it is once finished; finished now if
    /// it was left in progress (its sender crashed, or the gateway did not answer it). Its
    /// messages keep their ids, so what went before is not sent again.
    pub(crate) async fn resume(
        &self,
        d: &Deflection,
        earlier: StoredHandoff,
        key: (&str, &[u8]),
        sends: Sends,
    ) -> Result<StoredHandoff, Error> {
        if earlier.status != HandoffStatus::InProgress {
            return Ok(earlier);
        }
        // Its sender may still be at work: it has a peer timeout for each call it makes. Taking
        // over meanwhile would be safe (the gateway sends each message id once, and only one
        // outcome is written) but would only find the same message at the provider.
        let age = (Utc::now() - earlier.created_at)
            .to_std()
            .unwrap_or_default();
        let grace = self.peers.timeout() + TAKEOVER_MARGIN;
        if age < grace {
            return Err(Error::InProgress {
                handoff_id: Some(earlier.handoff_id),
                retry_after: (grace - age).min(Duration::from_millis(500)),
            });
        }
        tracing::info!(handoff_id = %earlier.handoff_id, "finishing a handoff an earlier request left in progress");
        let decision = self.decide(d, None).await?;
        let carry = Carry {
            existing: Some(earlier.created_at),
            sends,
            take_lease: false,
        };
        self.carry_out(d, earlier.handoff_id, decision, key, carry)
            .await
    }

    /// Carries out what was decided for a handoff: one that will send is written first (in
    /// progress, with its key and its consumer's lease), then sends, then its outcome is written
    /// over it. `existing`: when the handoff was first written, if an earlier request did.
    async fn carry_out(
        &self,
        d: &Deflection,
        handoff_id: String,
        decision: Decision,
        key: (&str, &[u8]),
        carry: Carry,
    ) -> Result<StoredHandoff, Error> {
        let Carry {
            existing,
            sends,
            take_lease,
        } = carry;
        if let Some(pending) = decision.pending_invite.clone() {
            // One Apple Messages invite per pending deflection: a second would start a second
            // chat for the same call.
            return self
                .skip_recent(d, handoff_id, pending, key, existing)
                .await;
        }
        let now = Utc::now();
        let mut handoff = StoredHandoff {
            handoff_id,
            account_id: d.account_id.clone(),
            handoff_config_id: d.handoff_config_id.clone(),
            consumer_phone: d.consumer_phone.to_string(),
            status: HandoffStatus::InProgress,
            channel: None,
            skill_id: decision.skill_id.clone(),
            ivr_call_id: d.ivr_call_id.clone(),
            ivr_number: d.ivr_number.clone(),
            attempts: Vec::new(),
            duplicate_of: None,
            created_at: existing.unwrap_or(now),
        };
        let mut intended = existing.is_some();
        let sent = match decision.blocked {
            Some(blocked) => {
                handoff.status = blocked.status();
                None
            }
            None => {
                let intent = Arc::new(Intent {
                    handoff: handoff.clone(),
                    idempotency_key: key.0.to_owned(),
                    fingerprint: key.1.to_vec(),
                    lease: self.consumer_lease,
                    request: d.request.clone(),
                    take_lease,
                });
                match self.store.intend(intent).await? {
                    Intended::Holding => {}
                    Intended::KeyTaken => {
                        // Another handoff has the key (and will message the consumer, or has):
                        // this one sends nothing, so the lease the gate gave it goes back.
                        self.gate
                            .release_lease(&d.account_id, &d.consumer_phone, &handoff.handoff_id)
                            .await;
                        return self.raced(&handoff.account_id, key.0).await;
                    }
                    Intended::ConsumerHeld(holder) => {
                        return self
                            .skip_recent(d, handoff.handoff_id, holder, key, Some(now))
                            .await;
                    }
                }
                intended = true;
                let to = Recipient {
                    account_id: &d.account_id,
                    handoff_id: &handoff.handoff_id,
                    phone: &d.consumer_phone,
                    handoff_config_id: &d.handoff_config_id,
                    skill_id: &decision.skill_id,
                };
                match self.sender.send(&to, &decision.plan, 0, sends).await {
                    Sending::Interrupted { status } => {
                        return Err(Error::Unfinished {
                            handoff_id: handoff.handoff_id,
                            at_provider: status.code() == tonic::Code::Aborted,
                            cause: status.message().to_owned(),
                        });
                    }
                    Sending::Sent {
                        attempts,
                        channel,
                        text,
                    } => {
                        handoff.attempts = attempts;
                        handoff.status = HandoffStatus::Sent;
                        handoff.channel = Some(channel);
                        Some((channel, text))
                    }
                    Sending::Failed { attempts } => {
                        handoff.attempts = attempts;
                        handoff.status = HandoffStatus::Failed;
                        None
                    }
                }
            }
        };
        let status = handoff.status;
        let error_code = handoff
            .attempts
            .last()
            .filter(|_| status == HandoffStatus::Failed)
            .map(|a| a.error_code.clone())
            .unwrap_or_default();
        let events = [
            self.attempted(&handoff, decision.funnel_channel()),
            event(
                &handoff,
                outcome_stage(status),
                handoff.channel.unwrap_or_else(|| decision.funnel_channel()),
                error_code,
            ),
        ];
        // Channels left after the one that took the message: tried if it does not arrive.
        // A push reports neither delivery nor failure: there is nothing to watch after one.
        let fallback = sent.as_ref().and_then(|(channel, _)| {
            if *channel == Channel::AppMessaging {
                return None;
            }
            let deadline = decision.delivery_deadline;
            let rest = &decision.plan[handoff.attempts.len()..];
            let last = handoff.attempts.last()?;
            (!rest.is_empty()).then(|| Fallback {
                message_id: last.message_id.clone(),
                remaining: Step::encode_all(rest),
                deadline: deadline
                    .and_then(|d| chrono::Duration::from_std(d).ok())
                    .map(|d| now + d),
                window_seconds: decision
                    .delivery_deadline
                    .map(|d| i32::try_from(d.as_secs()).unwrap_or(i32::MAX)),
                confirm_by: self.sender.confirm_by(last, now),
            })
        });
        // What Routing must know to open the conversation when the consumer replies: committed
        // with the handoff, shipped by the deflection relay.
        let deflection = sent.as_ref().map(|(channel, text)| pb::Deflection {
            account_id: d.account_id.clone(),
            handoff_id: handoff.handoff_id.clone(),
            consumer_phone: d.consumer_phone.to_string(),
            channel: (*channel).into(),
            skill_id: decision.skill_id.clone(),
            first_message: text.clone(),
            engagement_attributes: Some(d.engagement_attributes.clone()),
            sent_at: Some(c2m_proto::timestamp(now)),
            handoff_config_id: d.handoff_config_id.clone(),
            ivr_number: d.ivr_number.clone(),
        });
        self.commit(handoff, key, events.into(), fallback, deflection, intended)
            .await
    }
}
