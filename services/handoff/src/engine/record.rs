//! Writing a handoff's outcome: the row with its idempotency record, events, pending fallback
//! and deflection for Routing, in one batched commit; a twin that got there first wins.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use c2m_proto::v1::{self as pb, Channel, FunnelStage, HandoffStatus};
use c2m_runtime::mask_phone;
use chrono::Utc;

use super::Engine;
use crate::{
    error::Error,
    gate,
    request::Deflection,
    send::event,
    store::{Fallback, Save, Saved, StoredHandoff},
};

pub(super) fn outcome_stage(status: HandoffStatus) -> FunnelStage {
    match status {
        HandoffStatus::Sent => FunnelStage::Sent,
        HandoffStatus::SkippedOpenConversation => FunnelStage::SkippedOpenConversation,
        HandoffStatus::RejectedLandline => FunnelStage::RejectedLandline,
        HandoffStatus::RejectedOptedOut => FunnelStage::RejectedOptedOut,
        HandoffStatus::NoEligibleChannel => FunnelStage::NoEligibleChannel,
        HandoffStatus::SkippedRecentHandoff => FunnelStage::SkippedRecentHandoff,
        HandoffStatus::Failed | HandoffStatus::InProgress | HandoffStatus::Unspecified => {
            FunnelStage::Failed
        }
    }
}

impl Engine {
    /// A handoff's ATTEMPTED event, with its consumer's opaque id (for repeat deflections).
    pub(super) fn attempted(&self, handoff: &StoredHandoff, channel: Channel) -> pb::Event {
        pb::Event {
            consumer_id: self
                .key
                .consumer_id(&handoff.account_id, &handoff.consumer_phone),
            ..event(handoff, FunnelStage::Attempted, channel, String::new())
        }
    }

    /// Another handoff holds the consumer's lease: record this one as skipped, pointing at it.
    /// `existing`: when this handoff was first written, if it was (in progress).
    pub(super) async fn skip_recent(
        &self,
        d: &Deflection,
        handoff_id: String,
        holder: String,
        idempotency: (&str, &[u8]),
        existing: Option<chrono::DateTime<Utc>>,
    ) -> Result<StoredHandoff, Error> {
        let config = self
            .upstream
            .handoff_config(&d.account_id, &d.handoff_config_id)
            .await?;
        let channel = config.channel_priority.first().copied().unwrap_or_default();
        let handoff = StoredHandoff {
            handoff_id,
            account_id: d.account_id.clone(),
            handoff_config_id: d.handoff_config_id.clone(),
            consumer_phone: d.consumer_phone.to_string(),
            status: HandoffStatus::SkippedRecentHandoff,
            channel: None,
            skill_id: d
                .override_skill_id
                .clone()
                .unwrap_or_else(|| config.skill_id.clone()),
            ivr_call_id: d.ivr_call_id.clone(),
            ivr_number: d.ivr_number.clone(),
            attempts: Vec::new(),
            duplicate_of: Some(holder),
            created_at: existing.unwrap_or_else(Utc::now),
        };
        let events = [
            self.attempted(&handoff, channel),
            event(
                &handoff,
                FunnelStage::SkippedRecentHandoff,
                channel,
                String::new(),
            ),
        ];
        self.commit(
            handoff,
            idempotency,
            events.into(),
            None,
            None,
            existing.is_some(),
        )
        .await
    }

    /// The handoff that holds this idempotency key, after this request lost it to another: as
    /// it is once finished, or "retry" while it is still under way.
    pub(super) async fn raced(&self, account_id: &str, key: &str) -> Result<StoredHandoff, Error> {
        match self.store.replay(account_id, key).await? {
            Some((_, winner)) if winner.status != HandoffStatus::InProgress => Ok(winner),
            Some((_, winner)) => Err(Error::InProgress {
                handoff_id: Some(winner.handoff_id),
                retry_after: Duration::from_millis(200),
            }),
            None => Err(Error::InProgress {
                handoff_id: None,
                retry_after: Duration::from_millis(200),
            }),
        }
    }

    /// Writes the handoff with its idempotency record, events, fallback and deflection; a twin
    /// that committed (or finished it) first wins. `intended`: its row was written before it
    /// sent. A handoff that sent nothing gives its consumer back.
    pub(super) async fn commit(
        &self,
        handoff: StoredHandoff,
        idempotency: (&str, &[u8]),
        events: Vec<pb::Event>,
        fallback: Option<Fallback>,
        deflection: Option<pb::Deflection>,
        intended: bool,
    ) -> Result<StoredHandoff, Error> {
        let deflected = deflection.is_some();
        let messaged = handoff.status == HandoffStatus::Sent;
        let save = Arc::new(Save {
            handoff: handoff.clone(),
            idempotency_key: idempotency.0.to_owned(),
            fingerprint: idempotency.1.to_vec(),
            events,
            fallback,
            deflection,
            intended,
            release_consumer: !messaged,
        });
        // A handoff that sent a message must be recorded: without its record, the IVR's retry
        // would not know what was sent. While PostgreSQL refuses (restarting, failing over), the
        // save is offered again for a while; the IVR may stop waiting meanwhile, and its retry
        // finds the handoff once it is saved (or, if it was written before it sent, finishes it).
        let saved = self
            .store
            .save(save, Instant::now() + gate::CLAIM_TTL)
            .await?;
        match saved {
            Saved::Saved => {
                self.relay.wake();
                if deflected {
                    self.deflections.wake();
                }
                if !messaged {
                    // Only a message holds the consumer: the next call for them may deflect.
                    self.gate
                        .release_lease(
                            &handoff.account_id,
                            &handoff.consumer_phone,
                            &handoff.handoff_id,
                        )
                        .await;
                }
                tracing::info!(
                    account_id = %handoff.account_id,
                    handoff_id = %handoff.handoff_id,
                    consumer = %mask_phone(&handoff.consumer_phone),
                    status = handoff.status.as_str_name(),
                    channel = handoff.channel.map_or("", |c| c.as_str_name()),
                    "handoff"
                );
                Ok(handoff)
            }
            Saved::Raced => self.raced(&handoff.account_id, idempotency.0).await,
        }
    }
}
