//! Outbound messages and their delivery stage, which only moves forward: statuses arrive out of
//! order (read before delivered), and a late one must not undo an earlier one.

use std::sync::Arc;

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::peers::Peers;
use c2m_storage::{
    batch::Statement,
    outbox::{self, Destination, RelayError},
};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool, Row, postgres::PgRow};

/// `conversation_outbox`, to Routing's `RecordMessageStages`, which moves the transcript entries
/// of agents' and bots' messages forward (a repeat changes nothing).
#[derive(Debug, Clone, Copy, Default)]
pub struct ToRouting;

impl Destination for ToRouting {
    const TABLE: &'static str = "conversation_outbox";

    async fn deliver(&self, peers: &Peers, payloads: Vec<Vec<u8>>) -> Result<(), RelayError> {
        let stages = payloads
            .iter()
            .map(|payload| <pb::MessageStage as prost::Message>::decode(payload.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        peers
            .routing()
            .record_message_stages(pb::RecordMessageStagesRequest { stages })
            .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outbound {
    pub message_id: String,
    pub account_id: String,
    pub channel: Channel,
    pub handoff_id: String,
    pub handoff_config_id: String,
    pub skill_id: String,
    /// The conversation an agent's or bot's message answers in; empty for a deflection's.
    pub conversation_id: String,
    pub provider_message_id: Option<String>,
    pub stage: FunnelStage,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub sent_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When the provider reported the message delivered, and read.
    pub delivered_at: Option<DateTime<Utc>>,
    pub read_at: Option<DateTime<Utc>>,
    /// While its sender is at the provider: until when it may take. A claim past it with no
    /// outcome was left by a sender that died.
    pub sending_until: Option<DateTime<Utc>>,
    /// The send that claimed the id (a fresh token per send): a claim's statement run again
    /// after its acknowledgement was lost finds its own claim, not another's.
    pub claimed_by: Option<String>,
}

impl Outbound {
    /// Sent without an answer from the provider, and not reported on since: every send the
    /// provider answered has its id.
    pub fn unconfirmed(&self) -> bool {
        self.stage == FunnelStage::Sent && self.provider_message_id.is_none()
    }

    /// Its sender is at the provider now: the outcome is coming.
    pub fn in_flight(&self, now: DateTime<Utc>) -> bool {
        self.sending_until.is_some_and(|until| until > now)
    }

    pub fn to_wire(&self) -> pb::OutboundMessage {
        pb::OutboundMessage {
            message_id: self.message_id.clone(),
            account_id: self.account_id.clone(),
            channel: self.channel as i32,
            provider_message_id: self.provider_message_id.clone().unwrap_or_default(),
            stage: self.stage as i32,
            error_code: self.error_code.clone().unwrap_or_default(),
            error_message: self.error_message.clone().unwrap_or_default(),
            sent_at: Some(c2m_proto::timestamp(self.sent_at)),
            updated_at: Some(c2m_proto::timestamp(self.updated_at)),
            unconfirmed: self.unconfirmed(),
            delivered_at: self.delivered_at.map(c2m_proto::timestamp),
            read_at: self.read_at.map(c2m_proto::timestamp),
        }
    }
}

/// Every column, as read back: the record, and when the provider reported each stage.
const COLUMNS: &str = "message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
    provider_message_id, stage, error_code, error_message, sent_at, updated_at, conversation_id, \
    delivered_at, read_at, sending_until, claimed_by";

fn outbound(row: PgRow) -> Result<Outbound, sqlx::Error> {
    Ok(Outbound {
        message_id: row.try_get("message_id")?,
        account_id: row.try_get("account_id")?,
        channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?).unwrap_or_default(),
        handoff_id: row.try_get("handoff_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        skill_id: row.try_get("skill_id")?,
        conversation_id: row.try_get("conversation_id")?,
        provider_message_id: row.try_get("provider_message_id")?,
        stage: FunnelStage::from_str_name(&row.try_get::<String, _>("stage")?).unwrap_or_default(),
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        sent_at: row.try_get("sent_at")?,
        updated_at: row.try_get("updated_at")?,
        delivered_at: row.try_get("delivered_at")?,
        read_at: row.try_get("read_at")?,
        sending_until: row.try_get("sending_until")?,
        claimed_by: row.try_get("claimed_by")?,
    })
}

/// Messages by id (the primary key, unique across accounts), looked up together. The caller
/// checks that a message found is its account's.
pub struct Lookups(pub PgPool);

impl Statement for Lookups {
    type Row = String;
    type Output = Option<Outbound>;

    async fn run(&self, ids: &[String]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        // LATERAL with OFFSET 0 is not flattened into a join: each id is one probe of the
        // primary key, whatever the generic plan thought of the table's size.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT q.n, found.* FROM unnest($1::text[]) WITH ORDINALITY AS q(message_id, n) \
             CROSS JOIN LATERAL (SELECT {COLUMNS} FROM outbound_messages m \
                 WHERE m.message_id = q.message_id OFFSET 0) AS found"
        )))
        .bind(ids)
        .fetch_all(&self.0)
        .await?;
        let mut found = vec![None; ids.len()];
        for row in rows {
            let n: i64 = row.try_get("n")?;
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| found.get_mut(i)) {
                *slot = Some(outbound(row)?);
            }
        }
        Ok(found)
    }
}

