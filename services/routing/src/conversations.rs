//! Conversations: opening one from a deflection when the consumer replies, or adding to the one
//! open. Every change is written to the conversation log in the same transaction.

use c2m_proto::v1::{self as pb, Channel, FunnelStage, conversation_event::Kind};
use c2m_storage::outbox;
use chrono::{DateTime, Utc};

use crate::store::{NewConversation, NewEntry, RoutingTx};

/// What an inbound message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Routed {
    pub conversation_id: String,
    pub opened: bool,
    pub handoff_id: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("no deflection to route a reply from {0} to")]
    NoDeflection(String),
    /// The consumer's latest deflection is on another channel than the reply: a newer one (a
    /// fallback to the reply's channel) may be on its way from Handoff.
    #[error("the latest deflection for {0} is on another channel than the reply")]
    OtherChannel(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub(crate) struct Inbound<'a> {
    pub account_id: &'a str,
    pub consumer: &'a str,
    pub channel: Channel,
    pub text: &'a str,
    pub provider_message_id: &'a str,
    pub received_at: DateTime<Utc>,
    pub lookback_hours: u32,
    /// Open the conversation from the latest deflection whatever its channel; otherwise a
    /// deflection on another channel than the reply's is [`RouteError::OtherChannel`].
    pub any_channel: bool,
}

/// Routes one inbound message inside `tx`: appended to the open conversation, or opening one from
/// the consumer's latest deflection within the lookback (its first message at the top of the
/// transcript, its engagement attributes attached, RESPONDED and CONVERSATION_OPENED in the outbox).
pub(crate) async fn route(tx: &mut dyn RoutingTx, m: &Inbound<'_>) -> Result<Routed, RouteError> {
    // Providers retry webhooks: a message already in a transcript is routed already.
    if !m.provider_message_id.is_empty()
        && let Some((conversation_id, handoff_id)) = tx.routed(m.provider_message_id).await?
    {
        return Ok(Routed {
            conversation_id,
            opened: false,
            handoff_id: handoff_id.unwrap_or_default(),
        });
    }

    if let Some(open) = tx.open_conversation(m.account_id, m.consumer).await? {
        let entry = tx
            .append(&open.conversation_id, &NewEntry::inbound(m))
            .await?;
        let logged = event(
            m.account_id,
            &open.conversation_id,
            &open.skill_id,
            Kind::Message(entry),
        );
        tx.log(m.account_id, &[logged]).await?;
        return Ok(Routed {
            conversation_id: open.conversation_id,
            opened: false,
            handoff_id: open.handoff_id.unwrap_or_default(),
        });
    }

    let since = m.received_at - chrono::Duration::hours(i64::from(m.lookback_hours));
    let deflection = tx
        .latest_deflection(m.account_id, m.consumer, since)
        .await?
        .ok_or_else(|| RouteError::NoDeflection(c2m_runtime::mask_phone(m.consumer)))?;
    if !m.any_channel
        && m.channel != Channel::Unspecified
        && deflection.channel != m.channel.as_str_name()
    {
        return Err(RouteError::OtherChannel(c2m_runtime::mask_phone(
            m.consumer,
        )));
    }
    let conversation_id = c2m_runtime::ids::generate("conv");
    tx.open(&NewConversation {
        conversation_id: &conversation_id,
        account_id: m.account_id,
        consumer_address: m.consumer,
        channel: &deflection.channel,
        skill_id: &deflection.skill_id,
        handoff_id: &deflection.handoff_id,
        handoff_config_id: &deflection.handoff_config_id,
        engagement_attributes: &deflection.engagement_attributes,
        opened_at: m.received_at,
    })
    .await?;
    let first = NewEntry {
        direction: "OUTBOUND",
        author: "deflection",
        text: &deflection.first_message,
        provider_message_id: "",
        at: deflection.sent_at,
        ..NewEntry::default()
    };
    tx.append(&conversation_id, &first).await?;
    tx.append(&conversation_id, &NewEntry::inbound(m)).await?;

    let channel = Channel::from_str_name(&deflection.channel).unwrap_or(m.channel);
    let base = |stage| pb::Event {
        handoff_id: deflection.handoff_id.clone(),
        handoff_config_id: deflection.handoff_config_id.clone(),
        channel: channel as i32,
        skill_id: deflection.skill_id.clone(),
        conversation_id: conversation_id.clone(),
        ivr_number: deflection.ivr_number.clone(),
        ..outbox::event(m.account_id, stage)
    };
    tx.enqueue(&[
        base(FunnelStage::Responded),
        base(FunnelStage::ConversationOpened),
    ])
    .await?;
    let opened = tx
        .load(m.account_id, &conversation_id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    let logged = event(
        m.account_id,
        &conversation_id,
        &deflection.skill_id,
        Kind::Opened(opened),
    );
    tx.log(m.account_id, &[logged]).await?;
    Ok(Routed {
        conversation_id,
        opened: true,
        handoff_id: deflection.handoff_id,
    })
}

impl<'a> NewEntry<'a> {
    fn inbound(m: &'a Inbound<'a>) -> Self {
        Self {
            direction: "INBOUND",
            author: "consumer",
            text: m.text,
            provider_message_id: m.provider_message_id,
            at: m.received_at,
            ..Self::default()
        }
    }
}

/// An event of a conversation, happening now.
pub(crate) fn event(
    account_id: &str,
    conversation_id: &str,
    skill_id: &str,
    kind: Kind,
) -> pb::ConversationEvent {
    pb::ConversationEvent {
        cursor: String::new(),
        conversation_id: conversation_id.to_owned(),
        account_id: account_id.to_owned(),
        skill_id: skill_id.to_owned(),
        at: Some(c2m_proto::timestamp(Utc::now())),
        kind: Some(kind),
    }
}
