//! Deflections on their way to Routing. A handoff that sent a message writes what Routing needs
//! to open the conversation when the consumer replies into its own commit (`deflection_outbox`);
//! a relay ships them. Routing asks for a flush when a reply finds nothing, so a consumer who
//! answers within the relay's few milliseconds is still routed.

use c2m_proto::v1::{self as pb, RecordDeflectionsRequest};
use c2m_runtime::peers::Peers;
use c2m_storage::outbox::{Destination, RelayError};
use prost::Message;

/// `deflection_outbox`, to Routing's `RecordDeflections`, which keeps a handoff's latest send.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ToRouting;

impl Destination for ToRouting {
    const TABLE: &'static str = "deflection_outbox";

    async fn deliver(&self, peers: &Peers, payloads: Vec<Vec<u8>>) -> Result<(), RelayError> {
        let deflections = payloads
            .iter()
            .map(|payload| pb::Deflection::decode(payload.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        peers
            .routing()
            .record_deflections(RecordDeflectionsRequest { deflections })
            .await?;
        Ok(())
    }
}
