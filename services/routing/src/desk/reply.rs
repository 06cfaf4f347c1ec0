//! An agent's or bot's message to the consumer. The transcript entry is written first (no stage:
//! under way) with the gateway message id it will be sent under, then the gateway sends it, then
//! its outcome is written. A crash or a lost answer in between leaves the entry under way; the
//! client's retry with the same `client_message_id` sends under the same message id, which the
//! gateway answers from its records: the consumer gets the message once.

use c2m_proto::v1::{self as pb, Channel, FunnelStage, conversation_event::Kind};
use c2m_runtime::{auth::ConversationAccess, ids, status::FieldViolations};
use c2m_storage::outbox;
use chrono::{DateTime, Utc};
use tonic::Status;

use super::{DeskError, store};
use crate::{
    Service, conversations,
    store::{NewEntry, RoutingTx},
};

/// The longest client message id.
const MAX_CLIENT_ID: usize = 64;
/// The most body parameters of a WhatsApp template, and the longest one.
const MAX_TEMPLATE_PARAMETERS: usize = 10;
const MAX_TEMPLATE_PARAMETER: usize = 1024;
/// WhatsApp's customer-service window after the consumer's last message.
const WINDOW_HOURS: i64 = 24;

/// The most characters a channel carries in one message.
fn text_limit(channel: Channel) -> usize {
    match channel {
        Channel::Sms | Channel::AppleMessages => 1600,
        Channel::Whatsapp => 4096,
        Channel::Rcs => 3072,
        Channel::AppMessaging | Channel::Unspecified => 1024,
    }
}

fn validate(r: &pb::SendConversationMessageRequest, channel: Channel) -> Result<(), Status> {
    let mut violations = FieldViolations::new();
    let id = &r.client_message_id;
    if id.is_empty() || id.len() > MAX_CLIENT_ID {
        violations.add(
            "client_message_id",
            format!("required, at most {MAX_CLIENT_ID} characters"),
        );
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        violations.add("client_message_id", "letters, digits and -_.: only");
    }
    let limit = text_limit(channel);
    if r.text.chars().count() > limit {
        violations.add(
            "text",
            format!("at most {limit} characters on {}", channel.as_str_name()),
        );
    }
    match &r.whatsapp_template {
        Some(_) if channel != Channel::Whatsapp => violations.add(
            "whatsapp_template",
            format!(
                "only for CHANNEL_WHATSAPP; this conversation is on {}",
                channel.as_str_name()
            ),
        ),
        Some(t) => {
            if t.name.is_empty() || t.name.len() > 512 {
                violations.add("whatsapp_template.name", "required, at most 512 characters");
            }
            if t.language.is_empty() || t.language.len() > 16 {
                violations.add(
                    "whatsapp_template.language",
                    "required (e.g. en_US), at most 16 characters",
                );
            }
            if t.body_parameters.len() > MAX_TEMPLATE_PARAMETERS {
                violations.add(
                    "whatsapp_template.body_parameters",
                    format!("at most {MAX_TEMPLATE_PARAMETERS}"),
                );
            }
            for (i, p) in t.body_parameters.iter().enumerate() {
                if p.chars().count() > MAX_TEMPLATE_PARAMETER {
                    violations.add(
                        format!("whatsapp_template.body_parameters[{i}]"),
                        format!("at most {MAX_TEMPLATE_PARAMETER} characters"),
                    );
                }
            }
        }
        None if r.text.trim().is_empty() && r.media_urls.is_empty() => {
            violations.add("text", "required")
        }
        None => {}
    }
    c2m_runtime::media::check(&mut violations, channel, &r.text, &r.media_urls);
    if matches!(channel, Channel::AppleMessages | Channel::AppMessaging) {
        violations.add(
            "conversation_id",
            format!("replies on {} are not supported yet", channel.as_str_name()),
        );
    }
    violations.into_result()
}

/// What the transcript shows of a template message.
fn shown_text(r: &pb::SendConversationMessageRequest) -> String {
    match &r.whatsapp_template {
        Some(t) if r.text.is_empty() => format!("[template {} ({})]", t.name, t.language),
        _ => r.text.clone(),
    }
}