/// What claiming a message id before its send found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// The id is this send's: the provider may be called.
    Mine,
    /// The id was claimed before, by this account: its record (sent, failed, or still at the
    /// provider: see [`Outbound::in_flight`]). It is not sent again.
    Earlier(Box<Outbound>),
    /// The id belongs to another account.
    Foreign,
}

/// Claims message ids before their sends, together: each row is written as sent and unconfirmed,
/// with `sending_until`, so that whatever happens to the sender afterwards, the id is never sent
/// again; an id claimed before is returned as it stands.
pub struct Claims(pub PgPool);

impl Statement for Claims {
    type Row = Arc<Outbound>;
    type Output = Claim;

    async fn run(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Claim>, sqlx::Error> {
        let text = |f: fn(&Outbound) -> &str| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        let claimed: Vec<String> = sqlx::query_scalar(
            "INSERT INTO outbound_messages (message_id, account_id, channel, handoff_id, \
                 handoff_config_id, skill_id, stage, sent_at, updated_at, conversation_id, \
                 sending_until, claimed_by) \
             SELECT message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
                 'FUNNEL_STAGE_SENT', sent_at, sent_at, conversation_id, sending_until, claimed_by \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                 $7::timestamptz[], $8::text[], $9::timestamptz[], $10::text[]) \
                 AS m(message_id, account_id, channel, handoff_id, handoff_config_id, skill_id, \
                     sent_at, conversation_id, sending_until, claimed_by) \
             ON CONFLICT (message_id) DO NOTHING RETURNING message_id",
        )
        .bind(text(|m| &m.message_id))
        .bind(text(|m| &m.account_id))
        .bind(text(|m| m.channel.as_str_name()))
        .bind(text(|m| &m.handoff_id))
        .bind(text(|m| &m.handoff_config_id))
        .bind(text(|m| &m.skill_id))
        .bind(messages.iter().map(|m| m.sent_at).collect::<Vec<_>>())
        .bind(text(|m| &m.conversation_id))
        .bind(messages.iter().map(|m| m.sending_until).collect::<Vec<_>>())
        .bind(
            messages
                .iter()
                .map(|m| m.claimed_by.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&self.0)
        .await?;
        // The ones claimed before: as they stand (read now, after the insert waited for any
        // concurrent claimer of the same id to commit).
        let earlier: Vec<String> = messages
            .iter()
            .filter(|m| !claimed.contains(&m.message_id))
            .map(|m| m.message_id.clone())
            .collect();
        let mut found = if earlier.is_empty() {
            Vec::new()
        } else {
            Lookups(self.0.clone()).run(&earlier).await?
        }
        .into_iter();
        Ok(messages
            .iter()
            .map(|m| {
                if claimed.contains(&m.message_id) {
                    return Claim::Mine;
                }
                match found.next().flatten() {
                    // This send's own claim, committed by a run of the statement whose
                    // acknowledgement was lost: still this send's to make.
                    Some(first)
                        if first.claimed_by.is_some()
                            && first.claimed_by == m.claimed_by
                            && first.in_flight(Utc::now()) =>
                    {
                        Claim::Mine
                    }
                    Some(first) if first.account_id == m.account_id => {
                        Claim::Earlier(Box::new(first))
                    }
                    _ => Claim::Foreign,
                }
            })
            .collect())
    }
}

/// Records sends' outcomes on their claims, together. A report the provider sent meanwhile
/// (its id, a later stage) is kept: the outcome only fills in what is still missing. The rows
/// are found by `= ANY` on the primary key: a join with the arrays alone was planned, once and
/// for good, as a scan of the whole table.
pub struct Records(pub PgPool);

impl Statement for Records {
    /// Shared, so that a record PostgreSQL refused can be offered again without a copy.
    type Row = Arc<Outbound>;
    type Output = Option<Outbound>;

