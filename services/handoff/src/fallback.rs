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
use c2m_storage::outbox;
use chrono::{DateTime, Utc};

use crate::{
    engine::Engine,
    model::Step,
    send::{Recipient, Sending, Sends, event},
    store::{self, Attempt, StoredHandoff},
};

/// How often the table is looked at for due fallbacks.
const POLL: Duration = Duration::from_millis(200);

/// Steps as stored in `fallbacks.remaining`.
pub fn encode_steps(steps: &[Step]) -> serde_json::Value {
    serde_json::to_value(steps).unwrap_or_default()
}

/// The steps `encode_steps` stored; none when they cannot be read.
fn decode_steps(value: &serde_json::Value) -> Vec<Step> {
    serde_json::from_value(value.clone()).unwrap_or_else(|error| {
        tracing::error!(%error, "a pending fallback's steps cannot be read");
        Vec::new()
    })
}

/// A pending fallback that is due to be looked at.
#[derive(sqlx::FromRow)]
struct Due {
    handoff_id: String,
    account_id: String,
    /// The message on its way.
    message_id: String,
    /// The steps still to try (`encode_steps`).
    remaining: serde_json::Value,
    /// Past it an undelivered message counts as failed.
    deadline: Option<DateTime<Utc>>,
    /// The configuration's delivery deadline, for the next channel's message.
    window_seconds: Option<i32>,
    /// The send went unanswered: past this, with no report from the provider, the next channel.
    confirm_by: Option<DateTime<Utc>>,
    watched_since: DateTime<Utc>,
}

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

/// A fallback going to its next channel: the handoff, locked, with its watched attempt marked
/// undelivered, and what to send.
struct Going {
    handoff: StoredHandoff,
    steps: Vec<Step>,
    window: Option<i32>,
    reason: String,
}

impl Engine {
    /// Looks at due fallbacks every 200 ms until `shutdown`, and at once again after a round
    /// that found more than it takes.
    pub(crate) async fn run_fallbacks(self: Arc<Self>, shutdown: CancellationToken) {
        let mut pruned = std::time::Instant::now();
        loop {
            if self.db.is_migrated() && pruned.elapsed() >= LEASE_PRUNE {
                pruned = std::time::Instant::now();
                if let Err(error) = prune_leases(self.db.pool()).await {
                    tracing::warn!(%error, "expired consumer leases not pruned, will retry");
                }
            }
            if self.db.is_migrated() {
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

    /// One round: the due fallbacks' messages looked up together, the ones that must go to their
    /// next channel sent together, and everything recorded in one transaction, which holds the
    /// rows so that no other replica takes them meanwhile.
    async fn fallback_round(&self) -> Result<usize, sqlx::Error> {
        let mut tx = self.db.pool().begin().await?;
        let due: Vec<Due> = sqlx::query_as(
            "SELECT handoff_id, account_id, message_id, remaining, deadline, window_seconds, \
                 confirm_by, watched_since \
             FROM fallbacks WHERE next_check <= now() ORDER BY next_check LIMIT $1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(ROUND)
        .fetch_all(&mut *tx)
        .await?;
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
                confirm(
                    &mut tx,
                    &row.handoff_id,
                    &row.message_id,
                    &m.provider_message_id,
                )
                .await?;
            }
            match verdict(&row, message) {
                Verdict::Drop => dropped.push(row.handoff_id),
                Verdict::Wait => waiting.push(row.handoff_id),
                Verdict::FallBack(reason) => {
                    let Some(mut handoff) =
                        store::load_for_update(&mut tx, &row.handoff_id).await?
                    else {
                        dropped.push(row.handoff_id);
                        continue;
                    };
                    if let Some(attempt) = handoff
                        .attempts
                        .iter_mut()
                        .find(|a| a.message_id == row.message_id)
                    {
                        attempt.outcome = AttemptOutcome::Undelivered;
                        attempt.error_code = reason.clone();
                    }
                    going.push(Going {
                        handoff,
                        steps: decode_steps(&row.remaining),
                        window: row.window_seconds,
                        reason,
                    });
                }
            }
        }
        if !dropped.is_empty() {
            sqlx::query("DELETE FROM fallbacks WHERE handoff_id = ANY($1)")
                .bind(&dropped)
                .execute(&mut *tx)
                .await?;
        }
        // Looked at again after a pause that grows with the time watched (a tenth of it, from
        // 200 ms to 5 s), never past the deadline or the confirmation's, so those still act on
        // time.
        if !waiting.is_empty() {
            sqlx::query(
                "UPDATE fallbacks SET next_check = least( \
                 now() + least(greatest((now() - watched_since) / 10, \
                     interval '200 milliseconds'), interval '5 seconds'), \
                 deadline, confirm_by) \
             WHERE handoff_id = ANY($1)",
            )
            .bind(&waiting)
            .execute(&mut *tx)
            .await?;
        }
        // The next channels' messages go together, as so many handoffs' would.
        let sends = futures::future::join_all(going.iter().map(|g| {
            let h = &g.handoff;
            let to = Recipient {
                account_id: &h.account_id,
                handoff_id: &h.handoff_id,
                phone: &h.consumer_phone,
                handoff_config_id: &h.handoff_config_id,
                skill_id: &h.skill_id,
            };
            async move {
                self.send(&to, &g.steps, h.attempts.len(), Sends::Allowed)
                    .await
            }
        }))
        .await;
        let mut wrote_events = false;
        for (g, sending) in going.into_iter().zip(sends) {
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
                    tracing::warn!(handoff_id = %g.handoff.handoff_id, %status, "fallback send unanswered; looking again");
                    sqlx::query(
                        "UPDATE fallbacks SET next_check = now() + interval '1 second' \
                         WHERE handoff_id = $1",
                    )
                    .bind(&g.handoff.handoff_id)
                    .execute(&mut *tx)
                    .await?;
                    continue;
                }
            };
            wrote_events = true;
            self.record_fallback(&mut tx, g, sent).await?;
        }
        tx.commit().await?;
        if wrote_events {
            self.relay.wake();
            self.deflections.wake();
        }
        Ok(taken)
    }

