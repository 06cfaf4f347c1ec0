//! Reading a handoff back, as GetHandoff answers it.

use c2m_proto::v1::{self as pb, FunnelStage};

use super::Engine;
use crate::{error::Error, store::StoredHandoff};

impl Engine {
    /// A handoff as GetHandoff answers it, with its message's delivery so far.
    pub(crate) async fn get(
        &self,
        account_id: &str,
        handoff_id: &str,
    ) -> Result<pb::Handoff, Error> {
        let handoff = self
            .store
            .load(account_id, handoff_id)
            .await?
            .ok_or_else(|| Error::NotFound(handoff_id.to_owned()))?;
        let progress = self.progress(&handoff).await;
        Ok(handoff.to_wire(progress))
    }

    async fn progress(&self, handoff: &StoredHandoff) -> Option<pb::DeliveryProgress> {
        let message_id = handoff.sent_message_id()?;
        let message = self
            .peers
            .channel_gateway()
            .get_message(pb::GetMessageRequest {
                account_id: handoff.account_id.clone(),
                message_id: message_id.to_owned(),
            })
            .await
            .ok()?
            .into_inner()
            .message?;
        Some(pb::DeliveryProgress {
            sent_at: message.sent_at,
            delivered_at: message.delivered_at,
            read_at: message.read_at,
            stage: message.stage,
            failed_at: if message.stage() == FunnelStage::Failed {
                message.updated_at
            } else {
                None
            },
            // The reply reaches Routing, not the gateway: Reporting's ListTransactions has it.
            responded_at: None,
        })
    }
}
