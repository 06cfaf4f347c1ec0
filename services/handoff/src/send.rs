//! Sending a handoff's messages along its channels through the channel gateway, and what came of
//! it: shared by a new handoff, one finished after a crash, and a delivery fallback.

use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, FunnelStage};
use c2m_storage::outbox;
use chrono::Utc;
use tonic::Status;

use std::time::Duration;

use c2m_runtime::peers::Peers;

use crate::{
    model::Step,
    store::{Attempt, StoredHandoff},
};

/// Sends a handoff's messages through the channel gateway.
pub(crate) struct Sender {
    pub peers: Peers,
    /// `unconfirmed_fallback_ms`: how long a send its provider never answered waits for the
    /// provider's first report before the next channel is tried.
    pub unconfirmed_window: Duration,
}

/// Who a handoff's messages go to, and what they belong to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recipient<'a> {
    pub account_id: &'a str,
    pub handoff_id: &'a str,
    pub phone: &'a str,
    pub handoff_config_id: &'a str,
    pub skill_id: &'a str,
}

/// A funnel event about a handoff.
pub(crate) fn event(
    h: &StoredHandoff,
    stage: FunnelStage,
    channel: Channel,
    error_code: String,
) -> pb::Event {
    pb::Event {
        handoff_id: h.handoff_id.clone(),
        handoff_config_id: h.handoff_config_id.clone(),
        channel: channel.into(),
        skill_id: h.skill_id.clone(),
        ivr_number: h.ivr_number.clone(),
        error_code,
        ..outbox::event(&h.account_id, stage)
    }
}

/// Whether finishing a handoff may send messages it has not sent yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sends {
    /// Yes: the caller still waits for the text, or just did.
    Allowed,
    /// No: only messages already sent count (their ids are looked up, not sent); the call is
    /// long over and a first text now would come out of nowhere.
    KnownOnly,
}

/// What sending along a handoff's channels came to.
#[derive(Debug)]
pub(crate) enum Sending {
    /// A channel took the message (or may have: its attempt says unconfirmed), after the
    /// attempts before it failed.
    Sent {
        attempts: Vec<Attempt>,
        channel: Channel,
        text: String,
    },
    /// Every channel refused the message.
    Failed { attempts: Vec<Attempt> },
    /// The channel gateway could not say what became of a message: nothing is final.
    Interrupted { status: Status },
}

/// Whether a gateway's refusal leaves a message's fate unknown: it did not answer, its answer was
/// lost, or the message is still at its provider. Its other refusals (a bad request, a missing
/// credential) are answers: the message was not sent.
fn interrupts(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::Internal
    )
}