    /// Records what a fallback's send came to; keeps watching the new message when channels
    /// remain after it.
    async fn record_fallback(
        &self,
        tx: &mut sqlx::PgConnection,
        going: Going,
        (attempts, sent): (Vec<Attempt>, Option<(Channel, String)>),
    ) -> Result<(), sqlx::Error> {
        let Going {
            mut handoff,
            steps,
            window,
            reason,
        } = going;
        let used = attempts.len();
        let new_message = attempts
            .last()
            .map(|a| a.message_id.clone())
            .unwrap_or_default();
        tracing::info!(
            account_id = %handoff.account_id,
            handoff_id = %handoff.handoff_id,
            reason,
            channel = sent.as_ref().map_or("", |(c, _)| c.as_str_name()),
            "delivery fallback"
        );
        handoff.attempts.extend(attempts);
        let events = match &sent {
            Some((channel, text)) => {
                handoff.channel = Some(*channel);
                handoff.status = HandoffStatus::Sent;
                // Routing keeps the handoff's deflection and takes this send's channel, message
                // and time for it (engagement attributes came with the first).
                store::enqueue_deflection(
                    tx,
                    &pb::Deflection {
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
                    },
                )
                .await?;
                vec![event(&handoff, FunnelStage::Sent, *channel, String::new())]
            }
            None => {
                handoff.status = HandoffStatus::Failed;
                let last = handoff
                    .attempts
                    .last()
                    .map(|a| a.error_code.clone())
                    .unwrap_or_default();
                let channel = handoff
                    .attempts
                    .last()
                    .map_or(Channel::Unspecified, |a| a.channel);
                vec![event(&handoff, FunnelStage::Failed, channel, last)]
            }
        };
        store::update_delivery(tx, &handoff).await?;
        outbox::enqueue(tx, &events).await?;
        let rest = &steps[used.min(steps.len())..];
        // A push reports neither delivery nor failure: nothing left to watch once one is sent.
        let watchable = matches!(&sent, Some((channel, _)) if *channel != Channel::AppMessaging);
        if watchable && !rest.is_empty() {
            let confirm_by = handoff
                .attempts
                .last()
                .and_then(|last| self.confirm_by(last, Utc::now()));
            sqlx::query(
                "UPDATE fallbacks SET message_id = $2, remaining = $3, \
                 deadline = now() + make_interval(secs => $4), confirm_by = $5, next_check = now(), \
                 watched_since = now() WHERE handoff_id = $1",
            )
            .bind(&handoff.handoff_id)
            .bind(&new_message)
            .bind(encode_steps(rest))
            .bind(window.map(f64::from))
            .bind(confirm_by)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("DELETE FROM fallbacks WHERE handoff_id = $1")
                .bind(&handoff.handoff_id)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}

/// How often expired consumer leases are deleted.
const LEASE_PRUNE: Duration = Duration::from_secs(60);

/// Deletes consumer leases that expired a minute ago or more: a row per consumer deflected, kept
/// only while it holds them.
async fn prune_leases(pool: &sqlx::PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM consumer_leases WHERE until < now() - interval '1 minute'")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

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

/// Marks the attempt that sent `message_id`, which its provider never answered, as sent: the
/// provider has since reported on it (`provider_message_id`); the fallback stops waiting for that.
async fn confirm(
    tx: &mut sqlx::PgConnection,
    handoff_id: &str,
    message_id: &str,
    provider_message_id: &str,
) -> Result<(), sqlx::Error> {
    if let Some(mut handoff) = store::load_for_update(tx, handoff_id).await?
        && let Some(attempt) = handoff
            .attempts
            .iter_mut()
            .find(|a| a.message_id == message_id && a.outcome == AttemptOutcome::Unconfirmed)
    {
        attempt.outcome = AttemptOutcome::Sent;
        attempt.provider_message_id = provider_message_id.to_owned();
        store::update_delivery(tx, &handoff).await?;
    }
    sqlx::query("UPDATE fallbacks SET confirm_by = NULL WHERE handoff_id = $1")
        .bind(handoff_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
