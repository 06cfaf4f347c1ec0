//! Outbound messages and their delivery stage, which only moves forward: statuses arrive out of
//! order (read before delivered), and a late one must not undo an earlier one.

use std::sync::Arc;

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::peers::Peers;
use c2m_storage::{
    batch::Statement,
    outbox::{self, Destination, RelayError},
};
use chrono::Utc;

use crate::store::{GatewayStore, GatewayTx, Outbound, StageChange};

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

/// Messages by id (the primary key, unique across accounts), looked up together. The caller
/// checks that a message found is its account's.
pub struct Lookups(pub Arc<dyn GatewayStore>);

impl Statement for Lookups {
    type Row = String;
    type Output = Option<Outbound>;

    async fn run(&self, ids: &[String]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        self.0.messages(ids).await
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
/// again; an id claimed before is returned as it stands. Each claim carries a token of its own
/// (`claimed_by`): the row holds the token of the claim that wrote it.
pub struct Claims(pub Arc<dyn GatewayStore>);

impl Statement for Claims {
    type Row = Arc<Outbound>;
    type Output = Claim;

    async fn run(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Claim>, sqlx::Error> {
        let written = self.0.claim(messages).await?;
        // Known by its token, not its id: a batch can hold one id twice (two requests carrying
        // on one handoff), and only one of the two wrote the row.
        let mine = |m: &Outbound| m.claimed_by.as_ref().is_some_and(|t| written.contains(t));
        // The ones claimed before: as they stand (read now, after the insert waited for any
        // concurrent claimer of the same id to commit).
        let earlier: Vec<String> = messages
            .iter()
            .filter(|m| !mine(m))
            .map(|m| m.message_id.clone())
            .collect();
        let mut found = if earlier.is_empty() {
            Vec::new()
        } else {
            self.0.messages(&earlier).await?
        }
        .into_iter();
        Ok(messages
            .iter()
            .map(|m| {
                if mine(m) {
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
/// (its id, a later stage) is kept: the outcome only fills in what is still missing.
pub struct Records(pub Arc<dyn GatewayStore>);

impl Statement for Records {
    /// Shared, so that a record PostgreSQL refused can be offered again without a copy.
    type Row = Arc<Outbound>;
    type Output = Option<Outbound>;

    async fn run(&self, messages: &[Arc<Outbound>]) -> Result<Vec<Option<Outbound>>, sqlx::Error> {
        let updated = self.0.record(messages).await?;
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
    tx: &mut dyn GatewayTx,
    report: &StatusReport<'_>,
) -> Result<usize, sqlx::Error> {
    let Some(current) = tx
        .reported(
            report.account_id,
            report.channel,
            report.provider_message_id,
            report.message_id,
        )
        .await?
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
    tx.change_stage(&StageChange {
        message_id: &current.message_id,
        stage,
        error_code: report.error_code.filter(|_| !passed.is_empty()),
        provider_message_id: report.provider_message_id,
        delivered: passed.contains(&FunnelStage::Delivered),
        read: passed.contains(&FunnelStage::Read),
    })
    .await?;
    if !current.conversation_id.is_empty() {
        // An agent's or bot's message: Routing writes its stages into the transcript.
        let stages: Vec<pb::MessageStage> = passed
            .iter()
            .map(|s| pb::MessageStage {
                account_id: current.account_id.clone(),
                message_id: current.message_id.clone(),
                stage: *s as i32,
                error_code: report.error_code.unwrap_or_default().to_owned(),
                at: Some(c2m_proto::timestamp(Utc::now())),
            })
            .collect();
        tx.enqueue_stages(&stages).await?;
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
    tx.enqueue(&events).await?;
    Ok(events.len())
}