/// Sends `r` as `access`'s message; the transcript entry as it stands after the send.
pub(crate) async fn send(
    service: &Service,
    access: &ConversationAccess,
    r: &pb::SendConversationMessageRequest,
) -> Result<pb::TranscriptEntry, DeskError> {
    let mut tx = service.store.begin().await?;
    let conversation = store::locked(
        &mut *tx,
        &r.account_id,
        &r.conversation_id,
        access.skills.as_deref(),
    )
    .await?;
    let channel = Channel::try_from(conversation.channel).unwrap_or_default();
    validate(r, channel)?;
    let text = shown_text(r);
    let entry = match tx.earlier(&r.conversation_id, &r.client_message_id).await? {
        // Sent before: the same message, answered as it stands.
        Some((entry, _)) if entry.text != text || entry.media_urls != r.media_urls => {
            return Err(Status::already_exists(format!(
                "client_message_id {} was used for another message in this conversation",
                r.client_message_id
            ))
            .into());
        }
        Some((entry, _)) if entry.stage != FunnelStage::Unspecified as i32 => return Ok(entry),
        // Under way, and its send may still be at the provider: sending again now could reach
        // the consumer twice (the gateway knows the id only once the provider has answered).
        Some((_, Some(until))) if until > Utc::now() => {
            let wait = (until - Utc::now()).to_std().unwrap_or_default();
            return Err(c2m_runtime::status::aborted_retry(
                format!(
                    "message {} is being sent; retry after its send has had its answer",
                    r.client_message_id
                ),
                wait,
            )
            .into());
        }
        // Under way since a send whose outcome was never written (a crash): send it again under
        // its id, which the gateway answers from its record if the provider had taken it.
        Some((entry, _)) => {
            tx.sending(
                &r.conversation_id,
                entry.seq,
                Utc::now() + service.send_lease,
            )
            .await?;
            entry
        }
        None => {
            if conversation.state == pb::ConversationState::Closed as i32 {
                return Err(DeskError::Closed(r.conversation_id.clone()));
            }
            if channel == Channel::Whatsapp && r.whatsapp_template.is_none() {
                window_open(service, &mut *tx, &conversation).await?;
            }
            let message_id = ids::generate("msg");
            let entry = tx
                .append(
                    &r.conversation_id,
                    &NewEntry {
                        direction: "OUTBOUND",
                        author: &access.actor,
                        text: &text,
                        message_id: Some(&message_id),
                        client_message_id: Some(&r.client_message_id),
                        media_urls: &r.media_urls,
                        at: Utc::now(),
                        sending_until: Some(Utc::now() + service.send_lease),
                        ..NewEntry::default()
                    },
                )
                .await?;
            let event = conversations::event(
                &r.account_id,
                &r.conversation_id,
                &conversation.skill_id,
                Kind::Message(entry.clone()),
            );
            tx.log(&r.account_id, &[event]).await?;
            entry
        }
    };
    tx.commit().await?;

    let sent = service
        .peers
        .channel_gateway()
        .send_message(pb::SendMessageRequest {
            account_id: r.account_id.clone(),
            message_id: entry.message_id.clone(),
            channel: channel as i32,
            to: conversation.consumer_address.clone(),
            text: r.text.clone(),
            whatsapp_template: r.whatsapp_template.clone(),
            media_urls: r.media_urls.clone(),
            skill_id: conversation.skill_id.clone(),
            conversation_id: r.conversation_id.clone(),
            ..Default::default()
        })
        .await
        .map_err(|status| {
            tracing::warn!(%status, conversation_id = %r.conversation_id, message_id = %entry.message_id, "reply not sent: the gateway did not answer");
            Status::unavailable(format!(
                "the message could not be handed to the gateway ({}); retry with the same client_message_id",
                status.message()
            ))
        })?
        .into_inner()
        .message
        .ok_or_else(|| Status::internal("the gateway answered without its message"))?;
    let stage = FunnelStage::try_from(sent.stage).unwrap_or(FunnelStage::Sent);
    let entry = service
        .record_stage(&pb::MessageStage {
            account_id: r.account_id.clone(),
            message_id: entry.message_id.clone(),
            stage: stage as i32,
            error_code: sent.error_code,
            at: sent.updated_at,
        })
        .await?
        .unwrap_or(entry);
    Ok(entry)
}

