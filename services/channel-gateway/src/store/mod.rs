//! The gateway's storage: every statement it makes, behind [`GatewayStore`] and, for a provider's
//! report (stored in the inbox, the message moved forward, its events written, all at once),
//! [`GatewayTx`]. The rules (which id is whose, how far a stage moves) are the callers'; the
//! store reads and writes. PostgreSQL is `postgres`; the embedded default's SQLite is `sqlite`;
//! `store_conformance` (beside the callers whose rules it runs) holds both to the same answers.

mod postgres;
mod sqlite;

pub(crate) use postgres::PgGatewayStore;
pub(crate) use sqlite::SqliteGatewayStore;

use std::sync::Arc;

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, DevicePlatform, FunnelStage, LineType, Provider};
use c2m_runtime::health::Probe;
use chrono::{DateTime, Utc};

use crate::devices::Device;

/// An outbound message as stored: claimed before its send, its outcome and stages after.
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

/// A provider's report applied to a message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StageChange<'a> {
    pub message_id: &'a str,
    pub stage: FunnelStage,
    pub error_code: Option<&'a str>,
    /// Fills in the provider's id if the message has none yet.
    pub provider_message_id: &'a str,
    pub delivered: bool,
    pub read: bool,
}

#[async_trait]
pub(crate) trait GatewayStore: Send + Sync + 'static {
    /// What health checks ask: SERVING while the store answers.
    fn probe(&self) -> Arc<dyn Probe>;
    /// A transaction for a provider's report.
    async fn begin(&self) -> Result<Box<dyn GatewayTx>, sqlx::Error>;

    /// Messages by id, in the ids' order.
    async fn messages(&self, ids: &[String]) -> Result<Vec<Option<Outbound>>, sqlx::Error>;
    /// Writes these claims unless their ids are taken; the tokens (`claimed_by`) of the claims
    /// written. Not their ids: two claims of one id in one batch write one row, and only its
    /// token says which of the two it is.
    async fn claim(&self, claims: &[Arc<Outbound>]) -> Result<Vec<String>, sqlx::Error>;
    /// Records sends' outcomes on their claims, filling in only what a provider's report has not
    /// set meanwhile; the messages as they stand after.
    async fn record(&self, outcomes: &[Arc<Outbound>]) -> Result<Vec<Outbound>, sqlx::Error>;
    /// Deletes a claim no message left for (its send gave up before calling the provider).
    async fn take_back(
        &self,
        message_id: &str,
        claimed_by: Option<&str>,
    ) -> Result<(), sqlx::Error>;

    /// Stores sealed credentials, replacing what was there.
    async fn put_credentials(
        &self,
        account_id: &str,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<(), sqlx::Error>;
    async fn delete_credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<bool, sqlx::Error>;
    async fn credentials(
        &self,
        account_id: &str,
        provider: Provider,
    ) -> Result<Option<Vec<u8>>, sqlx::Error>;

    /// Registers a device; a token moves to the consumer who registered it last.
    async fn register_device(
        &self,
        account_id: &str,
        consumer_id: &str,
        platform: DevicePlatform,
        token: &str,
    ) -> Result<(), sqlx::Error>;
    /// Removes one of a consumer's devices; `false` when there was none.
    async fn remove_device(
        &self,
        account_id: &str,
        consumer_id: &str,
        token: &str,
    ) -> Result<bool, sqlx::Error>;
    /// Forgets a token, whoever registered it.
    async fn forget_device(&self, account_id: &str, token: &str) -> Result<(), sqlx::Error>;
    /// A consumer's devices, the most recently registered first, at most 20.
    async fn devices(
        &self,
        account_id: &str,
        consumer_id: &str,
    ) -> Result<Vec<Device>, sqlx::Error>;

    /// When the consumer last wrote on WhatsApp.
    async fn last_inbound(
        &self,
        account_id: &str,
        phone: &str,
    ) -> Result<Option<DateTime<Utc>>, sqlx::Error>;
    /// The consumer wrote at `at` (an earlier time than the last changes nothing).
    async fn inbound(
        &self,
        account_id: &str,
        phone: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error>;

    /// What a number was found to be, and when.
    async fn line_type(
        &self,
        phone: &str,
    ) -> Result<Option<(LineType, DateTime<Utc>)>, sqlx::Error>;
    async fn remember_line_type(&self, phone: &str, kind: LineType) -> Result<(), sqlx::Error>;
}

/// A provider's report, in one transaction: nothing is written unless it commits.
#[async_trait]
pub(crate) trait GatewayTx: Send {
    /// Stores a verified delivery in the inbox, held for this change; `false` when it was
    /// processed before.
    async fn store(&mut self, dedup_key: &str, body: &[u8]) -> Result<bool, sqlx::Error>;
    async fn processed(&mut self, dedup_key: &str) -> Result<(), sqlx::Error>;
    /// The account's message a report speaks of (by our id, or the channel's provider id), held
    /// for this change.
    async fn reported(
        &mut self,
        account_id: &str,
        channel: Channel,
        provider_message_id: &str,
        message_id: Option<&str>,
    ) -> Result<Option<Outbound>, sqlx::Error>;
    async fn change_stage(&mut self, change: &StageChange<'_>) -> Result<(), sqlx::Error>;
    /// Stages of agents' and bots' messages for Routing, shipped once this commits.
    async fn enqueue_stages(&mut self, stages: &[pb::MessageStage]) -> Result<(), sqlx::Error>;
    /// Funnel events for Reporting, shipped once this commits.
    async fn enqueue(&mut self, events: &[pb::Event]) -> Result<(), sqlx::Error>;
    async fn commit(self: Box<Self>) -> Result<(), sqlx::Error>;
}
