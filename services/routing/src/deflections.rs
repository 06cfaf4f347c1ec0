//! What Routing knows about a consumer before a message goes (the statement on every handoff's
//! path, batched across concurrent handoffs: see `c2m_storage::batch`), and the record of what
//! went, which Handoff's deflection outbox ships in batches of its own (`RoutingStore::record_deflections`).

use std::sync::Arc;

use c2m_storage::batch::Statement;

use crate::store::{Check, Consumer, RoutingStore};

/// Consumers checked together, one row each, in one statement.
pub struct Checks(pub Arc<dyn RoutingStore>);

impl Statement for Checks {
    type Row = Check;
    type Output = Consumer;

    async fn run(&self, checks: &[Check]) -> Result<Vec<Consumer>, sqlx::Error> {
        self.0.check_consumers(checks).await
    }
}
