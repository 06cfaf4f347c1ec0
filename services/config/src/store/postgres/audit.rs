use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use super::*;

pub(super) async fn list(
    pool: &PgPool,
    account_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> Result<Vec<AuditRecord>, StoreError> {
    let rows = sqlx::query(
        "SELECT audit_event_id, account_id, actor, action, resource, before, after, at FROM audit_events \
         WHERE account_id = $1 AND at >= $2 AND at < $3 AND audit_event_id > $4 \
         ORDER BY audit_event_id LIMIT $5",
    )
    .bind(account_id)
    .bind(start)
    .bind(end)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            Ok(AuditRecord {
                id: row.try_get("audit_event_id")?,
                account_id: row.try_get("account_id")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                resource: row.try_get("resource")?,
                before: row.try_get("before")?,
                after: row.try_get("after")?,
                at: row.try_get("at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::Db)
}
