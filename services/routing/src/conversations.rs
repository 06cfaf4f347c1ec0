//! Conversations in PostgreSQL: opening one from a deflection when the consumer replies.

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_storage::outbox;
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgConnection, Row};

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
pub(crate) async fn route(tx: &mut PgConnection, m: &Inbound<'_>) -> Result<Routed, RouteError> {
    // Providers retry webhooks: a message already in a transcript is routed already.
    if !m.provider_message_id.is_empty() {
        let seen = sqlx::query(
            "SELECT c.conversation_id, c.handoff_id FROM transcript_entries t \
             JOIN conversations c USING (conversation_id) WHERE t.provider_message_id = $1",
        )
        .bind(m.provider_message_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = seen {
            return Ok(Routed {
                conversation_id: row.try_get("conversation_id")?,
                opened: false,
                handoff_id: row
                    .try_get::<Option<String>, _>("handoff_id")?
                    .unwrap_or_default(),
            });
        }
    }

    let open = sqlx::query(
        "SELECT conversation_id, handoff_id FROM conversations \
         WHERE account_id = $1 AND consumer_address = $2 AND closed_at IS NULL FOR UPDATE",
    )
    .bind(m.account_id)
    .bind(m.consumer)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = open {
        let conversation_id: String = row.try_get("conversation_id")?;
        append(
            tx,
            &conversation_id,
            "INBOUND",
            m.text,
            m.provider_message_id,
            m.received_at,
        )
        .await?;
        return Ok(Routed {
            conversation_id,
            opened: false,
            handoff_id: row
                .try_get::<Option<String>, _>("handoff_id")?
                .unwrap_or_default(),
        });
    }

    let deflection = sqlx::query(
        "SELECT handoff_id, handoff_config_id, ivr_number, channel, skill_id, first_message, \
         engagement_attributes, sent_at FROM deflections \
         WHERE account_id = $1 AND consumer_phone = $2 AND sent_at >= $3 \
         ORDER BY sent_at DESC LIMIT 1",
    )
    .bind(m.account_id)
    .bind(m.consumer)
    .bind(m.received_at - chrono::Duration::hours(i64::from(m.lookback_hours)))
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| RouteError::NoDeflection(c2m_runtime::mask_phone(m.consumer)))?;

    let channel: String = deflection.try_get("channel")?;
    if !m.any_channel && m.channel != Channel::Unspecified && channel != m.channel.as_str_name() {
        return Err(RouteError::OtherChannel(c2m_runtime::mask_phone(
            m.consumer,
        )));
    }
    let handoff_id: String = deflection.try_get("handoff_id")?;
    let skill_id: String = deflection.try_get("skill_id")?;
    let handoff_config_id: String = deflection.try_get("handoff_config_id")?;
    let conversation_id = c2m_runtime::ids::generate("conv");
    sqlx::query(
        "INSERT INTO conversations (conversation_id, account_id, consumer_address, channel, skill_id, \
         handoff_id, handoff_config_id, engagement_attributes, opened_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&conversation_id)
    .bind(m.account_id)
    .bind(m.consumer)
    .bind(&channel)
    .bind(&skill_id)
    .bind(&handoff_id)
    .bind(&handoff_config_id)
    .bind(deflection.try_get::<Vec<u8>, _>("engagement_attributes")?)
    .bind(m.received_at)
    .execute(&mut *tx)
    .await?;
    let first: String = deflection.try_get("first_message")?;
    let sent_at: DateTime<Utc> = deflection.try_get("sent_at")?;
    append(tx, &conversation_id, "OUTBOUND", &first, "", sent_at).await?;
    append(
        tx,
        &conversation_id,
        "INBOUND",
        m.text,
        m.provider_message_id,
        m.received_at,
    )
    .await?;

    let channel = Channel::from_str_name(&channel).unwrap_or(m.channel);
    let base = |stage| pb::Event {
        handoff_id: handoff_id.clone(),
        handoff_config_id: handoff_config_id.clone(),
        channel: channel as i32,
        skill_id: skill_id.clone(),
        conversation_id: conversation_id.clone(),
        ivr_number: deflection.try_get("ivr_number").unwrap_or_default(),
        ..outbox::event(m.account_id, stage)
    };
    outbox::enqueue(
        tx,
        &[
            base(FunnelStage::Responded),
            base(FunnelStage::ConversationOpened),
        ],
    )
    .await?;
    Ok(Routed {
        conversation_id,
        opened: true,
        handoff_id,
    })
}

async fn append(
    tx: &mut PgConnection,
    conversation_id: &str,
    direction: &str,
    text: &str,
    provider_message_id: &str,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO transcript_entries (conversation_id, seq, direction, text, provider_message_id, at) \
         SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, nullif($4, ''), $5 \
         FROM transcript_entries WHERE conversation_id = $1",
    )
    .bind(conversation_id)
    .bind(direction)
    .bind(text)
    .bind(provider_message_id)
    .bind(at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// A conversation with its transcript.
pub(crate) async fn load(
    conn: &mut PgConnection,
    account_id: &str,
    conversation_id: &str,
) -> Result<Option<pb::Conversation>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT conversation_id, account_id, skill_id, channel, handoff_id, engagement_attributes, \
         opened_at, closed_at FROM conversations WHERE account_id = $1 AND conversation_id = $2",
    )
    .bind(account_id)
    .bind(conversation_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let entries = sqlx::query(
        "SELECT direction, text, at FROM transcript_entries WHERE conversation_id = $1 ORDER BY seq",
    )
    .bind(conversation_id)
    .fetch_all(&mut *conn)
    .await?;
    let closed_at: Option<DateTime<Utc>> = row.try_get("closed_at")?;
    let attributes: Vec<u8> = row.try_get("engagement_attributes")?;
    Ok(Some(pb::Conversation {
        conversation_id: row.try_get("conversation_id")?,
        account_id: row.try_get("account_id")?,
        skill_id: row.try_get("skill_id")?,
        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?).unwrap_or_default()
            as i32,
        handoff_id: row
            .try_get::<Option<String>, _>("handoff_id")?
            .unwrap_or_default(),
        state: if closed_at.is_some() {
            pb::ConversationState::Closed
        } else {
            pb::ConversationState::Open
        } as i32,
        engagement_attributes: pb::EngagementAttributes::decode(attributes.as_slice()).ok(),
        transcript: entries
            .iter()
            .map(|e| -> Result<pb::TranscriptEntry, sqlx::Error> {
                Ok(pb::TranscriptEntry {
                    direction: match e.try_get::<String, _>("direction")?.as_str() {
                        "OUTBOUND" => pb::TranscriptDirection::Outbound,
                        _ => pb::TranscriptDirection::Inbound,
                    } as i32,
                    text: e.try_get("text")?,
                    at: Some(c2m_proto::timestamp(e.try_get("at")?)),
                })
            })
            .collect::<Result<_, _>>()?,
        opened_at: Some(c2m_proto::timestamp(row.try_get("opened_at")?)),
        closed_at: closed_at.map(c2m_proto::timestamp),
    }))
}
