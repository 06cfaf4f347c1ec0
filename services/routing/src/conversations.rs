//! Conversations in PostgreSQL: opening one from a deflection when the consumer replies, adding
//! to its transcript, and reading it back. Every change is written to the conversation log in
//! the same transaction.

use c2m_proto::v1::{self as pb, Channel, FunnelStage, conversation_event::Kind};
use c2m_storage::outbox;
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgConnection, Row, postgres::PgRow};

use crate::log;

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
        "SELECT conversation_id, handoff_id, skill_id FROM conversations \
         WHERE account_id = $1 AND consumer_address = $2 AND closed_at IS NULL FOR UPDATE",
    )
    .bind(m.account_id)
    .bind(m.consumer)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = open {
        let conversation_id: String = row.try_get("conversation_id")?;
        let entry = append(tx, &conversation_id, &NewEntry::inbound(m)).await?;
        let skill_id: String = row.try_get("skill_id")?;
        log::append(
            tx,
            m.account_id,
            &[event(
                m.account_id,
                &conversation_id,
                &skill_id,
                Kind::Message(entry),
            )],
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
    let first = NewEntry {
        direction: "OUTBOUND",
        author: "deflection",
        text: &deflection.try_get::<String, _>("first_message")?,
        provider_message_id: "",
        at: deflection.try_get("sent_at")?,
        ..NewEntry::default()
    };
    append(tx, &conversation_id, &first).await?;
    append(tx, &conversation_id, &NewEntry::inbound(m)).await?;

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
    let opened = load(tx, m.account_id, &conversation_id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    log::append(
        tx,
        m.account_id,
        &[event(
            m.account_id,
            &conversation_id,
            &skill_id,
            Kind::Opened(opened),
        )],
    )
    .await?;
    Ok(Routed {
        conversation_id,
        opened: true,
        handoff_id,
    })
}

/// A transcript entry to add.
#[derive(Debug, Default)]
pub(crate) struct NewEntry<'a> {
    /// `INBOUND` or `OUTBOUND`.
    pub direction: &'a str,
    pub author: &'a str,
    pub text: &'a str,
    pub provider_message_id: &'a str,
    pub message_id: Option<&'a str>,
    pub client_message_id: Option<&'a str>,
    pub media_urls: &'a [String],
    pub at: DateTime<Utc>,
    /// Outbound entries about to be sent: until when the send may still be at the provider.
    pub sending_until: Option<DateTime<Utc>>,
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

/// The columns a transcript entry is read from.
pub(crate) const ENTRY_COLUMNS: &str = "seq, direction, text, at, author, message_id, \
    client_message_id, stage, error_code, media_urls";

/// Adds an entry at the end of the transcript and marks the conversation's last message.
pub(crate) async fn append(
    tx: &mut PgConnection,
    conversation_id: &str,
    entry: &NewEntry<'_>,
) -> Result<pb::TranscriptEntry, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO transcript_entries (conversation_id, seq, direction, text, \
             provider_message_id, at, author, message_id, client_message_id, media_urls, \
             sending_until) \
         SELECT $1, coalesce(max(seq), 0) + 1, $2, $3, nullif($4, ''), $5, $6, $7, $8, $9, $10 \
         FROM transcript_entries WHERE conversation_id = $1 \
         RETURNING {ENTRY_COLUMNS}"
    )))
    .bind(conversation_id)
    .bind(entry.direction)
    .bind(entry.text)
    .bind(entry.provider_message_id)
    .bind(entry.at)
    .bind(entry.author)
    .bind(entry.message_id)
    .bind(entry.client_message_id)
    .bind(entry.media_urls)
    .bind(entry.sending_until)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE conversations SET last_message_at = greatest(last_message_at, $2) \
         WHERE conversation_id = $1",
    )
    .bind(conversation_id)
    .bind(entry.at)
    .execute(&mut *tx)
    .await?;
    transcript_entry(&row)
}

/// A transcript entry as its row reads ([`ENTRY_COLUMNS`]).
pub(crate) fn transcript_entry(row: &PgRow) -> Result<pb::TranscriptEntry, sqlx::Error> {
    let stage: Option<String> = row.try_get("stage")?;
    Ok(pb::TranscriptEntry {
        seq: i64::from(row.try_get::<i32, _>("seq")?),
        direction: match row.try_get::<String, _>("direction")?.as_str() {
            "OUTBOUND" => pb::TranscriptDirection::Outbound,
            _ => pb::TranscriptDirection::Inbound,
        } as i32,
        text: row.try_get("text")?,
        at: Some(c2m_proto::timestamp(row.try_get("at")?)),
        author: row.try_get("author")?,
        message_id: row
            .try_get::<Option<String>, _>("message_id")?
            .unwrap_or_default(),
        client_message_id: row
            .try_get::<Option<String>, _>("client_message_id")?
            .unwrap_or_default(),
        stage: stage
            .as_deref()
            .and_then(FunnelStage::from_str_name)
            .unwrap_or_default() as i32,
        error_code: row
            .try_get::<Option<String>, _>("error_code")?
            .unwrap_or_default(),
        media_urls: row.try_get("media_urls")?,
    })
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

/// The columns a conversation is read from.
pub(crate) const CONVERSATION_COLUMNS: &str = "conversation_id, account_id, skill_id, channel, \
    handoff_id, handoff_config_id, engagement_attributes, opened_at, closed_at, consumer_address, \
    assignee, close_reason, last_message_at";

/// A conversation as its row reads ([`CONVERSATION_COLUMNS`]), without its transcript.
pub(crate) fn conversation(row: &PgRow) -> Result<pb::Conversation, sqlx::Error> {
    let closed_at: Option<DateTime<Utc>> = row.try_get("closed_at")?;
    let attributes: Vec<u8> = row.try_get("engagement_attributes")?;
    let optional = |column: &str| -> Result<String, sqlx::Error> {
        Ok(row
            .try_get::<Option<String>, _>(column)?
            .unwrap_or_default())
    };
    Ok(pb::Conversation {
        conversation_id: row.try_get("conversation_id")?,
        account_id: row.try_get("account_id")?,
        skill_id: row.try_get("skill_id")?,
        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?).unwrap_or_default()
            as i32,
        handoff_id: optional("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        state: if closed_at.is_some() {
            pb::ConversationState::Closed
        } else {
            pb::ConversationState::Open
        } as i32,
        engagement_attributes: pb::EngagementAttributes::decode(attributes.as_slice()).ok(),
        transcript: Vec::new(),
        opened_at: Some(c2m_proto::timestamp(row.try_get("opened_at")?)),
        closed_at: closed_at.map(c2m_proto::timestamp),
        consumer_address: row.try_get("consumer_address")?,
        assignee: optional("assignee")?,
        close_reason: optional("close_reason")?,
        last_message_at: Some(c2m_proto::timestamp(row.try_get("last_message_at")?)),
    })
}

/// A conversation with its transcript.
pub(crate) async fn load(
    conn: &mut PgConnection,
    account_id: &str,
    conversation_id: &str,
) -> Result<Option<pb::Conversation>, sqlx::Error> {
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {CONVERSATION_COLUMNS} FROM conversations \
         WHERE account_id = $1 AND conversation_id = $2"
    )))
    .bind(account_id)
    .bind(conversation_id)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    let mut loaded = conversation(&row)?;
    loaded.transcript = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM transcript_entries WHERE conversation_id = $1 ORDER BY seq"
    )))
    .bind(conversation_id)
    .fetch_all(&mut *conn)
    .await?
    .iter()
    .map(transcript_entry)
    .collect::<Result<_, _>>()?;
    Ok(Some(loaded))
}
