//! WhatsApp's customer-service window: free-form text may be sent for 24 hours after the
//! consumer's last message to the business; outside it only an approved template may start a
//! conversation. Tracked per account and number from Meta's inbound webhooks.

use sqlx::PgPool;

/// When the window with this number closes, if it is open.
pub async fn closes_at(
    db: &PgPool,
    account_id: &str,
    phone: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT last_inbound_at + interval '24 hours' FROM whatsapp_windows \
         WHERE account_id = $1 AND phone = $2 AND last_inbound_at + interval '24 hours' > now()",
    )
    .bind(account_id)
    .bind(phone)
    .fetch_optional(db)
    .await
}

/// The consumer wrote to the business at `at`: the window runs 24 hours from then.
pub async fn opened(
    db: &PgPool,
    account_id: &str,
    phone: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO whatsapp_windows (account_id, phone, last_inbound_at) VALUES ($1, $2, $3) \
         ON CONFLICT (account_id, phone) DO UPDATE \
         SET last_inbound_at = GREATEST(whatsapp_windows.last_inbound_at, EXCLUDED.last_inbound_at)",
    )
    .bind(account_id)
    .bind(phone)
    .bind(at)
    .execute(db)
    .await?;
    Ok(())
}
