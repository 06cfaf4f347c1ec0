//! Webhook endpoints: what admins set (audited), the lease and position of the delivering task,
//! and the deliveries it made.

use std::time::Duration;

use c2m_storage::sqlite::span;

use super::*;

fn endpoint_row(row: &SqliteRow) -> Result<WebhookEndpoint, sqlx::Error> {
    Ok(WebhookEndpoint {
        id: row.try_get("webhook_endpoint_id")?,
        account_id: row.try_get("account_id")?,
        url: row.try_get("url")?,
        description: row.try_get("description")?,
        event_types: strings(row.try_get("event_types")?),
        enabled: row.try_get("enabled")?,
        disabled_reason: row.try_get("disabled_reason")?,
        failing_since: optional_time(row, "failing_since")?,
        created_at: time(row.try_get("created_at")?),
        updated_at: time(row.try_get("updated_at")?),
    })
}

fn leased_row(row: &SqliteRow) -> Result<LeasedWebhook, sqlx::Error> {
    Ok(LeasedWebhook {
        endpoint: endpoint_row(row)?,
        secret: row.try_get("secret")?,
        previous_secret: row.try_get("previous_secret")?,
        cursor: row.try_get("cursor")?,
        handoff_position: row.try_get("handoff_position")?,
        version: row.try_get("version")?,
    })
}

/// What delivering needs beside the endpoint; the previous secret only while it is still signed
/// with (`?3` is now).
const LEASED: &str = "secret, CASE WHEN previous_until > ?3 THEN previous_secret END \
    AS previous_secret, cursor, handoff_position, version";

impl SqliteConfigStore {
    pub(super) async fn create_webhook(
        &self,
        e: &WebhookEndpoint,
        secret: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO webhook_endpoints (webhook_endpoint_id, account_id, url, description, \
                 event_types, enabled, disabled_reason, secret, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        )
        .bind(&e.id)
        .bind(&e.account_id)
        .bind(&e.url)
        .bind(&e.description)
        .bind(json_list(&e.event_types))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(secret)
        .bind(micros(e.created_at))
        .execute(&mut *tx)
        .await
        .map_err(conflict("webhook endpoint"))?;
        let change = audit(
            &mut tx,
            &e.account_id,
            actor,
            "CreateWebhookEndpoint",
            &format!("webhook_endpoints/{}", e.id),
            None,
            Some(endpoint_json(e)),
        )
        .await?;
        self.commit(tx, change).await
    }

