//! The send pipeline: a message id claimed in the gateway's store before its provider is called,
//! the provider's answer (and its retries), the outcome recorded over the claim, and the stages
//! that follow reported. A claim whose send failed before any message left is taken back; an
//! outcome PostgreSQL refused is offered again until it is recorded.

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::{
    mask_phone,
    metrics::{self, ProviderSendLabels, SendResult},
    status,
};
use c2m_storage::batch::Batcher;
use chrono::Utc;
use tonic::{Response, Status};

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Service, db_status,
    messages::{self, Claim},
    outcome::SendOutcome,
    retry,
    store::{GatewayStore, Outbound},
};

impl Service {
    /// Claims the message id, sends the message on `channel` and records the outcome.
    pub(crate) async fn deliver(
        &self,
        r: pb::SendMessageRequest,
        channel: Channel,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        // The id is claimed before the provider is called: a repeated id gets its first send
        // (or is told to wait while that is at the provider), whatever became of the sender.
        let budget = Duration::from_millis(self.settings.provider_timeout_ms);
        let now = Utc::now();
        let claim = Arc::new(Outbound {
            message_id: r.message_id.clone(),
            account_id: r.account_id.clone(),
            channel,
            handoff_id: r.handoff_id.clone(),
            handoff_config_id: r.handoff_config_id.clone(),
            skill_id: r.skill_id.clone(),
            conversation_id: r.conversation_id.clone(),
            provider_message_id: None,
            stage: FunnelStage::Sent,
            error_code: None,
            error_message: None,
            sent_at: now,
            updated_at: now,
            delivered_at: None,
            read_at: None,
            sending_until: chrono::Duration::from_std(budget + CLAIM_MARGIN)
                .ok()
                .map(|d| now + d),
            claimed_by: Some(uuid::Uuid::new_v4().to_string()),
        });
        // A claim whose answer was lost may have been made: asked again (its token finds it)
        // for as long as the send could take, so that the id's fate is known before the provider
        // is called. A claim left behind by a send that then gives up would later read as sent
        // at the provider and lost: it is taken back as soon as PostgreSQL allows.
        let claimed = self
            .claims
            .run_until(claim.clone(), Instant::now() + budget, |error, _| {
                tracing::debug!(%error, message_id = %claim.message_id, "message id claim asked again");
            })
            .await;
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                self.detached
                    .spawn(take_back(self.store.clone(), claim.clone()));
                return Err(db_status(error));
            }
        };
        match claimed {
            Claim::Mine => {}
            Claim::Earlier(first) if first.in_flight(Utc::now()) => {
                return Err(status::aborted_retry(
                    format!("message {} is at its provider now", first.message_id),
                    budget,
                ));
            }
            // Sent before, failed before, or claimed by a sender that died at the provider
            // (unconfirmed: its reports settle it).
            Claim::Earlier(first) => {
                return Ok(Response::new(pb::SendMessageResponse {
                    message: Some(first.to_wire()),
                }));
            }
            Claim::Foreign => {
                return Err(status::invalid_field(
                    "message_id",
                    "already used by another account",
                ));
            }
        }
        let outcome = match retry::within(budget, self.send_on(channel, &r)).await {
            (Ok(outcome), _) => outcome,
            // Refused before any message left (no credentials, storage away): the claim is taken
            // back, so that a retry of the id sends it.
            (Err(status), false) => {
                self.detached
                    .spawn(take_back(self.store.clone(), claim.clone()));
                return Err(status);
            }
            // A message may be at a provider: the claim stays, and reads as unconfirmed once
            // its time is past, for the provider's reports to settle.
            (Err(status), true) => {
                tracing::warn!(message_id = %r.message_id, %status, "send failed after its message was handed to a provider; it may have it");
                return Err(status);
            }
        };
        // Twilio 21610: the recipient replied STOP to this sender; do not try them here again.
        if let SendOutcome::Failed { code, .. } = &outcome
            && matches!(channel, Channel::Sms | Channel::AppleMessages)
            && code == "21610"
            && let Err(status) = self
                .peers
                .routing()
                .record_opt_out(pb::RecordOptOutRequest {
                    account_id: r.account_id.clone(),
                    consumer_phone: r.to.clone(),
                    channel: Channel::Sms as i32,
                    source: "twilio:21610".into(),
                })
                .await
        {
            tracing::warn!(%status, "opt-out from twilio 21610 not recorded");
        }
        metrics::metrics()
            .provider_sends
            .get_or_create(&ProviderSendLabels {
                channel: channel.as_str_name(),
                outcome: match &outcome {
                    SendOutcome::Accepted { .. } => SendResult::accepted,
                    SendOutcome::Failed { .. } => SendResult::failed,
                    SendOutcome::Unconfirmed { .. } => SendResult::unconfirmed,
                },
            })
            .inc();
        let (stage, provider_id, error_code, error_message) = match outcome {
            SendOutcome::Accepted { sid } => (FunnelStage::Sent, Some(sid), None, None),
            SendOutcome::Failed { code, message } => {
                (FunnelStage::Failed, None, Some(code), Some(message))
            }
            // Sent as far as anyone can tell, without the provider's id: the message stays
            // unconfirmed until the provider reports on it (`messages::advance`).
            SendOutcome::Unconfirmed { why } => {
                tracing::warn!(message_id = %r.message_id, channel = channel.as_str_name(), %why, "provider did not answer the send; it may have the message");
                (FunnelStage::Sent, None, None, None)
            }
        };
        let outbound = Arc::new(Outbound {
            provider_message_id: provider_id,
            stage,
            error_code,
            error_message,
            updated_at: Utc::now(),
            sending_until: None,
            ..Arc::unwrap_or_clone(claim)
        });
        let message = match self.records.run(outbound.clone()).await {
            Ok(recorded) => recorded.unwrap_or_else(|| Arc::unwrap_or_clone(outbound)),
            // The provider has answered: that is the answer, whatever PostgreSQL says now. An
            // error would have the caller try its next channel, and the consumer could get two
            // messages. The claim stands meanwhile (a retry of the id is not sent again), and the
            // outcome follows once PostgreSQL takes it.
            Err(error) => {
                tracing::warn!(%error, message_id = %outbound.message_id, "send's outcome not recorded; recording it when PostgreSQL takes it");
                self.detached
                    .spawn(record_later(self.records.clone(), outbound.clone()));
                Arc::unwrap_or_clone(outbound)
            }
        };
        tracing::info!(
            account_id = %message.account_id,
            message_id = %message.message_id,
            channel = channel.as_str_name(),
            to = %mask_phone(&r.to),
            stage = message.stage.as_str_name(),
            error_code = message.error_code.as_deref().unwrap_or(""),
            "message sent"
        );
        Ok(Response::new(pb::SendMessageResponse {
            message: Some(message.to_wire()),
        }))
    }
}

