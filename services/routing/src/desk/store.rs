//! The statements behind ConversationService: listing, and the changes that lock a conversation,
//! check it, change it and log the change in one transaction.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_proto::v1::{self as pb, Channel, FunnelStage, conversation_event::Kind};
use c2m_runtime::{auth::ConversationAccess, is_e164, status::FieldViolations};
use c2m_storage::outbox;
use chrono::{DateTime, Utc};
use tonic::Status;

use super::{DeskError, MAX_ID, id};
use crate::{
    Service, conversations,
    store::{Listing, RoutingStore, RoutingTx},
};

impl Listing {
    pub fn from_wire(
        r: &pb::ListConversationsRequest,
        access: &ConversationAccess,
    ) -> Result<Self, Status> {
        let mut violations = FieldViolations::new();
        let optional = |violations: &mut FieldViolations, field: &str, value: &str| {
            if value.is_empty() {
                return None;
            }
            id(violations, field, value);
            Some(value.to_owned())
        };
        let open = match pb::ConversationState::try_from(r.state) {
            Ok(pb::ConversationState::Unspecified) => None,
            Ok(pb::ConversationState::Open) => Some(true),
            Ok(pb::ConversationState::Closed) => Some(false),
            Err(_) => {
                violations.add("state", format!("{} is not a conversation state", r.state));
                None
            }
        };
        let channel = match Channel::try_from(r.channel) {
            Ok(Channel::Unspecified) => None,
            Ok(channel) => Some(channel),
            Err(_) => {
                violations.add("channel", format!("{} is not a channel", r.channel));
                None
            }
        };
        if !r.consumer_phone.is_empty() && !is_e164(&r.consumer_phone) {
            violations.add("consumer_phone", "an E.164 number");
        }
        let after = match r.page_token.as_str() {
            "" => None,
            token => {
                let after = page_position(token);
                if after.is_none() {
                    violations.add("page_token", "not a token this service gave out");
                }
                after
            }
        };
        let listing = Self {
            account_id: r.account_id.clone(),
            open,
            skill_id: optional(&mut violations, "skill_id", &r.skill_id),
            skills: access.skills.clone(),
            channel,
            consumer: Some(r.consumer_phone.clone()).filter(|p| !p.is_empty()),
            assignee: optional(&mut violations, "assignee", &r.assignee),
            opened_after: r.opened_after.as_ref().and_then(c2m_proto::from_timestamp),
            after,
            limit: match r.page_size {
                n if n <= 0 => 50,
                n => i64::from(n.min(100)),
            },
        };
        if r.opened_after.is_some() && listing.opened_after.is_none() {
            violations.add("opened_after", "not a valid timestamp");
        }
        violations.into_result()?;
        Ok(listing)
    }
}

/// Page tokens are the last conversation's opening time (microseconds) and id.
fn page_token(conversation: &pb::Conversation) -> String {
    let opened = conversation
        .opened_at
        .as_ref()
        .and_then(c2m_proto::from_timestamp)
        .map_or(0, |t| t.timestamp_micros());
    URL_SAFE_NO_PAD.encode(format!("{opened}:{}", conversation.conversation_id))
}

fn page_position(token: &str) -> Option<(DateTime<Utc>, String)> {
    let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
    let (micros, id) = text.split_once(':')?;
    let at = DateTime::from_timestamp_micros(micros.parse().ok()?)?;
    (!id.is_empty() && id.len() <= MAX_ID).then(|| (at, id.to_owned()))
}

/// A page of conversations, newest first, and the token of the next page.
pub(crate) async fn list(
    store: &dyn RoutingStore,
    l: &Listing,
) -> Result<(Vec<pb::Conversation>, String), sqlx::Error> {
    let page = store.conversations(l).await?;
    let next = match page.last() {
        Some(last) if page.len() as i64 == l.limit => page_token(last),
        _ => String::new(),
    };
    Ok((page, next))
}

/// A conversation locked for a change inside `tx`, if the caller may see it.
pub(crate) async fn locked(
    tx: &mut dyn RoutingTx,
    account_id: &str,
    conversation_id: &str,
    skills: Option<&[String]>,
) -> Result<pb::Conversation, DeskError> {
    tx.lock(account_id, conversation_id)
        .await?
        .filter(|c| skills.is_none_or(|skills| skills.contains(&c.skill_id)))
        .ok_or_else(|| DeskError::NotFound(conversation_id.to_owned()))
}

/// Who holds a conversation, and which skill's it is.
pub(crate) enum Assignment<'a> {
    /// To `assignee`, from `from` (`None`: from the queue).
    Assign {
        assignee: &'a str,
        from: Option<&'a str>,
    },
    /// Back to the skill's queue.
    Release,
    /// To another skill's queue.
    Transfer { to: &'a str },
}