    pub(super) async fn webhook(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints \
             WHERE account_id = ?1 AND webhook_endpoint_id = ?2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(endpoint_row).transpose()?)
    }

    pub(super) async fn webhooks(
        &self,
        account_id: &str,
    ) -> Result<Vec<WebhookEndpoint>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE account_id = ?1 \
             ORDER BY webhook_endpoint_id"
        )))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(endpoint_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn update_webhook(
        &self,
        e: &WebhookEndpoint,
        actor: Actor<'_>,
    ) -> Result<Option<WebhookEndpoint>, StoreError> {
        let mut tx = self.write().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints \
             WHERE account_id = ?1 AND webhook_endpoint_id = ?2"
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
            "UPDATE webhook_endpoints SET url = ?2, description = ?3, event_types = ?4, \
                 enabled = ?5, disabled_reason = ?6, \
                 failing_since = CASE WHEN ?5 AND NOT enabled THEN NULL ELSE failing_since END, \
                 version = version + 1, updated_at = ?7 \
             WHERE webhook_endpoint_id = ?1 RETURNING {ENDPOINT_COLUMNS}"
        )))
        .bind(&e.id)
        .bind(&e.url)
        .bind(&e.description)
        .bind(json_list(&e.event_types))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(now())
        .fetch_one(&mut *tx)
        .await?;
        let after = endpoint_row(&after)?;
        let change = audit(
            &mut tx,
            &e.account_id,
            actor,
            "UpdateWebhookEndpoint",
            &format!("webhook_endpoints/{}", e.id),
            Some(endpoint_json(&before)),
            Some(endpoint_json(&after)),
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(Some(after))
    }

    pub(super) async fn delete_webhook(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let gone = sqlx::query(sql(format!(
            "DELETE FROM webhook_endpoints WHERE account_id = ?1 AND webhook_endpoint_id = ?2 \
             RETURNING {ENDPOINT_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(gone) = gone.as_ref().map(endpoint_row).transpose()? else {
            return Ok(false);
        };
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "DeleteWebhookEndpoint",
            &format!("webhook_endpoints/{id}"),
            Some(endpoint_json(&gone)),
            None,
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(true)
    }

    pub(super) async fn rotate_webhook_secret(
        &self,
        account_id: &str,
        id: &str,
        secret: &[u8],
        keep_previous: Duration,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let now = now();
        let rotated = sqlx::query(
            "UPDATE webhook_endpoints SET previous_secret = secret, secret = ?3, \
                 previous_until = ?4, version = version + 1, updated_at = ?5 \
             WHERE account_id = ?1 AND webhook_endpoint_id = ?2",
        )
        .bind(account_id)
        .bind(id)
        .bind(secret)
        .bind(now.saturating_add(span(keep_previous)))
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !rotated {
            return Ok(false);
        }
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "RotateWebhookSecret",
            &format!("webhook_endpoints/{id}"),
            None,
            None,
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(true)
    }

    pub(super) async fn webhook_for_test(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<LeasedWebhook>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {ENDPOINT_COLUMNS}, {LEASED} FROM webhook_endpoints \
             WHERE account_id = ?1 AND webhook_endpoint_id = ?2"
        )))
        .bind(account_id)
        .bind(id)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(leased_row).transpose()?)
    }

    pub(super) async fn lease_webhooks(
        &self,
        owner: &str,
        ttl: Duration,
    ) -> Result<Vec<LeasedWebhook>, StoreError> {
        let now = now();
        let rows = sqlx::query(sql(format!(
            "UPDATE webhook_endpoints SET lease_owner = ?1, lease_until = ?2 \
             WHERE enabled AND (lease_until IS NULL OR lease_until < ?3 OR lease_owner = ?1) \
             RETURNING {ENDPOINT_COLUMNS}, {LEASED}"
        )))
        .bind(owner)
        .bind(now.saturating_add(span(ttl)))
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(leased_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn webhook_passed(
        &self,
        id: &str,
        owner: &str,
        position: WebhookPosition<'_>,
        delivered: bool,
    ) -> Result<bool, StoreError> {
        // Only a delivery says the receiver is well; passing over an event it did not subscribe
        // to says nothing about it.
        let query = match position {
            WebhookPosition::Conversations(cursor) => sqlx::query(
                "UPDATE webhook_endpoints SET cursor = ?3, \
                     failing_since = CASE WHEN ?4 THEN NULL ELSE failing_since END \
                 WHERE webhook_endpoint_id = ?1 AND lease_owner = ?2 AND enabled",
            )
            .bind(id)
            .bind(owner)
            .bind(cursor),
            WebhookPosition::Handoffs(position) => sqlx::query(
                "UPDATE webhook_endpoints SET handoff_position = ?3, \
                     failing_since = CASE WHEN ?4 THEN NULL ELSE failing_since END \
                 WHERE webhook_endpoint_id = ?1 AND lease_owner = ?2 AND enabled",
            )
            .bind(id)
            .bind(owner)
            .bind(position),
        };
        Ok(query
            .bind(delivered)
            .execute(&self.pool)
            .await?
            .rows_affected()
            == 1)
    }

    pub(super) async fn webhook_failed(
        &self,
        id: &str,
        owner: &str,
        disable_after: Duration,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let held: Option<(Option<i64>, bool)> = sqlx::query_as(
            "SELECT failing_since, enabled FROM webhook_endpoints \
             WHERE webhook_endpoint_id = ?1 AND lease_owner = ?2",
        )
        .bind(id)
        .bind(owner)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((failing_since, was_enabled)) = held else {
            return Ok(false);
        };
        let now = now();
        let since = failing_since.unwrap_or(now);
        let enabled = was_enabled && since > now.saturating_sub(span(disable_after));
        let reason = (was_enabled && !enabled).then(|| {
            format!(
                "deliveries failed since {}; enable it again to resume",
                time(since).format("%Y-%m-%dT%H:%M:%SZ")
            )
        });
        sqlx::query(
            "UPDATE webhook_endpoints SET failing_since = ?2, enabled = ?3, \
                 disabled_reason = coalesce(?4, disabled_reason) \
             WHERE webhook_endpoint_id = ?1",
        )
        .bind(id)
        .bind(since)
        .bind(enabled)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(enabled)
    }

    pub(super) async fn record_webhook_delivery(
        &self,
        d: &WebhookDelivery,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO webhook_deliveries (webhook_endpoint_id, webhook_id, event_type, \
                 attempt, http_status, error, duration_ms, succeeded, at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(&d.endpoint_id)
        .bind(&d.webhook_id)
        .bind(&d.event_type)
        .bind(i64::from(d.attempt))
        .bind(i64::from(d.http_status))
        .bind(&d.error)
        .bind(i64::from(d.duration_ms))
        .bind(d.succeeded)
        .bind(micros(d.at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn webhook_deliveries(
        &self,
        id: &str,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, WebhookDelivery)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, webhook_endpoint_id, webhook_id, event_type, attempt, http_status, \
                 error, duration_ms, succeeded, at \
             FROM webhook_deliveries WHERE webhook_endpoint_id = ?1 AND (?2 = 0 OR id < ?2) \
             ORDER BY id DESC LIMIT ?3",
        )
        .bind(id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let number =
            |row: &SqliteRow, column: &str| -> Result<i64, sqlx::Error> { row.try_get(column) };
        Ok(rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get("id")?,
                    WebhookDelivery {
                        endpoint_id: row.try_get("webhook_endpoint_id")?,
                        webhook_id: row.try_get("webhook_id")?,
                        event_type: row.try_get("event_type")?,
                        attempt: u32::try_from(number(row, "attempt")?).unwrap_or_default(),
                        http_status: u16::try_from(number(row, "http_status")?).unwrap_or_default(),
                        error: row.try_get("error")?,
                        duration_ms: u32::try_from(number(row, "duration_ms")?).unwrap_or_default(),
                        succeeded: row.try_get("succeeded")?,
                        at: time(row.try_get("at")?),
                    },
                ))
            })
            .collect::<Result<_, sqlx::Error>>()?)
    }

    pub(super) async fn prune_webhook_deliveries(&self, age: Duration) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM webhook_deliveries WHERE at < ?1")
            .bind(now().saturating_sub(span(age)))
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