/// How long past the provider's budget a claim is held before a retry of its id may take it for
/// abandoned: the sender's own record of the outcome takes a moment after the provider answers.
const CLAIM_MARGIN: Duration = Duration::from_secs(2);

/// Deletes a claim its send gave up before calling the provider (PostgreSQL did not answer
/// whether it was made), trying for as long as the claim would otherwise hold.
async fn take_back(store: Arc<dyn GatewayStore>, claim: Arc<Outbound>) {
    let until = Instant::now() + RECORD_PERSISTENCE;
    let pauses =
        c2m_runtime::backoff::Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    for retry in 0.. {
        let pause = pauses.delay(retry);
        let deleted = store
            .take_back(&claim.message_id, claim.claimed_by.as_deref())
            .await;
        match deleted {
            Ok(_) => return,
            Err(error) if Instant::now() + pause < until => {
                tracing::debug!(%error, message_id = %claim.message_id, "unused claim not taken back yet");
                tokio::time::sleep(pause).await;
            }
            Err(error) => {
                tracing::error!(%error, message_id = %claim.message_id, "unused claim never taken back: it will read as unconfirmed");
                return;
            }
        }
    }
}

/// How long a sent message's record is offered to PostgreSQL before it is given up (logged).
const RECORD_PERSISTENCE: Duration = Duration::from_secs(300);

/// Records a message the provider took while PostgreSQL refused its record, offering it again
/// until it is written or [`RECORD_PERSISTENCE`] has passed.
async fn record_later(records: Batcher<messages::Records>, message: Arc<Outbound>) {
    let message_id = message.message_id.clone();
    let give_up = Instant::now() + RECORD_PERSISTENCE;
    let recorded = records
        .run_until(message, give_up, |error, _| {
            tracing::debug!(%error, %message_id, "message record refused again");
            metrics::metrics().message_record_retries.inc();
        })
        .await;
    match recorded {
        Ok(_) => tracing::info!(%message_id, "sent message recorded after all"),
        Err(error) => {
            tracing::error!(%error, %message_id, "sent message never recorded: its status webhooks will find nothing");
        }
    }
}
