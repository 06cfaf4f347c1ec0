//! Delivery-driven fallback: a handoff sent on one channel of several is watched until its message
//! is delivered. If the provider reports it failed, or it is still undelivered at the
//! configuration's deadline, the next channel is tried, and both attempts stay on the handoff.
//!
//! The pending fallbacks are rows in PostgreSQL, so any replica can take them over (SKIP LOCKED),
//! and a restart loses none.
//!
//! A message neither delivered nor failed is looked at again after a pause that grows with the
//! time it has been watched (a tenth of it, 200 ms to 5 s), so a report soon after the send acts
//! within a fraction of a second, thousands of pending fallbacks cost the gateway a few lookups a
//! second each at most, and a deadline still acts on time. With no deadline, watching stops after
//! a day.

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, FunnelStage, HandoffStatus};
use c2m_runtime::CancellationToken;
use chrono::Utc;

use crate::{
    engine::{Engine, TAKEOVER_MARGIN},
    model::{Attempt, Step},
    send::{Recipient, Sending, Sends, event},
    store::{Due, Fell, Next, StoredHandoff},
};

/// How often the table is looked at for due fallbacks.
const POLL: Duration = Duration::from_millis(200);

/// How many due fallbacks one round takes.
const ROUND: i64 = 100;

/// How long a message with no deadline, delivered or failed by neither report nor silence, is
/// watched: a fallback a day after the call is no help to the caller.
const WATCH_LIMIT: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// What a round does with a due fallback.
enum Verdict {
    /// Delivered, or no longer worth watching.
    Drop,
    /// Undecided: looked at again later.
    Wait,
    /// Failed, or silent too long: the next channel, for this reason.
    FallBack(String),
}

