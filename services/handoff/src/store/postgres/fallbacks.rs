//! The pending fallbacks' statements. A round claims due rows for a lease (`claimed_until`; no
//! transaction or lock is held while it calls the gateway), then records what each
//! came to in a short transaction of its own, which checks that the row is still the one it
//! claimed: a replica that took it over after the lease ran out, or a crash between the send and
//! the record, leaves one outcome, and the next channel's message ids stay the same
//! (`<handoff>-<n>`), so the gateway sends each once.

use std::time::Duration;

use c2m_storage::outbox;
use sqlx::{PgConnection, PgPool};

use super::{Due, Fell, enqueue_deflection, load_for_update, update_delivery};

/// Takes up to `limit` due fallbacks for `lease`: no other round looks at them until it ends
/// (or this one reschedules them).
pub(super) async fn claim(
    pool: &PgPool,
    limit: i64,
    lease: Duration,
) -> Result<Vec<Due>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE fallbacks f SET claimed_until = now() + make_interval(secs => $2) \
         FROM (SELECT handoff_id FROM fallbacks WHERE next_check <= now() \
                   AND (claimed_until IS NULL OR claimed_until <= now()) \
               ORDER BY next_check LIMIT $1 FOR UPDATE SKIP LOCKED) due \
         WHERE f.handoff_id = due.handoff_id \
         RETURNING f.handoff_id, f.account_id, f.message_id, f.remaining, f.deadline, \
             f.window_seconds, f.confirm_by, f.watched_since",
    )
    .bind(limit)
    .bind(lease.as_secs_f64())
    .fetch_all(pool)
    .await
}

