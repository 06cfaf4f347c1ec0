//! The two statements on every handoff's path: what Routing knows about a consumer before a
//! message goes, and the record of what went, batched across concurrent handoffs (see
//! `c2m_storage::batch`).

use c2m_storage::batch::Statement;
use sqlx::PgPool;

/// What a handoff must know about a consumer before messaging them.
#[derive(Debug, Clone, PartialEq)]
pub struct Consumer {
    /// The open conversation, the truth behind the Redis lease.
    pub conversation: Option<String>,
    /// The channels the consumer opted out of.
    pub opted_out: Vec<String>,
    /// The latest Apple Messages deflection inside the window that no conversation answered.
    pub pending_invite: Option<String>,
}

/// What Routing knows about `phone`, in one query; an Apple Messages invite counts as pending
/// for `invite_hours` (0: none is looked for). One row, by the tables' keys: batching this read
/// would only trade the index lookups for array plans the planner may get wrong.
pub async fn check(
    pool: &PgPool,
    account_id: &str,
    phone: &str,
    invite_hours: i32,
) -> Result<Consumer, sqlx::Error> {
    const FACTS: &str = "SELECT (SELECT conversation_id FROM conversations \
                WHERE account_id = $1 AND consumer_address = $2 AND closed_at IS NULL), \
            ARRAY(SELECT channel FROM opt_outs WHERE account_id = $1 AND consumer_phone = $2)";
    // Two statements rather than one with `$3 > 0`: such a condition makes PostgreSQL plan the
    // statement afresh on every call (a custom plan always looks cheaper than the generic one),
    // which cost more than running it.
    let (conversation, opted_out, pending_invite) = if invite_hours > 0 {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{FACTS}, (SELECT d.handoff_id FROM deflections d \
                 WHERE d.account_id = $1 AND d.consumer_phone = $2 \
                   AND d.channel = 'CHANNEL_APPLE_MESSAGES' \
                   AND d.sent_at > now() - make_interval(hours => $3) \
                   AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.handoff_id = d.handoff_id) \
                 ORDER BY d.sent_at DESC LIMIT 1)"
        )))
        .bind(account_id)
        .bind(phone)
        .bind(invite_hours)
        .fetch_one(pool)
        .await?
    } else {
        sqlx::query_as(sqlx::AssertSqlSafe(format!("{FACTS}, NULL::text")))
            .bind(account_id)
            .bind(phone)
            .fetch_one(pool)
            .await?
    };
    Ok(Consumer {
        conversation,
        opted_out,
        pending_invite,
    })
}

/// A message sent for a handoff, to find when the consumer replies.
#[derive(Debug, Clone, PartialEq)]
pub struct Deflection {
    pub handoff_id: String,
    pub account_id: String,
    pub handoff_config_id: String,
    pub ivr_number: String,
    pub consumer_phone: String,
    pub channel: String,
    pub skill_id: String,
    pub first_message: String,
    /// `c2m.v1.EngagementAttributes`, encoded.
    pub engagement_attributes: Vec<u8>,
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

/// Deflections recorded together. A handoff recorded again (a fallback sent on another channel)
/// keeps its row, with the channel, message and time of the latest send.
pub struct Records(pub PgPool);

impl Statement for Records {
    type Row = Deflection;
    type Output = ();

    async fn run(&self, deflections: &[Deflection]) -> Result<Vec<()>, sqlx::Error> {
        let text = |f: fn(&Deflection) -> &str| deflections.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            "INSERT INTO deflections (handoff_id, account_id, handoff_config_id, ivr_number, \
                 consumer_phone, channel, skill_id, first_message, engagement_attributes, sent_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::bytea[], $10::timestamptz[]) \
             ON CONFLICT (handoff_id) DO UPDATE SET channel = EXCLUDED.channel, \
                 first_message = EXCLUDED.first_message, sent_at = EXCLUDED.sent_at",
        )
        .bind(text(|d| &d.handoff_id))
        .bind(text(|d| &d.account_id))
        .bind(text(|d| &d.handoff_config_id))
        .bind(text(|d| &d.ivr_number))
        .bind(text(|d| &d.consumer_phone))
        .bind(text(|d| &d.channel))
        .bind(text(|d| &d.skill_id))
        .bind(text(|d| &d.first_message))
        .bind(
            deflections
                .iter()
                .map(|d| d.engagement_attributes.as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(deflections.iter().map(|d| d.sent_at).collect::<Vec<_>>())
        .execute(&self.0)
        .await?;
        Ok(vec![(); deflections.len()])
    }
}
