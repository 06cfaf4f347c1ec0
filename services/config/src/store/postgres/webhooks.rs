//! Webhook endpoints: what admins set (audited), the lease and position of the replica that
//! delivers for each, and the deliveries it made.

use std::time::Duration;

use sqlx::PgPool;

use super::*;
use crate::{
    model::{WebhookDelivery, WebhookEndpoint},
    store::{LeasedWebhook, WebhookPosition},
};

fn endpoint_row(row: &PgRow) -> Result<WebhookEndpoint, sqlx::Error> {
    Ok(WebhookEndpoint {
        id: row.try_get("webhook_endpoint_id")?,
        account_id: row.try_get("account_id")?,
        url: row.try_get("url")?,
        description: row.try_get("description")?,
        event_types: row.try_get("event_types")?,
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: row.try_get("failing_since")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn leased_row(row: &PgRow) -> Result<LeasedWebhook, sqlx::Error> {
    Ok(LeasedWebhook {
        endpoint: endpoint_row(row)?,
        secret: row.try_get("secret")?,
        previous_secret: row.try_get("previous_secret")?,
        cursor: row.try_get("cursor")?,
        handoff_position: row.try_get("handoff_position")?,
        version: row.try_get("version")?,
    })
}

/// The previous secret is still signed with until this time.
const PREVIOUS_SECRET: &str = "CASE WHEN previous_until > now() THEN previous_secret END";

pub(super) async fn create(
    pool: &PgPool,
    e: &WebhookEndpoint,
    secret: &[u8],
    actor: Actor<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO webhook_endpoints (webhook_endpoint_id, account_id, url, description, \
             event_types, enabled, disabled_reason, secret, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(&e.id)
    .bind(&e.account_id)
    .bind(&e.url)
    .bind(&e.description)
    .bind(&e.event_types)
    .bind(e.enabled)
    .bind(&e.disabled_reason)
    .bind(secret)
    .bind(e.created_at)
    .execute(&mut *tx)
    .await
    .map_err(conflict("webhook endpoint"))?;
    let resource = format!("webhook_endpoints/{}", e.id);
    let after = Some(endpoint_json(e));
    audit(
        &mut tx,
        &e.account_id,
        actor,
        "CreateWebhookEndpoint",
        &resource,
        None,
        after,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn get(
    pool: &PgPool,
    account_id: &str,
    id: &str,
) -> Result<Option<WebhookEndpoint>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE account_id = $1 AND webhook_endpoint_id = $2"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(endpoint_row).transpose()?)
}

pub(super) async fn list(
    pool: &PgPool,
    account_id: &str,
) -> Result<Vec<WebhookEndpoint>, StoreError> {
    let rows = sqlx::query(sql(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE account_id = $1 ORDER BY webhook_endpoint_id"
    )))
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(endpoint_row).collect::<Result<_, _>>()?)
}

pub(super) async fn update(
    pool: &PgPool,
    e: &WebhookEndpoint,
    actor: Actor<'_>,
) -> Result<Option<WebhookEndpoint>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query(sql(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints \
         WHERE account_id = $1 AND webhook_endpoint_id = $2 FOR UPDATE"
    )))
    .bind(&e.account_id)
    .bind(&e.id)
    .fetch_optional(&mut *tx)
    .await?
    .as_ref()
    .map(endpoint_row)
    .transpose()?
    else {
        return Ok(None);
    };
    let after = sqlx::query(sql(format!(
        "UPDATE webhook_endpoints SET url = $2, description = $3, event_types = $4, \
             enabled = $5, disabled_reason = $6, \
             failing_since = CASE WHEN $5 AND NOT enabled THEN NULL ELSE failing_since END, \
             version = version + 1, updated_at = now() \
         WHERE webhook_endpoint_id = $1 RETURNING {ENDPOINT_COLUMNS}"
    )))
    .bind(&e.id)
    .bind(&e.url)
    .bind(&e.description)
    .bind(&e.event_types)
    .bind(e.enabled)
    .bind(&e.disabled_reason)
    .fetch_one(&mut *tx)
    .await?;
    let after = endpoint_row(&after)?;
    audit(
        &mut tx,
        &e.account_id,
        actor,
        "UpdateWebhookEndpoint",
        &format!("webhook_endpoints/{}", e.id),
        Some(endpoint_json(&before)),
        Some(endpoint_json(&after)),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(after))
}

pub(super) async fn delete(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    actor: Actor<'_>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let gone = sqlx::query(sql(format!(
        "DELETE FROM webhook_endpoints WHERE account_id = $1 AND webhook_endpoint_id = $2 \
         RETURNING {ENDPOINT_COLUMNS}"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(gone) = gone.as_ref().map(endpoint_row).transpose()? else {
        return Ok(false);
    };
    let resource = format!("webhook_endpoints/{id}");
    let before = Some(endpoint_json(&gone));
    audit(
        &mut tx,
        account_id,
        actor,
        "DeleteWebhookEndpoint",
        &resource,
        before,
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn rotate(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    secret: &[u8],
    keep_previous: Duration,
    actor: Actor<'_>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let rotated = sqlx::query(
        "UPDATE webhook_endpoints SET previous_secret = secret, secret = $3, \
             previous_until = now() + make_interval(secs => $4), version = version + 1, \
             updated_at = now() \
         WHERE account_id = $1 AND webhook_endpoint_id = $2",
    )
    .bind(account_id)
    .bind(id)
    .bind(secret)
    .bind(keep_previous.as_secs_f64())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if rotated {
        let resource = format!("webhook_endpoints/{id}");
        audit(
            &mut tx,
            account_id,
            actor,
            "RotateWebhookSecret",
            &resource,
            None,
            None,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(rotated)
}

pub(super) async fn for_test(
    pool: &PgPool,
    account_id: &str,
    id: &str,
) -> Result<Option<LeasedWebhook>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {ENDPOINT_COLUMNS}, secret, {PREVIOUS_SECRET} AS previous_secret, cursor, handoff_position, version \
         FROM webhook_endpoints WHERE account_id = $1 AND webhook_endpoint_id = $2"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.as_ref().map(leased_row).transpose()?)
}

pub(super) async fn lease(
    pool: &PgPool,
    owner: &str,
    ttl: Duration,
) -> Result<Vec<LeasedWebhook>, StoreError> {
    let rows = sqlx::query(sql(format!(
        "UPDATE webhook_endpoints SET lease_owner = $1, \
             lease_until = now() + make_interval(secs => $2) \
         WHERE enabled AND (lease_until IS NULL OR lease_until < now() OR lease_owner = $1) \
         RETURNING {ENDPOINT_COLUMNS}, secret, {PREVIOUS_SECRET} AS previous_secret, cursor, handoff_position, version"
    )))
    .bind(owner)
    .bind(ttl.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(leased_row).collect::<Result<_, _>>()?)
}

pub(super) async fn passed(
    pool: &PgPool,
    id: &str,
    owner: &str,
    position: WebhookPosition<'_>,
    delivered: bool,
) -> Result<bool, StoreError> {
    // Only a delivery says the receiver is well; passing over an event it did not subscribe to
    // says nothing about it.
    let query = match position {
        WebhookPosition::Conversations(cursor) => sqlx::query(
            "UPDATE webhook_endpoints SET cursor = $3, \
                 failing_since = CASE WHEN $4 THEN NULL ELSE failing_since END \
             WHERE webhook_endpoint_id = $1 AND lease_owner = $2 AND enabled",
        )
        .bind(id)
        .bind(owner)
        .bind(cursor),
        WebhookPosition::Handoffs(position) => sqlx::query(
            "UPDATE webhook_endpoints SET handoff_position = $3, \
                 failing_since = CASE WHEN $4 THEN NULL ELSE failing_since END \
             WHERE webhook_endpoint_id = $1 AND lease_owner = $2 AND enabled",
        )
        .bind(id)
        .bind(owner)
        .bind(position),
    };
    Ok(query.bind(delivered).execute(pool).await?.rows_affected() == 1)
}

pub(super) async fn failed(
    pool: &PgPool,
    id: &str,
    owner: &str,
    disable_after: Duration,
) -> Result<bool, StoreError> {
    let enabled: Option<bool> = sqlx::query_scalar(
        "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()), \
             enabled = enabled \
                 AND coalesce(failing_since, now()) > now() - make_interval(secs => $3), \
             disabled_reason = CASE \
                 WHEN NOT enabled \
                     OR coalesce(failing_since, now()) > now() - make_interval(secs => $3) \
                 THEN disabled_reason \
                 ELSE 'deliveries failed since ' || to_char(coalesce(failing_since, now()) AT TIME ZONE 'UTC', \
                     'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') || '; enable it again to resume' END \
         WHERE webhook_endpoint_id = $1 AND lease_owner = $2 RETURNING enabled",
    )
    .bind(id)
    .bind(owner)
    .bind(disable_after.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    Ok(enabled.unwrap_or(false))
}

pub(super) async fn record(pool: &PgPool, d: &WebhookDelivery) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_deliveries (webhook_endpoint_id, webhook_id, event_type, attempt, \
             http_status, error, duration_ms, succeeded, at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&d.endpoint_id)
    .bind(&d.webhook_id)
    .bind(&d.event_type)
    .bind(i32::try_from(d.attempt).unwrap_or(i32::MAX))
    .bind(i32::from(d.http_status))
    .bind(&d.error)
    .bind(i32::try_from(d.duration_ms).unwrap_or(i32::MAX))
    .bind(d.succeeded)
    .bind(d.at)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn deliveries(
    pool: &PgPool,
    id: &str,
    before: i64,
    limit: i64,
) -> Result<Vec<(i64, WebhookDelivery)>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, webhook_endpoint_id, webhook_id, event_type, attempt, http_status, error, \
             duration_ms, succeeded, at \
         FROM webhook_deliveries WHERE webhook_endpoint_id = $1 AND ($2 = 0 OR id < $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                WebhookDelivery {
                    endpoint_id: row.try_get("webhook_endpoint_id")?,
                    webhook_id: row.try_get("webhook_id")?,
                    event_type: row.try_get("event_type")?,
                    attempt: row.try_get::<i32, _>("attempt")? as u32,
                    http_status: row.try_get::<i32, _>("http_status")? as u16,
                    error: row.try_get("error")?,
                    duration_ms: row.try_get::<i32, _>("duration_ms")? as u32,
                    succeeded: row.try_get("succeeded")?,
                    at: row.try_get("at")?,
                },
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?)
}

pub(super) async fn prune(pool: &PgPool, age: Duration) -> Result<u64, StoreError> {
    Ok(
        sqlx::query("DELETE FROM webhook_deliveries WHERE at < now() - make_interval(secs => $1)")
            .bind(age.as_secs_f64())
            .execute(pool)
            .await?
            .rows_affected(),
    )
}