/// Stops watching these handoffs' messages.
pub(super) async fn drop(pool: &PgPool, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
    if !handoff_ids.is_empty() {
        sqlx::query("DELETE FROM fallbacks WHERE handoff_id = ANY($1)")
            .bind(handoff_ids)
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Looks at these again after a pause that grows with the time watched (a tenth of it, from
/// 200 ms to 5 s), never past the deadline or the confirmation's, so those still act on time.
pub(super) async fn wait(pool: &PgPool, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
    if !handoff_ids.is_empty() {
        sqlx::query(
            "UPDATE fallbacks SET claimed_until = NULL, next_check = least( \
             now() + least(greatest((now() - watched_since) / 10, \
                 interval '200 milliseconds'), interval '5 seconds'), \
             deadline, confirm_by) \
         WHERE handoff_id = ANY($1)",
        )
        .bind(handoff_ids)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Looks at one again in `after`.
pub(super) async fn retry_in(
    pool: &PgPool,
    handoff_id: &str,
    after: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE fallbacks SET claimed_until = NULL, next_check = now() + make_interval(secs => $2) \
         WHERE handoff_id = $1",
    )
    .bind(handoff_id)
    .bind(after.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks the attempt that sent `message_id`, which its provider never answered, as sent: the
/// provider has since reported on it (`provider_message_id`); the fallback stops waiting for that.
pub(super) async fn confirm(
    pool: &PgPool,
    handoff_id: &str,
    message_id: &str,
    provider_message_id: &str,
) -> Result<(), sqlx::Error> {
    use c2m_proto::v1::AttemptOutcome;
    let mut tx = pool.begin().await?;
    if let Some(mut handoff) = load_for_update(&mut tx, handoff_id).await?
        && let Some(attempt) = handoff
            .attempts
            .iter_mut()
            .find(|a| a.message_id == message_id && a.outcome == AttemptOutcome::Unconfirmed)
    {
        attempt.outcome = AttemptOutcome::Sent;
        attempt.provider_message_id = provider_message_id.to_owned();
        update_delivery(&mut tx, &handoff).await?;
    }
    sqlx::query("UPDATE fallbacks SET confirm_by = NULL WHERE handoff_id = $1")
        .bind(handoff_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Records a fallback's send in one transaction, unless another round recorded it first (the row
/// watches another message now, or is gone, or the handoff has other attempts): then nothing is
/// written, and `false` says so.
pub(super) async fn record(pool: &PgPool, fell: &Fell) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let watching: Option<String> =
        sqlx::query_scalar("SELECT message_id FROM fallbacks WHERE handoff_id = $1 FOR UPDATE")
            .bind(&fell.due.handoff_id)
            .fetch_optional(&mut *tx)
            .await?;
    let current = load_for_update(&mut tx, &fell.due.handoff_id).await?;
    let unchanged = watching.as_deref() == Some(fell.due.message_id.as_str())
        && current.is_some_and(|h| h.attempts.len() == fell.attempts_before);
    if !unchanged {
        return Ok(false);
    }
    write(&mut tx, fell).await?;
    tx.commit().await?;
    Ok(true)
}

async fn write(tx: &mut PgConnection, fell: &Fell) -> Result<(), sqlx::Error> {
    if let Some(deflection) = &fell.deflection {
        enqueue_deflection(tx, deflection).await?;
    }
    update_delivery(tx, &fell.handoff).await?;
    outbox::enqueue(tx, &fell.events).await?;
    match &fell.next {
        Some(next) => {
            sqlx::query(
                "UPDATE fallbacks SET claimed_until = NULL, message_id = $2, remaining = $3, \
                 deadline = now() + make_interval(secs => $4), confirm_by = $5, \
                 next_check = now(), watched_since = now() WHERE handoff_id = $1",
            )
            .bind(&fell.due.handoff_id)
            .bind(&next.message_id)
            .bind(&next.remaining)
            .bind(fell.due.window_seconds.map(f64::from))
            .bind(next.confirm_by)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            sqlx::query("DELETE FROM fallbacks WHERE handoff_id = $1")
                .bind(&fell.due.handoff_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    Ok(())
}

/// Deletes consumer leases that expired a minute ago or more: a row per consumer deflected, kept
/// only while it holds them.
pub(super) async fn prune_leases(pool: &PgPool) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM consumer_leases WHERE until < now() - interval '1 minute'")
            .execute(pool)
            .await?
            .rows_affected(),
    )
}

#[cfg(test)]
mod tests {
    use c2m_proto::v1::{self as pb, FunnelStage, HandoffStatus};
    use c2m_storage::batch::Statement;
    use c2m_test_support::TestDatabase;

    use super::*;
    use crate::store::{
        Saves,
        tests::{count, save},
    };

    /// A claimed fallback is no other round's until its lease ends; of two rounds that sent its
    /// next message (one took it over after the first's lease ran out, as after a crash), only
    /// the first records anything.
    #[tokio::test]
    async fn a_fallback_is_claimed_by_one_round_and_recorded_once() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        let pool = db.pool();
        Saves(db.batch_pool().clone())
            .run(&[save("ho_fb", "k-fb", true)])
            .await
            .expect("saved");

        let lease = Duration::from_secs(30);
        let first = claim(pool, 10, lease).await.expect("claims");
        assert_eq!(first.len(), 1);
        assert!(claim(pool, 10, lease).await.expect("claims").is_empty());

        // The first round's lease runs out (it died mid-send): another takes the row over.
        retry_in(pool, "ho_fb", Duration::ZERO)
            .await
            .expect("reschedules");
        let second = claim(pool, 10, lease).await.expect("claims");
        assert_eq!(second.len(), 1);

        let fell = |due: Due| {
            let mut handoff = save("ho_fb", "k-fb", false).handoff.clone();
            handoff.status = HandoffStatus::Failed;
            Fell {
                events: vec![pb::Event {
                    handoff_id: "ho_fb".into(),
                    ..outbox::event("acme", FunnelStage::Failed)
                }],
                due,
                attempts_before: 0,
                handoff,
                deflection: None,
                next: None,
            }
        };
        let events = "SELECT count(*) FROM outbox";
        let before = count(pool, events).await;
        assert!(
            record(pool, &fell(second.into_iter().next().unwrap()))
                .await
                .expect("records")
        );
        assert!(
            !record(pool, &fell(first.into_iter().next().unwrap()))
                .await
                .expect("checks")
        );
        assert_eq!(count(pool, events).await, before + 1);
        assert_eq!(count(pool, "SELECT count(*) FROM fallbacks").await, 0);
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM handoffs WHERE status = 'HANDOFF_STATUS_FAILED'"
            )
            .await,
            1
        );
    }
}