/// Changes who holds a conversation or which skill it is on. Concurrent changes of one
/// conversation wait for each other on its row, so of two claims exactly one finds it free.
pub(crate) async fn change(
    service: &Service,
    account_id: &str,
    conversation_id: &str,
    access: &ConversationAccess,
    assignment: Assignment<'_>,
) -> Result<pb::Conversation, DeskError> {
    let mut tx = service.store.begin().await?;
    let current = locked(
        &mut *tx,
        account_id,
        conversation_id,
        access.skills.as_deref(),
    )
    .await?;
    if current.state == pb::ConversationState::Closed as i32 {
        return Err(DeskError::Closed(conversation_id.to_owned()));
    }
    let holder = Some(current.assignee.as_str()).filter(|h| !h.is_empty());
    let (assignee, skill_id, kind) = match assignment {
        Assignment::Assign { assignee, .. } if holder == Some(assignee) => {
            return Ok(current);
        }
        Assignment::Assign { assignee, from } => {
            if holder != from {
                return Err(DeskError::Assigned {
                    id: conversation_id.to_owned(),
                    holder: holder
                        .unwrap_or("nobody (it is in its skill's queue)")
                        .to_owned(),
                });
            }
            let kind = Kind::Assigned(pb::ConversationAssigned {
                assignee: assignee.to_owned(),
                previous_assignee: current.assignee.clone(),
            });
            (Some(assignee), current.skill_id.as_str(), kind)
        }
        Assignment::Release => {
            let Some(holder) = holder else {
                return Ok(current);
            };
            if holder != access.actor && !access.supervise {
                return Err(DeskError::Assigned {
                    id: conversation_id.to_owned(),
                    holder: holder.to_owned(),
                });
            }
            let kind = Kind::Released(pb::ConversationReleased {
                previous_assignee: holder.to_owned(),
            });
            (None, current.skill_id.as_str(), kind)
        }
        Assignment::Transfer { to } if to == current.skill_id => return Ok(current),
        Assignment::Transfer { to } => {
            let kind = Kind::Transferred(pb::ConversationTransferred {
                from_skill_id: current.skill_id.clone(),
                to_skill_id: to.to_owned(),
                by: access.actor.clone(),
            });
            (None, to, kind)
        }
    };
    let transferred = matches!(kind, Kind::Transferred(_));
    if transferred {
        let funnel = pb::Event {
            conversation_id: conversation_id.to_owned(),
            handoff_id: current.handoff_id.clone(),
            channel: current.channel,
            skill_id: skill_id.to_owned(),
            source: access.actor.clone(),
            ..outbox::event(account_id, FunnelStage::ConversationTransferred)
        };
        tx.enqueue(&[funnel]).await?;
    }
    tx.assign(conversation_id, assignee, skill_id).await?;
    let event = conversations::event(account_id, conversation_id, skill_id, kind);
    tx.log(account_id, &[event]).await?;
    let changed = tx
        .load(account_id, conversation_id)
        .await?
        .ok_or_else(|| DeskError::NotFound(conversation_id.to_owned()))?;
    tx.commit().await?;
    if transferred {
        service.relay.wake();
    }
    Ok(changed)
}

/// A conversation to close.
pub(crate) struct Closing<'a> {
    pub account_id: &'a str,
    pub conversation_id: &'a str,
    pub reason: &'a str,
    pub by: &'a str,
    /// The closer's skills, when it is limited to some.
    pub skills: Option<&'a [String]>,
    /// Close only if no message came after this time (the idle closer's guard against a reply
    /// arriving while it decides).
    pub idle_since: Option<DateTime<Utc>>,
}

impl Service {
    /// Closes a conversation and releases the consumer's open-conversation lease at once; `None`
    /// when there is no such conversation for the closer. A closed one is returned as it is; one
    /// that moved since `idle_since` too, open.
    pub(crate) async fn close(
        &self,
        c: Closing<'_>,
    ) -> Result<Option<pb::Conversation>, DeskError> {
        let mut tx = self.store.begin().await?;
        let current = match locked(&mut *tx, c.account_id, c.conversation_id, c.skills).await {
            Ok(current) => current,
            Err(DeskError::NotFound(_)) => return Ok(None),
            Err(error) => return Err(error),
        };
        let stale = c.idle_since.is_some_and(|since| {
            current
                .last_message_at
                .as_ref()
                .and_then(c2m_proto::from_timestamp)
                .is_some_and(|last| last > since)
        });
        if current.state == pb::ConversationState::Closed as i32 || stale {
            return Ok(Some(current));
        }
        tx.close(c.conversation_id, c.reason).await?;
        let funnel = pb::Event {
            conversation_id: c.conversation_id.to_owned(),
            channel: current.channel,
            skill_id: current.skill_id.clone(),
            handoff_id: current.handoff_id.clone(),
            source: c.reason.to_owned(),
            ..outbox::event(c.account_id, FunnelStage::ConversationClosed)
        };
        tx.enqueue(&[funnel]).await?;
        let event = conversations::event(
            c.account_id,
            c.conversation_id,
            &current.skill_id,
            Kind::Closed(pb::ConversationClosed {
                reason: c.reason.to_owned(),
                by: c.by.to_owned(),
            }),
        );
        tx.log(c.account_id, &[event]).await?;
        let closed = tx.load(c.account_id, c.conversation_id).await?;
        tx.commit().await?;
        self.set_lease(c.account_id, &current.consumer_address, None)
            .await;
        self.relay.wake();
        tracing::info!(
            account_id = c.account_id,
            conversation_id = c.conversation_id,
            reason = c.reason,
            "conversation closed"
        );
        Ok(closed)
    }
}
