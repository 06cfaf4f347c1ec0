//! WhatsApp's customer-service window: free-form text may be sent for 24 hours after the
//! consumer's last message to the business; outside it only an approved template may start a
//! conversation. Tracked per account and number from Meta's inbound webhooks.

use crate::store::GatewayStore;

/// How long after the consumer's last message the window stays open.
const WINDOW: chrono::Duration = chrono::Duration::hours(24);

/// When the window with this number closes, if it is open.
pub async fn closes_at(
    store: &dyn GatewayStore,
    account_id: &str,
    phone: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    Ok(store
        .last_inbound(account_id, phone)
        .await?
        .map(|last| last + WINDOW)
        .filter(|closes| *closes > chrono::Utc::now()))
}
