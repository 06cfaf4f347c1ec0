//! A consumer's reply reaching its conversation: opened from the latest deflection of the
//! consumer (on the reply's channel, else any), or appended to the one open. A reply that comes
//! before its deflection has reached Routing asks Handoff for the deflections still in its outbox
//! and looks again.

use c2m_proto::v1 as pb;
use c2m_runtime::mask_phone;
use tonic::Status;

use crate::{
    Service,
    conversations::{self, Inbound, RouteError, Routed},
    db_status,
};

/// Replies count within this many hours when the account's setting cannot be read.
pub(crate) const DEFAULT_LOOKBACK_HOURS: u32 = 24;

impl Service {
    /// Routes a consumer's reply; FAILED_PRECONDITION when no deflection of theirs is found.
    pub(crate) async fn route_reply(&self, mut inbound: Inbound<'_>) -> Result<Routed, Status> {
        // Two replies racing to open the conversation: the unique index lets one win; the other
        // retries and appends to it. A reply that finds no deflection, or only one on another
        // channel (its fallback to this channel may not be here yet), asks Handoff for the ones
        // still in its outbox, and looks once more, then taking the latest on any channel.
        let (mut raced, mut flushed) = (false, false);
        let routed = loop {
            let mut tx = self.store.begin().await.map_err(db_status)?;
            match conversations::route(&mut *tx, &inbound).await {
                Ok(routed) => match tx.commit().await {
                    Ok(()) => break routed,
                    Err(e) => return Err(db_status(e)),
                },
                Err(RouteError::Db(sqlx::Error::Database(e)))
                    if e.is_unique_violation() && !raced =>
                {
                    raced = true;
                }
                Err(RouteError::Db(e)) => return Err(db_status(e)),
                Err(RouteError::NoDeflection(_) | RouteError::OtherChannel(_)) if !flushed => {
                    drop(tx);
                    flushed = true;
                    inbound.any_channel = true;
                    self.flush_deflections().await?;
                }
                Err(e @ (RouteError::NoDeflection(_) | RouteError::OtherChannel(_))) => {
                    return Err(Status::failed_precondition(e.to_string()));
                }
            }
        };
        if routed.opened {
            self.set_lease(
                inbound.account_id,
                inbound.consumer,
                Some(&routed.conversation_id),
            )
            .await;
            self.relay.wake();
            tracing::info!(
                account_id = %inbound.account_id,
                conversation_id = %routed.conversation_id,
                handoff_id = %routed.handoff_id,
                consumer = %mask_phone(inbound.consumer),
                "conversation opened"
            );
        }
        Ok(routed)
    }

    /// Has Handoff ship the deflections it committed and Routing has not seen yet. A reply must
    /// not be given up on while its deflection may be among them: when Handoff cannot be asked,
    /// the caller is told to retry (the gateway has the provider deliver the reply again).
    async fn flush_deflections(&self) -> Result<(), Status> {
        match self
            .peers
            .handoff()
            .flush_deflections(pb::FlushDeflectionsRequest {})
            .await
        {
            Ok(flushed) => {
                let shipped = flushed.into_inner().shipped;
                if shipped > 0 {
                    tracing::info!(shipped, "a reply arrived before its deflection: flushed");
                }
                Ok(())
            }
            Err(status) => {
                tracing::warn!(%status, "cannot have Handoff flush its deflections");
                Err(Status::unavailable(
                    "cannot ask Handoff for deflections not yet shipped to Routing; retry",
                ))
            }
        }
    }

    /// The account's reply lookback (its default while Config cannot be asked).
    pub(crate) async fn lookback_hours(&self, account_id: &str) -> u32 {
        match self
            .peers
            .config()
            .get_account(pb::GetAccountRequest {
                account_id: account_id.to_owned(),
            })
            .await
        {
            Ok(response) => response
                .into_inner()
                .account
                .and_then(|a| a.settings)
                .map_or(DEFAULT_LOOKBACK_HOURS, |s| s.reply_lookback_hours),
            Err(status) => {
                tracing::warn!(%status, account_id, "account settings unavailable, using the default lookback");
                DEFAULT_LOOKBACK_HOURS
            }
        }
    }
}