impl Sender {
    /// Sends along `steps` until a channel takes the message; attempts are numbered on from
    /// `earlier` (the attempts the handoff already made). Message ids are the handoff's own
    /// (`<handoff>-<n>`), and the gateway never sends an id twice: a retry that sends the same
    /// steps again gets the first sends' outcomes back, not new messages.
    pub(crate) async fn send(
        &self,
        to: &Recipient<'_>,
        steps: &[Step],
        earlier: usize,
        sends: Sends,
    ) -> Sending {
        let mut attempts = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let (channel, text) = (&step.channel, &step.text);
            let message_id = format!("{}-{}", to.handoff_id, earlier + i + 1);
            let result = if sends == Sends::KnownOnly {
                self.sent_before(to.account_id, &message_id).await
            } else {
                self.send_one(to, step, &message_id).await
            };
            let mut attempt = Attempt {
                channel: *channel,
                outcome: AttemptOutcome::Failed,
                message_id,
                provider_message_id: String::new(),
                error_code: String::new(),
                error_message: String::new(),
                at: Utc::now(),
            };
            match result {
                Ok(message) if message.stage() != FunnelStage::Failed => {
                    // An unanswered send may have reached the consumer: the next channel waits
                    // for the provider to tell (see `fallback`), not to risk a second message.
                    let outcome = if message.unconfirmed {
                        AttemptOutcome::Unconfirmed
                    } else {
                        AttemptOutcome::Sent
                    };
                    attempt.outcome = outcome;
                    attempt.provider_message_id = message.provider_message_id;
                    attempts.push(attempt);
                    return Sending::Sent {
                        attempts,
                        channel: *channel,
                        text: text.clone(),
                    };
                }
                Ok(message) => {
                    attempt.error_code = message.error_code;
                    attempt.error_message = message.error_message;
                }
                // The gateway may have sent the message (its answer was lost, it is still at
                // the provider) or not: nothing is final, and the next channel could message
                // the consumer twice. Whoever sends these steps again learns which.
                Err(status) if interrupts(&status) => {
                    tracing::warn!(
                        handoff_id = to.handoff_id,
                        channel = channel.as_str_name(),
                        %status,
                        "channel gateway did not answer; the handoff is not finished"
                    );
                    return Sending::Interrupted { status };
                }
                Err(status) => {
                    attempt.error_code = format!("grpc:{:?}", status.code());
                    attempt.error_message = status.message().to_owned();
                }
            }
            tracing::warn!(
                handoff_id = to.handoff_id,
                channel = channel.as_str_name(),
                error_code = %attempt.error_code,
                "channel failed, trying the next"
            );
            attempts.push(attempt);
        }
        Sending::Failed { attempts }
    }

    /// Sends one step's message under `message_id` (a repeat returns the first send).
    async fn send_one(
        &self,
        to: &Recipient<'_>,
        step: &Step,
        message_id: &str,
    ) -> Result<pb::OutboundMessage, Status> {
        self.peers
            .channel_gateway()
            .send_message(pb::SendMessageRequest {
                account_id: to.account_id.to_owned(),
                message_id: message_id.to_owned(),
                channel: step.channel.into(),
                to: to.phone.to_owned(),
                consumer_id: step
                    .push
                    .as_ref()
                    .map(|p| p.consumer_id.clone())
                    .unwrap_or_default(),
                push_title: step
                    .push
                    .as_ref()
                    .map(|p| p.title.clone())
                    .unwrap_or_default(),
                apple_messages_invite: step.apple.as_ref().map(|a| pb::AppleMessagesInvite {
                    business_id: a.business_id.clone(),
                    intent_id: a.intent_id.clone(),
                    group_id: a.group_id.clone(),
                    body: a.body.clone(),
                }),
                text: step.text.clone(),
                handoff_id: to.handoff_id.to_owned(),
                handoff_config_id: to.handoff_config_id.to_owned(),
                skill_id: to.skill_id.to_owned(),
                whatsapp_template: step.template.as_ref().map(|t| pb::WhatsAppTemplateMessage {
                    name: t.name.clone(),
                    language: t.language.clone(),
                    body_parameters: t.parameters.clone(),
                }),
                fresh_message_id: false,
                conversation_id: String::new(),
                media_urls: Vec::new(),
            })
            .await
            .map(|r| r.into_inner().message.unwrap_or_default())
    }

    /// The message sent before under `message_id`, as the gateway has it; a failed one (with
    /// `abandoned` for its code) when there is none: it was never sent.
    async fn sent_before(
        &self,
        account_id: &str,
        message_id: &str,
    ) -> Result<pb::OutboundMessage, Status> {
        match self
            .peers
            .channel_gateway()
            .get_message(pb::GetMessageRequest {
                account_id: account_id.to_owned(),
                message_id: message_id.to_owned(),
            })
            .await
        {
            Ok(found) => Ok(found.into_inner().message.unwrap_or_default()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(pb::OutboundMessage {
                stage: FunnelStage::Failed.into(),
                error_code: "abandoned".into(),
                error_message: "never sent: the handoff was left unfinished too long".into(),
                ..Default::default()
            }),
            Err(status) => Err(status),
        }
    }

    /// Until when the provider has to report on `attempt` before the next channel is tried, if
    /// its send went unanswered.
    pub(crate) fn confirm_by(
        &self,
        attempt: &Attempt,
        now: chrono::DateTime<Utc>,
    ) -> Option<chrono::DateTime<Utc>> {
        (attempt.outcome == AttemptOutcome::Unconfirmed)
            .then(|| chrono::Duration::from_std(self.unconfirmed_window).ok())
            .flatten()
            .map(|window| now + window)
    }
}
