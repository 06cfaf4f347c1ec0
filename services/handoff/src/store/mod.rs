//! Handoff's storage, behind one trait ([`HandoffStore`]) holding every statement: the hot
//! path's batched writes, the lookups, the sweeps and the fallback round's. The PostgreSQL
//! implementation is `postgres`; the embedded default's is `sqlite`, and one suite
//! (`tests/handoff_store.rs`) holds both to the same answers.

mod postgres;
mod sqlite;

pub use postgres::PgHandoffStore;
#[cfg(test)]
pub(crate) use postgres::{Saves, tests};
pub use sqlite::SqliteHandoffStore;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, HandoffStatus};
use chrono::{DateTime, Utc};

pub use crate::model::Attempt;

/// A handoff's columns, the same in both schemas.
pub(crate) const COLUMNS: &str = "handoff_id, account_id, handoff_config_id, consumer_phone, \
    status, channel, skill_id, ivr_call_id, ivr_number, attempts, duplicate_of, created_at";

/// A handoff as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredHandoff {
    pub handoff_id: String,
    pub account_id: String,
    pub handoff_config_id: String,
    pub consumer_phone: String,
    pub status: HandoffStatus,
    pub channel: Option<Channel>,
    pub skill_id: String,
    pub ivr_call_id: String,
    pub ivr_number: String,
    pub attempts: Vec<Attempt>,
    pub duplicate_of: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl StoredHandoff {
    /// The message that was delivered (or is on its way), if any.
    pub fn sent_message_id(&self) -> Option<&str> {
        self.attempts
            .iter()
            .rev()
            .find(|a| a.went())
            .map(|a| a.message_id.as_str())
    }

    pub fn to_wire(&self, progress: Option<pb::DeliveryProgress>) -> pb::Handoff {
        pb::Handoff {
            handoff_id: self.handoff_id.clone(),
            account_id: self.account_id.clone(),
            handoff_config_id: self.handoff_config_id.clone(),
            status: self.status.into(),
            channel: self.channel.unwrap_or_default().into(),
            attempts: self
                .attempts
                .iter()
                .map(|a| pb::ChannelAttempt {
                    channel: a.channel.into(),
                    outcome: a.outcome.into(),
                    provider_message_id: a.provider_message_id.clone(),
                    error_code: a.error_code.clone(),
                    error_message: a.error_message.clone(),
                    attempted_at: Some(c2m_proto::timestamp(a.at)),
                })
                .collect(),
            skill_id: self.skill_id.clone(),
            ivr_call_id: self.ivr_call_id.clone(),
            consumer_phone_masked: c2m_runtime::mask_phone(&self.consumer_phone),
            created_at: Some(c2m_proto::timestamp(self.created_at)),
            progress,
            duplicate_of: self.duplicate_of.clone().unwrap_or_default(),
        }
    }
}

/// One of an account's recent handoffs, as the gate's state is rebuilt from it.
#[derive(Debug, Clone)]
pub struct Recent {
    pub handoff_id: String,
    pub consumer_phone: String,
    pub age: std::time::Duration,
    /// It sent (or is sending) a message, so it holds its consumer.
    pub holds_consumer: bool,
}

/// What saving a handoff did.
#[derive(Debug)]
pub enum Saved {
    Saved,
    /// A concurrent request with the same idempotency key committed first.
    Raced,
}

/// What to try if a sent message does not arrive.
#[derive(Debug, Clone)]
pub struct Fallback {
    pub message_id: String,
    /// The steps still to try, as JSON (see `fallback::encode_steps`).
    pub remaining: serde_json::Value,
    pub deadline: Option<DateTime<Utc>>,
    pub window_seconds: Option<i32>,
    /// The send went unanswered: past this, with no report from the provider, the next channel.
    pub confirm_by: Option<DateTime<Utc>>,
}

/// A handoff to write with its idempotency record, its events, its pending fallback and, when a
/// message went, the deflection Routing must know of.
#[derive(Debug)]
pub struct Save {
    pub handoff: StoredHandoff,
    pub idempotency_key: String,
    pub fingerprint: Vec<u8>,
    pub events: Vec<pb::Event>,
    pub fallback: Option<Fallback>,
    pub deflection: Option<pb::Deflection>,
    /// The handoff was written before it sent ([`Intents`]): its outcome is written over that
    /// row, if it is still in progress (a retry may have finished it first).
    pub intended: bool,
    /// It sent nothing: the consumer's lease, if it holds it, is given back.
    pub release_consumer: bool,
}

/// A handoff about to send: written first, with its idempotency record and the consumer's lease.
#[derive(Debug)]
pub struct Intent {
    /// In progress, no attempts yet.
    pub handoff: StoredHandoff,
    pub idempotency_key: String,
    pub fingerprint: Vec<u8>,
    /// How long the consumer's lease lasts from now.
    pub lease: std::time::Duration,
    /// The request, encoded: what c2m finishes the handoff from if its IVR never retries.
    pub request: Vec<u8>,
    /// Take the consumer's lease here too, unless another live handoff holds it: a new handoff
    /// does (see `engine::Carry`), a handoff finished after its sender left does not.
    pub take_lease: bool,
}

