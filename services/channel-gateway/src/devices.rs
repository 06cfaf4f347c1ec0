//! The devices consumers registered for app messaging, by the brand's consumer id.

use c2m_proto::v1::DevicePlatform;
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub platform: DevicePlatform,
    pub token: String,
}

/// Registers a device; a token moves to the consumer who registered it last (a phone changes
/// hands, or a user logs in as someone else).
pub async fn register(
    db: &PgPool,
    account_id: &str,
    consumer_id: &str,
    platform: DevicePlatform,
    token: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO devices (account_id, consumer_id, platform, device_token) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (account_id, device_token) DO UPDATE \
         SET consumer_id = EXCLUDED.consumer_id, platform = EXCLUDED.platform, registered_at = now()",
    )
    .bind(account_id)
    .bind(consumer_id)
    .bind(platform.as_str_name())
    .bind(token)
    .execute(db)
    .await?;
    Ok(())
}

/// Removes one of a consumer's devices; `false` when there was none.
pub async fn remove(
    db: &PgPool,
    account_id: &str,
    consumer_id: &str,
    token: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM devices WHERE account_id = $1 AND consumer_id = $2 AND device_token = $3",
    )
    .bind(account_id)
    .bind(consumer_id)
    .bind(token)
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Forgets a token the provider said is no longer valid.
pub async fn forget(db: &PgPool, account_id: &str, token: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM devices WHERE account_id = $1 AND device_token = $2")
        .bind(account_id)
        .bind(token)
        .execute(db)
        .await?;
    Ok(())
}

/// A consumer's devices, the most recently registered first.
pub async fn of(
    db: &PgPool,
    account_id: &str,
    consumer_id: &str,
) -> Result<Vec<Device>, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT platform, device_token FROM devices \
         WHERE account_id = $1 AND consumer_id = $2 ORDER BY registered_at DESC LIMIT 20",
    )
    .bind(account_id)
    .bind(consumer_id)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(platform, token)| Device {
            platform: DevicePlatform::from_str_name(&platform).unwrap_or_default(),
            token,
        })
        .collect())
}
