//! Consumers' consent per channel: the current opt-outs every handoff reads, and the history of
//! every opt-out and opt-in, which brands list and export.

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::{mask_phone, status::FieldViolations};
use tonic::Status;

use crate::{
    db_status, required,
    store::{Change, RoutingStore},
};
use c2m_storage::outbox;

/// Records a change of consent with its history row and funnel event; `false` when it changes
/// nothing (STOP from a consumer already opted out, START from one who never did), which is
/// neither recorded nor counted again.
pub(crate) async fn record(store: &dyn RoutingStore, c: &Change<'_>) -> Result<bool, sqlx::Error> {
    let mut tx = store.begin().await?;
    if !tx.consent(c).await? {
        return Ok(false);
    }
    let stage = if c.opted_in {
        FunnelStage::OptedIn
    } else {
        FunnelStage::OptedOut
    };
    let event = pb::Event {
        channel: c.channel as i32,
        source: c.source.to_owned(),
        ..outbox::event(c.account_id, stage)
    };
    tx.enqueue(&[event]).await?;
    tx.commit().await?;
    Ok(true)
}

impl crate::Service {
    /// Validates and records an opt-out or opt-in.
    pub(crate) async fn record_consent(
        &self,
        account_id: &str,
        consumer_phone: &str,
        channel: i32,
        source: &str,
        opted_in: bool,
    ) -> Result<(), Status> {
        let mut violations = FieldViolations::new();
        required(&mut violations, "account_id", account_id);
        required(&mut violations, "consumer_phone", consumer_phone);
        if source.len() > 128 {
            violations.add("source", "at most 128 characters");
        }
        let channel = match Channel::try_from(channel) {
            Ok(Channel::Unspecified) | Err(_) => {
                violations.add("channel", "a channel is required");
                Channel::Unspecified
            }
            Ok(channel) => channel,
        };
        violations.into_result()?;
        let change = Change {
            account_id,
            consumer_phone,
            channel,
            source,
            opted_in,
        };
        if record(&*self.store, &change).await.map_err(db_status)? {
            self.relay.wake();
            tracing::info!(account_id, consumer = %mask_phone(consumer_phone), channel = channel.as_str_name(), source, opted_in, "consent changed");
        }
        Ok(())
    }
}
