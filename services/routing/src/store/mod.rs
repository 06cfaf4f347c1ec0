//! Routing's storage: every statement it makes, behind two traits. [`RoutingStore`] holds the
//! reads and the writes that stand alone; [`RoutingTx`] the statements of one change made in a
//! transaction (a reply opening a conversation, an agent's claim, an answer and its stages, a
//! consent change), each change written with its funnel events and its conversation-log events
//! or not at all. The rules of each change (who may, what it logs) are the callers'; the store
//! only reads and writes. PostgreSQL is `postgres`; the embedded default's SQLite is `sqlite`;
//! `store_conformance` (beside the callers whose rules it runs) holds both to the same answers.

mod postgres;
mod sqlite;

pub(crate) use postgres::PgRoutingStore;
pub use sqlite::SqliteRoutingStore;

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1 as pb;
use c2m_runtime::{CancellationToken, health::Probe};
use chrono::{DateTime, Utc};

use c2m_proto::v1::Channel;

// What the store reads and writes: the rows of its changes and of its answers, kept here so the
// store needs nothing from the modules that call it.

/// A consumer opting out of a channel, or back in.
pub(crate) struct Change<'a> {
    pub account_id: &'a str,
    pub consumer_phone: &'a str,
    pub channel: Channel,
    pub source: &'a str,
    pub opted_in: bool,
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

/// What a listing asks for, validated (`desk::store`'s `Listing::from_wire`).
#[derive(Debug, Default)]
pub(crate) struct Listing {
    pub(crate) account_id: String,
    pub(crate) open: Option<bool>,
    pub(crate) skill_id: Option<String>,
    /// The caller's skills, when it is limited to some.
    pub(crate) skills: Option<Vec<String>>,
    pub(crate) channel: Option<Channel>,
    pub(crate) consumer: Option<String>,
    pub(crate) assignee: Option<String>,
    pub(crate) opened_after: Option<DateTime<Utc>>,
    /// The last conversation of the previous page.
    pub(crate) after: Option<(DateTime<Utc>, String)>,
    pub(crate) limit: i64,
}

/// The conversation a message from a consumer goes to.
#[derive(Debug, Clone)]
pub(crate) struct OpenConversation {
    pub conversation_id: String,
    pub handoff_id: Option<String>,
    pub skill_id: String,
}

/// A conversation to open from a deflection.
#[derive(Debug)]
pub(crate) struct NewConversation<'a> {
    pub conversation_id: &'a str,
    pub account_id: &'a str,
    pub consumer_address: &'a str,
    pub channel: &'a str,
    pub skill_id: &'a str,
    pub handoff_id: &'a str,
    pub handoff_config_id: &'a str,
    pub engagement_attributes: &'a [u8],
    pub opened_at: DateTime<Utc>,
}

/// An agent's or bot's message as sent, with its conversation.
#[derive(Debug, Clone)]
pub(crate) struct SentEntry {
    pub entry: pb::TranscriptEntry,
    pub conversation_id: String,
    pub skill_id: String,
    pub channel: pb::Channel,
    pub handoff_id: String,
    pub opened_at: DateTime<Utc>,
}

/// Accounts whose conversation log grew, as notices arrive.
#[async_trait]
pub(crate) trait LogNotices: Send {
    /// The next account notified; an error when the notices are lost (listen again).
    async fn recv(&mut self) -> Result<String, sqlx::Error>;
    /// An account notified already, without waiting.
    fn buffered(&mut self) -> Option<String>;
}

