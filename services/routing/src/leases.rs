//! The consumer's open-conversation lease: written when a conversation opens (and when Handoff
//! found it missing), deleted when it closes. PostgreSQL holds the fact; the lease only spares
//! Handoff the read of Routing's database on the hot path.

use std::time::Duration;

use c2m_runtime::mask_phone;

use crate::Service;

/// How long an open-conversation lease lives without being written again. PostgreSQL holds the
/// fact; the lease only spares Handoff the read. It expires so that one Redis could not delete
/// (the conversation closed while Redis was away) stops blocking the consumer within this time.
const LEASE_TTL: Duration = Duration::from_secs(15 * 60);

impl Service {
    /// Writes (or, with no conversation, deletes) the consumer's lease; while Redis is away,
    /// nothing (PostgreSQL decides meanwhile).
    pub(crate) async fn set_lease(
        &self,
        account_id: &str,
        consumer: &str,
        conversation_id: Option<&str>,
    ) {
        if self.breaker.is_open() {
            return;
        }
        let written =
            self.coordination
                .set_conversation(account_id, consumer, conversation_id, LEASE_TTL);
        match written.await {
            Ok(()) => {
                if self.breaker.succeeded() {
                    tracing::info!("redis is back: open-conversation leases written again");
                }
            }
            Err(error) => {
                if self.breaker.failed() {
                    tracing::warn!(%error, consumer = %mask_phone(consumer), "redis unavailable: open-conversation leases not written (PostgreSQL still decides)");
                }
            }
        }
    }
}
