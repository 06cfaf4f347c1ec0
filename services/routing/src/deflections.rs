//! What Routing knows about a consumer before a message goes (the statement on every handoff's
//! path, batched across concurrent handoffs: see `c2m_storage::batch`), and the record of what
//! went, which Handoff's deflection outbox ships in batches of its own (`RoutingStore`).

use std::sync::Arc;

use c2m_storage::batch::Statement;

use crate::store::RoutingStore;

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

/// Consumers checked together, one row each, in one statement.
pub struct Checks(pub Arc<dyn RoutingStore>);

impl Statement for Checks {
    type Row = Check;
    type Output = Consumer;

    async fn run(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error> {
        self.0.check_consumers(checks).await
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

/// One row per handoff, as the statement's upsert would leave it had the rows come one by one
/// (one statement cannot touch a row twice): the first row of a handoff, with the channel,
/// message and time of its latest send.
pub(crate) fn latest_per_handoff(deflections: Vec<Deflection>) -> Vec<Deflection> {
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