#[async_trait]
pub(crate) trait RoutingStore: std::fmt::Debug + Send + Sync + 'static {
    /// What health checks ask: SERVING while the store answers (and, on PostgreSQL, once its
    /// schema is migrated).
    fn probe(&self) -> Arc<dyn Probe>;
    /// Waits until the store can be used; `false` when `shutdown` came first.
    async fn until_ready(&self, shutdown: &CancellationToken) -> bool;
    /// A transaction for one change.
    async fn begin(&self) -> Result<Box<dyn RoutingTx>, sqlx::Error>;

    /// What handoffs must know of these consumers, in their order.
    async fn check_consumers(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error>;
    /// Records deflections. A handoff recorded again (a fallback sent on another channel) keeps
    /// its row and takes the channel, message and time of its latest send; an older send
    /// arriving late changes nothing.
    async fn record_deflections(&self, deflections: Vec<Deflection>) -> Result<(), sqlx::Error>;
    /// An account's consent changes after `after`, oldest first, for one consumer or channel if
    /// asked; with the id of each.
    async fn consent_changes(
        &self,
        account_id: &str,
        consumer_phone: Option<&str>,
        channel: Option<pb::Channel>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<(i64, pb::ConsentChange)>, sqlx::Error>;

    /// A page of conversations, newest first (without transcripts).
    async fn conversations(&self, listing: &Listing) -> Result<Vec<pb::Conversation>, sqlx::Error>;
    /// A conversation with its transcript.
    async fn conversation(
        &self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error>;
    /// The accounts with open conversations.
    async fn accounts_with_open_conversations(&self) -> Result<Vec<String>, sqlx::Error>;
    /// The account's open conversations whose last message came at or before `idle_since`, the
    /// longest idle first.
    async fn idle(
        &self,
        account_id: &str,
        idle_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<String>, sqlx::Error>;

    /// The position of the account's latest log event (0: none yet).
    async fn log_head(&self, account_id: &str) -> Result<i64, sqlx::Error>;
    /// The account's log events after `position` (position, encoded event), at most `limit`.
    async fn log_after(
        &self,
        account_id: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Vec<u8>)>, sqlx::Error>;
    /// The position of the account's oldest event kept (the next one when none is).
    async fn log_oldest_kept(&self, account_id: &str) -> Result<i64, sqlx::Error>;
    /// The position of the account's last event logged before `since` (0: none).
    async fn log_before(&self, account_id: &str, since: DateTime<Utc>) -> Result<i64, sqlx::Error>;
    /// Forgets every account's events logged before `cutoff`; how many.
    async fn prune_log(&self, cutoff: DateTime<Utc>) -> Result<u64, sqlx::Error>;
    /// Notices of the accounts whose log grows from now on, from every replica.
    async fn listen(&self) -> Result<Box<dyn LogNotices>, sqlx::Error>;
}

/// The statements of one change, in its transaction: nothing is written unless it commits.
#[async_trait]
pub(crate) trait RoutingTx: Send {
    /// The conversation (and its handoff) a provider's message was routed to already.
    async fn routed(
        &mut self,
        provider_message_id: &str,
    ) -> Result<Option<(String, Option<String>)>, sqlx::Error>;
    /// The consumer's open conversation, held for this change.
    async fn open_conversation(
        &mut self,
        account_id: &str,
        consumer: &str,
    ) -> Result<Option<OpenConversation>, sqlx::Error>;
    /// The consumer's latest deflection sent at or after `since`.
    async fn latest_deflection(
        &mut self,
        account_id: &str,
        consumer: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<Deflection>, sqlx::Error>;
    /// Opens a conversation; a unique violation when the consumer has one open already.
    async fn open(&mut self, conversation: &NewConversation<'_>) -> Result<(), sqlx::Error>;
    /// Adds an entry at the end of the transcript and marks the conversation's last message.
    async fn append(
        &mut self,
        conversation_id: &str,
        entry: &NewEntry<'_>,
    ) -> Result<pb::TranscriptEntry, sqlx::Error>;
    /// A conversation with its transcript.
    async fn load(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error>;
    /// A conversation (without its transcript), held for this change.
    async fn lock(
        &mut self,
        account_id: &str,
        conversation_id: &str,
    ) -> Result<Option<pb::Conversation>, sqlx::Error>;
    /// Who holds the conversation and which skill's it is.
    async fn assign(
        &mut self,
        conversation_id: &str,
        assignee: Option<&str>,
        skill_id: &str,
    ) -> Result<(), sqlx::Error>;
    /// Closes the conversation now, for `reason`, held by nobody.
    async fn close(&mut self, conversation_id: &str, reason: &str) -> Result<(), sqlx::Error>;
    /// The entry a client message id was used for in the conversation, and until when its send
    /// may still be under way.
    async fn earlier(
        &mut self,
        conversation_id: &str,
        client_message_id: &str,
    ) -> Result<Option<(pb::TranscriptEntry, Option<DateTime<Utc>>)>, sqlx::Error>;
    /// An entry's send is under way again, until `until`.
    async fn sending(
        &mut self,
        conversation_id: &str,
        seq: i64,
        until: DateTime<Utc>,
    ) -> Result<(), sqlx::Error>;
    /// When the consumer last wrote in the conversation.
    async fn last_inbound(
        &mut self,
        conversation_id: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error>;
    /// The outbound entry sent as `message_id` in one of the account's conversations, held for
    /// this change.
    async fn sent(
        &mut self,
        account_id: &str,
        message_id: &str,
    ) -> Result<Option<SentEntry>, sqlx::Error>;
    /// Sets an outbound entry's stage (and error code; empty: none).
    async fn set_stage(
        &mut self,
        message_id: &str,
        stage: pb::FunnelStage,
        error_code: &str,
    ) -> Result<pb::TranscriptEntry, sqlx::Error>;
    /// Whether an agent or bot message of the conversation other than entry `seq` has gone out.
    async fn answered_before(
        &mut self,
        conversation_id: &str,
        seq: i64,
    ) -> Result<bool, sqlx::Error>;
    /// Opts the consumer out of the channel, or back in, with its history row; `false` when it
    /// changes nothing.
    async fn consent(&mut self, change: &Change<'_>) -> Result<bool, sqlx::Error>;
    /// Funnel events for Reporting, shipped once this commits.
    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error>;
    /// Conversation events at the account's next positions, streamed once this commits. Call it
    /// last before committing: it holds the account's log head until then.
    async fn log(
        &mut self,
        account_id: &str,
        events: &[pb::ConversationEvent],
    ) -> Result<(), sqlx::Error>;
    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error>;
}

#[cfg(test)]
mod one_row_per_handoff {
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
