//! What Routing knows about a consumer before a message goes (the statement on every handoff's
//! path, batched across concurrent handoffs: see `c2m_storage::batch`), and the record of what
//! went, which Handoff's deflection outbox ships in batches of its own.

use c2m_storage::batch::Statement;
use sqlx::{PgPool, Row};

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

/// A consumer to check: account, phone, and the hours an Apple Messages invite stays pending
/// (0: none is looked for).
pub type Check = (String, String, i32);

/// Consumers checked together, one row each; each fact is a probe by the tables' keys (a
/// subquery per row, which PostgreSQL cannot turn into a scan of a whole table).
pub struct Checks(pub PgPool);

impl Statement for Checks {
    type Row = Check;
    type Output = Consumer;

    async fn run(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error> {
        let accounts: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
        let phones: Vec<&str> = checks.iter().map(|c| c.1.as_str()).collect();
        let hours: Vec<i32> = checks.iter().map(|c| c.2).collect();
        let rows = sqlx::query(
            "SELECT \
                 (SELECT conversation_id FROM conversations \
                  WHERE account_id = q.account_id AND consumer_address = q.phone \
                    AND closed_at IS NULL) AS conversation, \
                 ARRAY(SELECT channel FROM opt_outs \
                       WHERE account_id = q.account_id AND consumer_phone = q.phone) AS opted_out, \
                 (SELECT d.handoff_id FROM deflections d \
                  WHERE q.hours > 0 AND d.account_id = q.account_id AND d.consumer_phone = q.phone \
                    AND d.channel = 'CHANNEL_APPLE_MESSAGES' \
                    AND d.sent_at > now() - make_interval(hours => q.hours) \
                    AND NOT EXISTS (SELECT 1 FROM conversations c WHERE c.handoff_id = d.handoff_id) \
                  ORDER BY d.sent_at DESC LIMIT 1) AS pending_invite \
             FROM unnest($1::text[], $2::text[], $3::int[]) WITH ORDINALITY AS q(account_id, phone, hours, n) \
             ORDER BY q.n",
        )
        .bind(&accounts)
        .bind(&phones)
        .bind(&hours)
        .fetch_all(&self.0)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(Consumer {
                    conversation: row.try_get("conversation")?,
                    opted_out: row.try_get("opted_out")?,
                    pending_invite: row.try_get("pending_invite")?,
                })
            })
            .collect()
    }
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

/// Records deflections with one statement. A handoff recorded again (a fallback sent on another
/// channel) keeps its row and takes the channel, message and time of its latest send; an older
/// send arriving late (a batch shipped again after a newer one) changes nothing.
pub async fn record(pool: &PgPool, deflections: Vec<Deflection>) -> Result<(), sqlx::Error> {
    let deflections = latest_per_handoff(deflections);
    let text = |f: fn(&Deflection) -> &str| deflections.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO deflections (handoff_id, account_id, handoff_config_id, ivr_number, \
             consumer_phone, channel, skill_id, first_message, engagement_attributes, sent_at) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::bytea[], $10::timestamptz[]) \
         ON CONFLICT (handoff_id) DO UPDATE SET channel = EXCLUDED.channel, \
             first_message = EXCLUDED.first_message, sent_at = EXCLUDED.sent_at \
         WHERE deflections.sent_at <= EXCLUDED.sent_at",
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
    .execute(pool)
    .await?;
    Ok(())
}

/// One row per handoff, as the statement's upsert would leave it had the rows come one by one
/// (one statement cannot touch a row twice): the first row of a handoff, with the channel,
/// message and time of its latest send.
fn latest_per_handoff(deflections: Vec<Deflection>) -> Vec<Deflection> {
    let mut at = std::collections::HashMap::with_capacity(deflections.len());
    let mut kept: Vec<Deflection> = Vec::with_capacity(deflections.len());
    for d in deflections {
        match at.get(&d.handoff_id) {
            Some(&i) => {
                let first: &mut Deflection = &mut kept[i];
                if first.sent_at <= d.sent_at {
                    first.channel = d.channel;
                    first.first_message = d.first_message;
                    first.sent_at = d.sent_at;
                }
            }
            None => {
                at.insert(d.handoff_id.clone(), kept.len());
                kept.push(d);
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn sent(handoff_id: &str, channel: &str, second: u32) -> Deflection {
        Deflection {
            handoff_id: handoff_id.into(),
            account_id: "acme".into(),
            handoff_config_id: "default".into(),
            ivr_number: String::new(),
            consumer_phone: "+447700900123".into(),
            channel: channel.into(),
            skill_id: "billing".into(),
            first_message: format!("via {channel}"),
            engagement_attributes: vec![1, 2, 3],
            sent_at: Utc.with_ymd_and_hms(2026, 11, 26, 12, 0, second).unwrap(),
        }
    }

    #[test]
    fn a_handoff_sent_twice_in_one_batch_is_one_row_with_its_latest_send() {
        let fallback = Deflection {
            engagement_attributes: Vec::new(),
            ..sent("ho_a", "CHANNEL_SMS", 9)
        };
        let kept = latest_per_handoff(vec![
            sent("ho_a", "CHANNEL_WHATSAPP", 1),
            sent("ho_b", "CHANNEL_SMS", 2),
            fallback,
            // Shipped again after the fallback: older, so it changes nothing.
            sent("ho_a", "CHANNEL_WHATSAPP", 1),
        ]);
        assert_eq!(
            kept,
            vec![
                Deflection {
                    channel: "CHANNEL_SMS".into(),
                    first_message: "via CHANNEL_SMS".into(),
                    ..sent("ho_a", "CHANNEL_WHATSAPP", 9)
                },
                sent("ho_b", "CHANNEL_SMS", 2),
            ]
        );
    }
}