/// WhatsApp free text goes only inside the customer-service window: 24 hours from the consumer's
/// last message, as the gateway tracks it from Meta's webhooks.
async fn window_open(
    service: &Service,
    tx: &mut dyn RoutingTx,
    conversation: &pb::Conversation,
) -> Result<(), DeskError> {
    let window = service
        .peers
        .channel_gateway()
        .check_reachability(pb::CheckReachabilityRequest {
            account_id: conversation.account_id.clone(),
            channel: Channel::Whatsapp as i32,
            phone: conversation.consumer_address.clone(),
            consumer_id: String::new(),
        })
        .await
        .map_err(|status| {
            Status::unavailable(format!(
                "cannot learn whether the WhatsApp window is open ({}); retry",
                status.message()
            ))
        })?
        .into_inner();
    if window.reachable {
        return Ok(());
    }
    let last: Option<DateTime<Utc>> = tx.last_inbound(&conversation.conversation_id).await?;
    let closed = match last {
        Some(last) => format!(
            "it closed at {} ({WINDOW_HOURS} hours after the consumer's last message)",
            (last + chrono::Duration::hours(WINDOW_HOURS)).to_rfc3339()
        ),
        None => "the consumer has not written in the last 24 hours".to_owned(),
    };
    Err(c2m_runtime::status::with_reason(
        tonic::Code::FailedPrecondition,
        format!(
            "the WhatsApp customer-service window is closed: {closed}; send an approved template (whatsapp_template) instead"
        ),
        "WHATSAPP_WINDOW_CLOSED",
        last.map(|l| (
            "closed_at",
            (l + chrono::Duration::hours(WINDOW_HOURS)).to_rfc3339(),
        )),
    )
    .into())
}

impl Service {
    /// Moves an outbound entry to the reported stage if that is further than it got (stages only
    /// move forward; FAILED ends the way), logging the change; the first agent or bot message
    /// that goes out counts the conversation ANSWERED. The entry as it stands after; `None` for
    /// a message no conversation of the account sent.
    pub(crate) async fn record_stage(
        &self,
        s: &pb::MessageStage,
    ) -> Result<Option<pb::TranscriptEntry>, sqlx::Error> {
        let stage = FunnelStage::try_from(s.stage).unwrap_or_default();
        let mut tx = self.store.begin().await?;
        let Some(sent) = tx.sent(&s.account_id, &s.message_id).await? else {
            return Ok(None);
        };
        let was = FunnelStage::try_from(sent.entry.stage).unwrap_or_default();
        if stage.delivery_rank() <= was.delivery_rank() || was == FunnelStage::Failed {
            return Ok(Some(sent.entry));
        }
        let entry = tx.set_stage(&s.message_id, stage, &s.error_code).await?;
        let answered = was == FunnelStage::Unspecified
            && stage != FunnelStage::Failed
            && !tx.answered_before(&sent.conversation_id, entry.seq).await?;
        if answered {
            let delay = (Utc::now() - sent.opened_at).num_milliseconds().max(0);
            let funnel = pb::Event {
                conversation_id: sent.conversation_id.clone(),
                handoff_id: sent.handoff_id.clone(),
                skill_id: sent.skill_id.clone(),
                channel: sent.channel as i32,
                response_delay_ms: u64::try_from(delay).unwrap_or_default(),
                ..outbox::event(&s.account_id, FunnelStage::Answered)
            };
            tx.enqueue(&[funnel]).await?;
        }
        let event = conversations::event(
            &s.account_id,
            &sent.conversation_id,
            &sent.skill_id,
            Kind::MessageStage(entry.clone()),
        );
        tx.log(&s.account_id, &[event]).await?;
        tx.commit().await?;
        if answered {
            self.relay.wake();
        }
        Ok(Some(entry))
    }
}
