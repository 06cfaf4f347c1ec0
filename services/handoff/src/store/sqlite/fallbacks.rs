//! The pending fallbacks' statements on SQLite, with the rules of `postgres::fallbacks`: a round
//! claims due rows for a lease, sends outside any transaction, and records what each came to in
//! a short transaction that checks the row is still the one it claimed.

use std::time::Duration;

use c2m_storage::outbox;
use chrono::{DateTime, Utc};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::{Due, Fell, enqueue_deflection, load_in, micros, now, span, time, update_delivery};

/// The ids as a JSON array, for `IN (SELECT value FROM json_each(…))`.
fn id_list(ids: &[String]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
}

fn due(row: &sqlx::sqlite::SqliteRow) -> Result<Due, sqlx::Error> {
    let remaining: &str = row.try_get("remaining")?;
    let at = |column: &str| -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        Ok(row.try_get::<Option<i64>, _>(column)?.map(time))
    };
    Ok(Due {
        handoff_id: row.try_get("handoff_id")?,
        account_id: row.try_get("account_id")?,
        message_id: row.try_get("message_id")?,
        remaining: serde_json::from_str(remaining).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        deadline: at("deadline")?,
        window_seconds: row.try_get("window_seconds")?,
        confirm_by: at("confirm_by")?,
        watched_since: time(row.try_get("watched_since")?),
    })
}

pub(super) async fn claim(
    pool: &SqlitePool,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Due>, sqlx::Error> {
    let now = now();
    let rows = sqlx::query(
        "UPDATE fallbacks SET claimed_until = ?2 \
         WHERE handoff_id IN (SELECT handoff_id FROM fallbacks WHERE next_check <= ?3 \
                 AND (claimed_until IS NULL OR claimed_until <= ?3) \
             ORDER BY next_check LIMIT ?1) \
         RETURNING handoff_id, account_id, message_id, remaining, deadline, window_seconds, \
             confirm_by, watched_since",
    )
    .bind(limit)
    .bind(now.saturating_add(span(lease)))
    .bind(now)
    .fetch_all(pool)
    .await?;
    rows.iter().map(due).collect()
}

pub(super) async fn drop(pool: &SqlitePool, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM fallbacks WHERE handoff_id IN (SELECT value FROM json_each(?1))")
        .bind(id_list(handoff_ids))
        .execute(pool)
        .await?;
    Ok(())
}

/// A pause of a tenth of the time watched, from 200 ms to 5 s, never past the deadline or the
/// confirmation's (SQLite's `min` of a NULL is NULL: an absent one is no bound).
pub(super) async fn wait(pool: &SqlitePool, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE fallbacks SET claimed_until = NULL, next_check = min( \
             ?2 + min(max((?2 - watched_since) / 10, 200000), 5000000), \
             coalesce(deadline, ?3), coalesce(confirm_by, ?3)) \
         WHERE handoff_id IN (SELECT value FROM json_each(?1))",
    )
    .bind(id_list(handoff_ids))
    .bind(now())
    .bind(i64::MAX)
    .execute(pool)
    .await?;
    Ok(())
}

pub(super) async fn retry_in(
    pool: &SqlitePool,
    handoff_id: &str,
    after: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE fallbacks SET claimed_until = NULL, next_check = ?2 WHERE handoff_id = ?1")
        .bind(handoff_id)
        .bind(now().saturating_add(span(after)))
        .execute(pool)
        .await?;
    Ok(())
}

pub(super) async fn confirm(
    pool: &SqlitePool,
    handoff_id: &str,
    message_id: &str,
    provider_message_id: &str,
) -> Result<(), sqlx::Error> {
    use c2m_proto::v1::AttemptOutcome;
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    if let Some(mut handoff) = load_in(&mut tx, handoff_id).await?
        && let Some(attempt) = handoff
            .attempts
            .iter_mut()
            .find(|a| a.message_id == message_id && a.outcome == AttemptOutcome::Unconfirmed)
    {
        attempt.outcome = AttemptOutcome::Sent;
        attempt.provider_message_id = provider_message_id.to_owned();
        update_delivery(&mut tx, &handoff).await?;
    }
    sqlx::query("UPDATE fallbacks SET confirm_by = NULL WHERE handoff_id = ?1")
        .bind(handoff_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

pub(super) async fn record(pool: &SqlitePool, fell: &Fell) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let watching: Option<String> =
        sqlx::query_scalar("SELECT message_id FROM fallbacks WHERE handoff_id = ?1")
            .bind(&fell.due.handoff_id)
            .fetch_optional(&mut *tx)
            .await?;
    let current = load_in(&mut tx, &fell.due.handoff_id).await?;
    let unchanged = watching.as_deref() == Some(fell.due.message_id.as_str())
        && current.is_some_and(|h| h.attempts.len() == fell.attempts_before);
    if !unchanged {
        return Ok(false);
    }
    write(&mut tx, fell).await?;
    tx.commit().await?;
    Ok(true)
}

async fn write(tx: &mut SqliteConnection, fell: &Fell) -> Result<(), sqlx::Error> {
    if let Some(deflection) = &fell.deflection {
        enqueue_deflection(tx, deflection).await?;
    }
    update_delivery(tx, &fell.handoff).await?;
    outbox::enqueue_sqlite(tx, &fell.events).await?;
    match &fell.next {
        Some(next) => {
            let now = now();
            let deadline = fell
                .due
                .window_seconds
                .map(|s| now.saturating_add(i64::from(s).saturating_mul(1_000_000)));
            sqlx::query(
                "UPDATE fallbacks SET claimed_until = NULL, message_id = ?2, remaining = ?3, \
                 deadline = ?4, confirm_by = ?5, next_check = ?6, watched_since = ?6 \
                 WHERE handoff_id = ?1",
            )
            .bind(&fell.due.handoff_id)
            .bind(&next.message_id)
            .bind(next.remaining.to_string())
            .bind(deadline)
            .bind(next.confirm_by.map(micros))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM fallbacks WHERE handoff_id = ?1")
                .bind(&fell.due.handoff_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    Ok(())
}

pub(super) async fn prune_leases(pool: &SqlitePool) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query("DELETE FROM consumer_leases WHERE until < ?1")
        .bind(now().saturating_sub(60_000_000))
        .execute(pool)
        .await?
        .rows_affected())
}