impl Engine {
    /// Looks at due fallbacks every 200 ms until `shutdown`, and at once again after a round
    /// that found more than it takes.
    pub(crate) async fn run_fallbacks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut pruned = std::time::Instant::now();
        loop {
            if self.store.is_ready() && pruned.elapsed() >= LEASE_PRUNE {
                pruned = std::time::Instant::now();
                if let Err(error) = self.store.prune_leases().await {
                    tracing::warn!(%error, "expired consumer leases not pruned, will retry");
                }
            }
            if self.store.is_ready() {
                match self.fallback_round().await {
                    Ok(taken) if taken == ROUND as usize => continue,
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "fallback round failed, will retry"),
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// One round: the due fallbacks claimed for a lease, their messages looked up together, the
    /// ones that must go to their next channel sent together, and each recorded on its own. No
    /// transaction or lock is held across a call to the gateway.
    async fn fallback_round(&self) -> Result<usize, sqlx::Error> {
        let store = &self.store;
        // Long enough for the sends of every channel left, each of which may take a peer timeout.
        let lease = self.peers.timeout() * 3 + TAKEOVER_MARGIN;
        let due = store.claim_fallbacks(ROUND, lease).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let taken = due.len();
        let messages = futures::future::join_all(due.iter().map(|row| {
            let mut gateway = self.peers.channel_gateway();
            let request = pb::GetMessageRequest {
                account_id: row.account_id.clone(),
                message_id: row.message_id.clone(),
            };
            async move {
                gateway
                    .get_message(request)
                    .await
                    .ok()
                    .and_then(|m| m.into_inner().message)
            }
        }))
        .await;
        let (mut dropped, mut waiting, mut going) = (Vec::new(), Vec::new(), Vec::new());
        for (row, message) in due.into_iter().zip(messages) {
            let unconfirmed = message.as_ref().is_some_and(|m| m.unconfirmed);
            // The provider has reported on a send it never answered: it has the message, and
            // the attempt is an ordinary one from now on.
            if row.confirm_by.is_some()
                && !unconfirmed
                && let Some(m) = message
                    .as_ref()
                    .filter(|m| m.stage() != FunnelStage::Failed)
            {
                store
                    .confirm_send(&row.handoff_id, &row.message_id, &m.provider_message_id)
                    .await?;
            }
            match verdict(&row, message) {
                Verdict::Drop => dropped.push(row.handoff_id),
                Verdict::Wait => waiting.push(row.handoff_id),
                Verdict::FallBack(reason) => going.push((row, reason)),
            }
        }
        store.drop_fallbacks(&dropped).await?;
        store.wait_fallbacks(&waiting).await?;
        let mut handoffs = Vec::with_capacity(going.len());
        for (row, reason) in going {
            match store.load(&row.account_id, &row.handoff_id).await? {
                Some(handoff) => handoffs.push((row, reason, handoff)),
                None => {
                    store
                        .drop_fallbacks(std::slice::from_ref(&row.handoff_id))
                        .await?
                }
            }
        }
        // The next channels' messages go together, as so many handoffs' would.
        let sends = futures::future::join_all(handoffs.iter().map(|(row, _, h)| {
            let to = Recipient {
                account_id: &h.account_id,
                handoff_id: &h.handoff_id,
                phone: &h.consumer_phone,
                handoff_config_id: &h.handoff_config_id,
                skill_id: &h.skill_id,
            };
            let steps = Step::decode_all(&row.remaining);
            async move {
                self.sender
                    .send(&to, &steps, h.attempts.len(), Sends::Allowed)
                    .await
            }
        }))
        .await;
        let mut wrote = false;
        for ((row, reason, handoff), sending) in handoffs.into_iter().zip(sends) {
            let sent = match sending {
                Sending::Sent {
                    attempts,
                    channel,
                    text,
                } => (attempts, Some((channel, text))),
                Sending::Failed { attempts } => (attempts, None),
                // Nothing is known of the next channel's message: the fallback stays as it was,
                // and the next look sends the same message ids again (the gateway sends each
                // once), after a pause.
                Sending::Interrupted { status } => {
                    tracing::warn!(handoff_id = %handoff.handoff_id, %status, "fallback send unanswered; looking again");
                    store
                        .retry_fallback_in(&row.handoff_id, Duration::from_secs(1))
                        .await?;
                    continue;
                }
            };
            let fell = self.fell(row, reason, handoff, sent);
            if store.record_fallback(&fell).await? {
                wrote = true;
            } else {
                tracing::info!(handoff_id = %fell.handoff.handoff_id, "fallback recorded by another round");
            }
        }
        if wrote {
            self.relay.wake();
            self.deflections.wake();
        }
        Ok(taken)
    }

    /// What a fallback's send comes to: the watched attempt undelivered, the new ones added, the
    /// handoff sent or failed, its events and deflection, and what to watch next.
    fn fell(
        &self,
        due: Due,
        reason: String,
        mut handoff: StoredHandoff,
        (attempts, sent): (Vec<Attempt>, Option<(Channel, String)>),
    ) -> Fell {
        let attempts_before = handoff.attempts.len();
        if let Some(attempt) = handoff
            .attempts
            .iter_mut()
            .find(|a| a.message_id == due.message_id)
        {
            attempt.outcome = AttemptOutcome::Undelivered;
            attempt.error_code = reason.clone();
        }
        let used = attempts.len();
        tracing::info!(
            account_id = %handoff.account_id,
            handoff_id = %handoff.handoff_id,
            reason,
            channel = sent.as_ref().map_or("", |(c, _)| c.as_str_name()),
            "delivery fallback"
        );
        handoff.attempts.extend(attempts);
        let mut deflection = None;
        let events = match &sent {
            Some((channel, text)) => {
                handoff.channel = Some(*channel);
                handoff.status = HandoffStatus::Sent;
                // Routing keeps the handoff's deflection and takes this send's channel, message
                // and time for it (engagement attributes came with the first).
                deflection = Some(pb::Deflection {
                    account_id: handoff.account_id.clone(),
                    handoff_id: handoff.handoff_id.clone(),
                    consumer_phone: handoff.consumer_phone.clone(),
                    channel: (*channel).into(),
                    skill_id: handoff.skill_id.clone(),
                    first_message: text.clone(),
                    sent_at: Some(c2m_proto::timestamp(Utc::now())),
                    handoff_config_id: handoff.handoff_config_id.clone(),
                    ivr_number: handoff.ivr_number.clone(),
                    engagement_attributes: None,
                });
                vec![event(&handoff, FunnelStage::Sent, *channel, String::new())]
            }
            None => {
                handoff.status = HandoffStatus::Failed;
                let last = handoff.attempts.last();
                let code = last.map(|a| a.error_code.clone()).unwrap_or_default();
                let channel = last.map_or(Channel::Unspecified, |a| a.channel);
                vec![event(&handoff, FunnelStage::Failed, channel, code)]
            }
        };
        let steps = Step::decode_all(&due.remaining);
        let rest = &steps[used.min(steps.len())..];
        // A push reports neither delivery nor failure: nothing left to watch once one is sent.
        let watchable = matches!(&sent, Some((channel, _)) if *channel != Channel::AppMessaging);
        let next = (watchable && !rest.is_empty())
            .then(|| handoff.attempts.last())
            .flatten()
            .map(|last| Next {
                message_id: last.message_id.clone(),
                remaining: Step::encode_all(rest),
                confirm_by: self.sender.confirm_by(last, Utc::now()),
            });
        Fell {
            due,
            attempts_before,
            handoff,
            events,
            deflection,
            next,
        }
    }
}

/// How often expired consumer leases are deleted.
const LEASE_PRUNE: Duration = Duration::from_secs(60);

/// What the gateway's record of the watched message (none: it did not answer) says to do.
fn verdict(row: &Due, message: Option<pb::OutboundMessage>) -> Verdict {
    let now = Utc::now();
    let unconfirmed = message.as_ref().is_some_and(|m| m.unconfirmed);
    let stage = message
        .as_ref()
        .map_or(FunnelStage::Unspecified, |m| m.stage());
    match stage {
        FunnelStage::Delivered | FunnelStage::Read => Verdict::Drop,
        FunnelStage::Failed => {
            let code = message.map(|m| m.error_code).unwrap_or_default();
            Verdict::FallBack(if code.is_empty() {
                "failed".to_owned()
            } else {
                code
            })
        }
        _ if row.deadline.is_some_and(|d| d <= now) => {
            Verdict::FallBack("not-delivered-by-deadline".to_owned())
        }
        _ if unconfirmed && row.confirm_by.is_some_and(|c| c <= now) => {
            Verdict::FallBack("unconfirmed".to_owned())
        }
        _ if row.deadline.is_none() && !unconfirmed && now - row.watched_since > WATCH_LIMIT => {
            tracing::info!(handoff_id = %row.handoff_id, message_id = %row.message_id, "no delivery report in a day, fallback no longer watched");
            Verdict::Drop
        }
        _ => Verdict::Wait,
    }
}