/// What writing an intent found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intended {
    /// Written (or already there, for a retry finishing it): the handoff holds its key and its
    /// consumer, and may send.
    Holding,
    /// Written, holding its key; another handoff (named) holds the consumer, so this one is to
    /// send nothing.
    ConsumerHeld(String),
    /// Another handoff holds the idempotency key: nothing was written.
    KeyTaken,
}

/// A pending fallback that is due to be looked at.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub handoff_id: String,
    pub account_id: String,
    /// The message on its way.
    pub message_id: String,
    /// The steps still to try (`encode_steps`).
    pub remaining: serde_json::Value,
    /// Past it an undelivered message counts as failed.
    pub deadline: Option<DateTime<Utc>>,
    /// The configuration's delivery deadline, for the next channel's message.
    pub window_seconds: Option<i32>,
    /// The send went unanswered: past this, with no report from the provider, the next channel.
    pub confirm_by: Option<DateTime<Utc>>,
    pub watched_since: DateTime<Utc>,
}

/// What a fallback's send came to, to be recorded.
#[derive(Debug)]
pub struct Fell {
    /// The fallback as it was claimed.
    pub due: Due,
    /// How many attempts the handoff had when the send began (the next channel's message ids
    /// follow on from them).
    pub attempts_before: usize,
    /// The handoff as it is to be written, given that nothing changed it meanwhile.
    pub handoff: StoredHandoff,
    pub events: Vec<pb::Event>,
    pub deflection: Option<pb::Deflection>,
    /// What to watch next, when channels remain.
    pub next: Option<Next>,
}

/// The next message a fallback watches: its id, the steps left, and until when its provider has
/// to confirm it.
#[derive(Debug)]
pub struct Next {
    pub message_id: String,
    pub remaining: serde_json::Value,
    pub confirm_by: Option<DateTime<Utc>>,
}

/// Every statement Handoff makes. Errors are the database driver's: whether one is transient
/// (`c2m_storage::postgres::db_status`) decides what the caller hears.
#[async_trait]
pub trait HandoffStore: Send + Sync + 'static {
    /// The schema is migrated and the store can be used.
    fn is_ready(&self) -> bool;

    // The hot path, batched across concurrent handoffs.

    /// The handoff an unexpired idempotency key points at, with its request's fingerprint.
    async fn replay(
        &self,
        account_id: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredHandoff)>, sqlx::Error>;
    /// Writes a handoff about to send, in progress (see [`Intended`]).
    async fn intend(&self, intent: Arc<Intent>) -> Result<Intended, sqlx::Error>;
    /// Writes a handoff's outcome, offered again while the database refuses, until `until`.
    async fn save(&self, save: Arc<Save>, until: Instant) -> Result<Saved, sqlx::Error>;

    // Lookups and sweeps.

    async fn load(
        &self,
        account_id: &str,
        handoff_id: &str,
    ) -> Result<Option<StoredHandoff>, sqlx::Error>;
    /// Handoffs left in progress for longer than `after` (and less than a day): their ids, when
    /// they were written, and their requests, oldest first.
    async fn abandoned(
        &self,
        after: Duration,
        limit: i64,
    ) -> Result<Vec<(String, DateTime<Utc>, Vec<u8>)>, sqlx::Error>;
    /// The account's handoffs of the last `span`: what its rate-limit window and its consumers'
    /// leases held.
    async fn recent(&self, account_id: &str, span: Duration) -> Result<Vec<Recent>, sqlx::Error>;
    /// Deletes consumer leases that expired a minute ago or more.
    async fn prune_leases(&self) -> Result<u64, sqlx::Error>;

    // The fallback round: claim for a lease, send (outside the store), record.

    /// Takes up to `limit` due fallbacks for `lease`: no other round looks at them until it
    /// ends, or they are rescheduled.
    async fn claim_fallbacks(&self, limit: i64, lease: Duration) -> Result<Vec<Due>, sqlx::Error>;
    /// Stops watching these handoffs' messages.
    async fn drop_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error>;
    /// Looks at these again after a pause that grows with the time watched (a tenth of it,
    /// 200 ms to 5 s), never past their deadline or confirmation time.
    async fn wait_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error>;
    /// Looks at one again in `after`.
    async fn retry_fallback_in(&self, handoff_id: &str, after: Duration)
    -> Result<(), sqlx::Error>;
    /// Marks the attempt that sent `message_id`, which its provider never answered, as sent:
    /// the provider has since reported on it.
    async fn confirm_send(
        &self,
        handoff_id: &str,
        message_id: &str,
        provider_message_id: &str,
    ) -> Result<(), sqlx::Error>;
    /// Records a fallback's send in one transaction, unless another round recorded it first
    /// (then nothing is written, and `false` says so).
    async fn record_fallback(&self, fell: &Fell) -> Result<bool, sqlx::Error>;
}