    async fn run(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        let text = |f: fn(&Outbound) -> &str| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        let optional =
            |f: fn(&Outbound) -> Option<&str>| messages.iter().map(|m| f(m)).collect::<Vec<_>>();
        let updated = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE outbound_messages m SET \
                 stage = CASE WHEN m.stage = 'FUNNEL_STAGE_SENT' AND m.provider_message_id IS NULL \
                     THEN u.stage ELSE m.stage END, \
                 provider_message_id = coalesce(m.provider_message_id, u.provider_message_id), \
                 error_code = coalesce(m.error_code, u.error_code), \
                 error_message = coalesce(m.error_message, u.error_message), \
                 updated_at = now(), sending_until = NULL \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                 AS u(message_id, provider_message_id, stage, error_code, error_message) \
             WHERE m.message_id = ANY($1::text[]) AND m.message_id = u.message_id \
             RETURNING {}",
            COLUMNS
                .split(", ")
                .map(|c| format!("m.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(text(|m| &m.message_id))
        .bind(optional(|m| m.provider_message_id.as_deref()))
        .bind(text(|m| m.stage.as_str_name()))
        .bind(optional(|m| m.error_code.as_deref()))
        .bind(optional(|m| m.error_message.as_deref()))
        .fetch_all(&self.0)
        .await?
        .into_iter()
        .map(outbound)
        .collect::<Result<Vec<_>, _>>()?;
        Ok(messages
            .iter()
            .map(|m| {
                updated
                    .iter()
                    .find(|u| u.message_id == m.message_id)
                    .cloned()
            })
            .collect())
    }
}

/// A provider's report of how far a message got.
pub struct StatusReport<'a> {
    pub account_id: &'a str,
    pub channel: Channel,
    pub provider_message_id: &'a str,
    /// Our message id, where the provider hands it back (Twilio's callback URL, Meta's
    /// `biz_opaque_callback_data`, RBM's `messageId`): it finds a message whose send went
    /// unanswered, which has no provider id yet, and one whose provider speaks for another
    /// channel (Twilio's SMS carries an Apple Messages invite).
    pub message_id: Option<&'a str>,
    /// None: a status that says nothing of the way (it still confirms an unconfirmed send).
    pub stage: Option<FunnelStage>,
    pub error_code: Option<&'a str>,
    pub source: &'a str,
}

/// Moves the reported message forward to its stage, writing an event for every stage it passes (a
/// READ that arrives first counts as DELIVERED too), and confirms it if its send went unanswered
/// (it learns its provider id). Returns the events written; none when the message is unknown or
/// already as far.
pub async fn advance(
    tx: &mut PgConnection,
    report: &StatusReport<'_>,
) -> Result<usize, sqlx::Error> {
    let Some(current) = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM outbound_messages WHERE account_id = $1 \
         AND (message_id = $4 OR channel = $2 AND provider_message_id = $3) FOR UPDATE"
    )))
    .bind(report.account_id)
    .bind(report.channel.as_str_name())
    .bind(report.provider_message_id)
    .bind(report.message_id)
    .fetch_optional(&mut *tx)
    .await?
    .map(outbound)
    .transpose()?
    else {
        return Ok(0);
    };
    let confirms = current.provider_message_id.is_none();
    let passed: Vec<FunnelStage> = match (current.stage, report.stage) {
        (_, None) | (FunnelStage::Failed, _) => vec![],
        (_, Some(FunnelStage::Failed)) if current.stage == FunnelStage::Sent => {
            vec![FunnelStage::Failed]
        }
        (_, Some(FunnelStage::Failed)) => vec![],
        (from, Some(to)) => [FunnelStage::Delivered, FunnelStage::Read]
            .into_iter()
            .filter(|s| {
                s.delivery_rank() > from.delivery_rank() && s.delivery_rank() <= to.delivery_rank()
            })
            .collect(),
    };
    if passed.is_empty() && !confirms {
        return Ok(0);
    }
    let stage = passed.last().copied().unwrap_or(current.stage);
    sqlx::query(
        "UPDATE outbound_messages SET stage = $2, error_code = coalesce($3, error_code), \
         provider_message_id = coalesce(provider_message_id, $4), updated_at = now(), \
         delivered_at = CASE WHEN $5 THEN now() ELSE delivered_at END, \
         read_at = CASE WHEN $6 THEN now() ELSE read_at END \
         WHERE message_id = $1",
    )
    .bind(&current.message_id)
    .bind(stage.as_str_name())
    .bind(report.error_code.filter(|_| !passed.is_empty()))
    .bind(report.provider_message_id)
    .bind(passed.contains(&FunnelStage::Delivered))
    .bind(passed.contains(&FunnelStage::Read))
    .execute(&mut *tx)
    .await?;
    if !current.conversation_id.is_empty() {
        // An agent's or bot's message: Routing writes its stages into the transcript.
        let stages: Vec<Vec<u8>> = passed
            .iter()
            .map(|s| {
                prost::Message::encode_to_vec(&pb::MessageStage {
                    account_id: current.account_id.clone(),
                    message_id: current.message_id.clone(),
                    stage: *s as i32,
                    error_code: report.error_code.unwrap_or_default().to_owned(),
                    at: Some(c2m_proto::timestamp(Utc::now())),
                })
            })
            .collect();
        sqlx::query("INSERT INTO conversation_outbox (payload) SELECT * FROM unnest($1::bytea[])")
            .bind(&stages)
            .execute(&mut *tx)
            .await?;
        return Ok(stages.len());
    }
    if current.handoff_id.is_empty() {
        // Neither a deflection's nor a conversation's (a HELP answer): nobody counts it.
        return Ok(0);
    }
    let events: Vec<pb::Event> = passed
        .iter()
        .map(|s| pb::Event {
            handoff_id: current.handoff_id.clone(),
            handoff_config_id: current.handoff_config_id.clone(),
            skill_id: current.skill_id.clone(),
            channel: current.channel as i32,
            error_code: if *s == FunnelStage::Failed {
                report.error_code.unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            source: report.source.to_owned(),
            ..outbox::event(report.account_id, *s)
        })
        .collect();
    outbox::enqueue(tx, &events).await?;
    Ok(events.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use c2m_test_support::TestDatabase;

    /// A claim of `message_id` by `account_id`, its sender at the provider for `secs` more.
    fn claim(account_id: &str, message_id: &str, secs: i64) -> Arc<Outbound> {
        let now = Utc::now();
        Arc::new(Outbound {
            message_id: message_id.into(),
            account_id: account_id.into(),
            channel: Channel::Sms,
            handoff_id: "ho_1".into(),
            handoff_config_id: "default".into(),
            skill_id: "billing".into(),
            conversation_id: String::new(),
            provider_message_id: None,
            stage: FunnelStage::Sent,
            error_code: None,
            error_message: None,
            sent_at: now,
            updated_at: now,
            delivered_at: None,
            read_at: None,
            sending_until: Some(now + chrono::Duration::seconds(secs)),
            claimed_by: Some(uuid::Uuid::new_v4().to_string()),
        })
    }

    /// The outcome `stage` of the send `claim` made.
    fn outcome(claim: &Arc<Outbound>, stage: FunnelStage) -> Arc<Outbound> {
        Arc::new(Outbound {
            provider_message_id: (stage == FunnelStage::Sent)
                .then(|| format!("SM{}", claim.message_id)),
            stage,
            error_code: (stage == FunnelStage::Failed).then(|| "30003".to_owned()),
            sending_until: None,
            ..Outbound::clone(claim)
        })
    }

    /// In one batch: a new id is claimed; an id claimed before is returned as it stands (in
    /// flight while its sender is at the provider, unconfirmed once that sender's time is past,
    /// its outcome once recorded); an id another account holds is not this account's.
    #[tokio::test]
    async fn an_id_is_claimed_once_and_a_repeat_gets_the_first_send_as_it_stands() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        let (claims, records) = (
            Claims(db.batch_pool().clone()),
            Records(db.batch_pool().clone()),
        );
        let first = [
            claim("acme", "m-failed", 10),
            claim("acme", "m-flying", 10),
            claim("acme", "m-abandoned", -1),
            claim("globex", "m-theirs", 10),
        ];
        let claimed = claims.run(&first).await.expect("claims");
        assert!(claimed.iter().all(|c| *c == Claim::Mine), "{claimed:?}");
        let recorded = records
            .run(&[outcome(&first[0], FunnelStage::Failed)])
            .await
            .expect("records");
        assert_eq!(
            recorded[0].as_ref().map(|m| (m.stage, m.sending_until)),
            Some((FunnelStage::Failed, None))
        );

        let again = claims
            .run(&[
                claim("acme", "m-new", 10),
                claim("acme", "m-failed", 10),
                claim("acme", "m-flying", 10),
                claim("acme", "m-abandoned", 10),
                claim("acme", "m-theirs", 10),
            ])
            .await
            .expect("claims");
        let now = Utc::now();
        let seen: Vec<_> = again
            .iter()
            .map(|c| match c {
                Claim::Mine => "mine",
                Claim::Foreign => "foreign",
                Claim::Earlier(m) if m.stage == FunnelStage::Failed => "failed",
                Claim::Earlier(m) if m.in_flight(now) => "in flight",
                Claim::Earlier(m) if m.unconfirmed() => "unconfirmed",
                Claim::Earlier(_) => "other",
            })
            .collect();
        assert_eq!(
            seen,
            ["mine", "failed", "in flight", "unconfirmed", "foreign"]
        );
        // The claim's own statement run again (its acknowledgement lost): still this send's.
        let rerun = claims
            .run(std::slice::from_ref(&first[1]))
            .await
            .expect("claims");
        assert_eq!(rerun, [Claim::Mine]);
    }

    /// A provider's report that arrives before the sender records the send's outcome is kept:
    /// the outcome fills in only what is missing.
    #[tokio::test]
    async fn an_outcome_recorded_after_the_providers_report_keeps_the_report() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        let claimed = claim("acme", "m-raced", 10);
        Claims(db.batch_pool().clone())
            .run(std::slice::from_ref(&claimed))
            .await
            .expect("claims");
        let mut tx = db.pool().begin().await.expect("begins");
        let events = advance(
            &mut tx,
            &StatusReport {
                account_id: "acme",
                channel: Channel::Sms,
                provider_message_id: "SMm-raced",
                message_id: Some("m-raced"),
                stage: Some(FunnelStage::Delivered),
                error_code: None,
                source: "test",
            },
        )
        .await
        .expect("advances");
        tx.commit().await.expect("commits");
        assert_eq!(events, 1);
        let recorded = Records(db.batch_pool().clone())
            .run(&[outcome(&claimed, FunnelStage::Sent)])
            .await
            .expect("records");
        let recorded = recorded[0].as_ref().expect("recorded");
        assert_eq!(recorded.stage, FunnelStage::Delivered);
        assert_eq!(recorded.provider_message_id.as_deref(), Some("SMm-raced"));
        assert!(!recorded.in_flight(Utc::now()));
    }
}
