//! [`HandoffStore`] on SQLite: the embedded default's handoffs, one file, the same answers as
//! PostgreSQL's. Times are integer microseconds. SQLite has one writer at a time, so the hot
//! path's writes still go in batches (`c2m_storage::batch`): the handoffs waiting when a write
//! transaction starts share it and its commit, each written whole or not at all, in turn, so a
//! later one sees what an earlier one of the batch wrote (a twin of a key races, as it would
//! across batches).

mod fallbacks;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use c2m_proto::v1::{Channel, HandoffStatus};
use c2m_runtime::metrics;
use c2m_storage::sqlite::{micros, now, span, time};
use c2m_storage::{
    batch::{Batcher, Statement},
    outbox::{self, SqliteOutbox},
};
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{Row, SqliteConnection, SqlitePool, migrate::Migrator, sqlite::SqliteRow};

use super::{
    COLUMNS, Due, Fell, HandoffStore, Intended, Intent, Recent, Save, Saved, StoredHandoff,
};

/// The SQLite schema's migrations (`migrations-sqlite/`).
pub static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("./migrations-sqlite");

/// How long an idempotency key holds its handoff.
const KEY_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Handoff's file in the embedded default.
pub struct SqliteHandoffStore {
    pool: SqlitePool,
    saves: Batcher<Saves>,
    intents: Batcher<Intents>,
}

impl SqliteHandoffStore {
    /// The store over `pool`, its migrations applied.
    pub async fn new(pool: SqlitePool) -> Result<Self, sqlx::migrate::MigrateError> {
        SQLITE_MIGRATOR.run(&pool).await?;
        Ok(Self {
            saves: Batcher::new(Saves(pool.clone())),
            intents: Batcher::new(Intents(pool.clone())),
            pool,
        })
    }

    /// The outboxes kept in this file (funnel events, deflections), for their relays.
    pub fn outbox(&self) -> SqliteOutbox {
        SqliteOutbox::new(self.pool.clone())
    }
}

fn handoff(row: &SqliteRow) -> Result<StoredHandoff, sqlx::Error> {
    let attempts: &str = row.try_get("attempts")?;
    Ok(StoredHandoff {
        handoff_id: row.try_get("handoff_id")?,
        account_id: row.try_get("account_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        consumer_phone: row.try_get("consumer_phone")?,
        status: HandoffStatus::from_str_name(row.try_get("status")?).unwrap_or_default(),
        channel: row
            .try_get::<Option<&str>, _>("channel")?
            .and_then(Channel::from_str_name),
        skill_id: row.try_get("skill_id")?,
        ivr_call_id: row.try_get("ivr_call_id")?,
        ivr_number: row.try_get("ivr_number")?,
        attempts: serde_json::from_str(attempts).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        duplicate_of: row.try_get("duplicate_of")?,
        created_at: time(row.try_get("created_at")?),
    })
}

fn attempts_json(h: &StoredHandoff) -> Result<String, sqlx::Error> {
    serde_json::to_string(&h.attempts).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// A handoff, read inside the caller's write transaction (which holds the file's write lock).
async fn load_in(
    tx: &mut SqliteConnection,
    handoff_id: &str,
) -> Result<Option<StoredHandoff>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM handoffs WHERE handoff_id = ?1"
    )))
    .bind(handoff_id)
    .fetch_optional(&mut *tx)
    .await?
    .as_ref()
    .map(handoff)
    .transpose()
}

/// Writes what a fallback changed: the attempts, the channel, the status.
async fn update_delivery(tx: &mut SqliteConnection, h: &StoredHandoff) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE handoffs SET attempts = ?2, channel = ?3, status = ?4 WHERE handoff_id = ?1",
    )
    .bind(&h.handoff_id)
    .bind(attempts_json(h)?)
    .bind(h.channel.map(|c| c.as_str_name()))
    .bind(h.status.as_str_name())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Puts a deflection in the outbox that ships them to Routing, inside the caller's transaction.
async fn enqueue_deflection(
    tx: &mut SqliteConnection,
    deflection: &c2m_proto::v1::Deflection,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO deflection_outbox (payload) VALUES (?1)")
        .bind(deflection.encode_to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Claims `key` for `handoff_id` unless a live record holds it for another handoff (`retry`: a
/// record of this same handoff is its own). Whether it is now the handoff's.
async fn claim_key(
    tx: &mut SqliteConnection,
    handoff: &StoredHandoff,
    key: &str,
    fingerprint: &[u8],
    retry: bool,
) -> Result<bool, sqlx::Error> {
    let now = now();
    let claimed: Option<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (account_id, idempotency_key, request_hash, handoff_id, \
             expires_at) VALUES (?1, ?2, ?3, ?4, ?5) \
         ON CONFLICT (account_id, idempotency_key) DO UPDATE \
         SET request_hash = excluded.request_hash, handoff_id = excluded.handoff_id, \
             expires_at = excluded.expires_at \
         WHERE idempotency_keys.expires_at <= ?6 \
             OR (?7 AND idempotency_keys.handoff_id = excluded.handoff_id) \
         RETURNING handoff_id",
    )
    .bind(&handoff.account_id)
    .bind(key)
    .bind(fingerprint)
    .bind(&handoff.handoff_id)
    .bind(now.saturating_add(span(KEY_LIFETIME)))
    .bind(now)
    .bind(retry)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(claimed.is_some())
}

#[async_trait]
impl HandoffStore for SqliteHandoffStore {
    fn is_ready(&self) -> bool {
        true
    }

    async fn replay(
        &self,
        account_id: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredHandoff)>, sqlx::Error> {
        let columns: Vec<String> = COLUMNS.split(", ").map(|c| format!("h.{c}")).collect();
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT i.request_hash, {} FROM idempotency_keys i \
             JOIN handoffs h ON h.handoff_id = i.handoff_id \
             WHERE i.account_id = ?1 AND i.idempotency_key = ?2 AND i.expires_at > ?3",
            columns.join(", ")
        )))
        .bind(account_id)
        .bind(key)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((row.try_get("request_hash")?, handoff(&row)?)))
            .transpose()
    }

    async fn intend(&self, intent: Arc<Intent>) -> Result<Intended, sqlx::Error> {
        self.intents.run(intent).await
    }

    async fn save(&self, save: Arc<Save>, until: Instant) -> Result<Saved, sqlx::Error> {
        let handoff_id = save.handoff.handoff_id.clone();
        self.saves
            .run_until(save, until, |error, pause| {
                tracing::warn!(%error, %handoff_id, retry_in = ?pause, "handoff not saved; trying again");
                metrics::metrics().handoff_save_retries.inc();
            })
            .await
    }

    async fn load(
        &self,
        account_id: &str,
        handoff_id: &str,
    ) -> Result<Option<StoredHandoff>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM handoffs WHERE account_id = ?1 AND handoff_id = ?2"
        )))
        .bind(account_id)
        .bind(handoff_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(handoff)
        .transpose()
    }

    async fn abandoned(
        &self,
        after: Duration,
        limit: i64,
    ) -> Result<Vec<(String, DateTime<Utc>, Vec<u8>)>, sqlx::Error> {
        let now = now();
        let rows: Vec<(String, i64, Vec<u8>)> = sqlx::query_as(
            "SELECT handoff_id, created_at, request FROM handoffs \
             WHERE status = 'HANDOFF_STATUS_IN_PROGRESS' AND request IS NOT NULL \
                 AND created_at < ?1 AND created_at > ?2 \
             ORDER BY created_at LIMIT ?3",
        )
        .bind(now.saturating_sub(span(after)))
        .bind(now.saturating_sub(span(Duration::from_secs(24 * 3600))))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, at, request)| (id, time(at), request))
            .collect())
    }

    async fn recent(&self, account_id: &str, span_: Duration) -> Result<Vec<Recent>, sqlx::Error> {
        let now = now();
        let rows: Vec<(String, String, i64, bool)> = sqlx::query_as(
            "SELECT handoff_id, consumer_phone, created_at, \
                 status IN ('HANDOFF_STATUS_SENT', 'HANDOFF_STATUS_IN_PROGRESS') \
             FROM handoffs WHERE account_id = ?1 AND created_at > ?2",
        )
        .bind(account_id)
        .bind(now.saturating_sub(span(span_)))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(handoff_id, consumer_phone, at, holds_consumer)| Recent {
                handoff_id,
                consumer_phone,
                age: Duration::from_micros(u64::try_from(now - at).unwrap_or_default()),
                holds_consumer,
            })
            .collect())
    }

    async fn prune_leases(&self) -> Result<u64, sqlx::Error> {
        fallbacks::prune_leases(&self.pool).await
    }

    async fn claim_fallbacks(&self, limit: i64, lease: Duration) -> Result<Vec<Due>, sqlx::Error> {
        fallbacks::claim(&self.pool, limit, lease).await
    }

    async fn drop_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
        fallbacks::drop(&self.pool, handoff_ids).await
    }

    async fn wait_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
        fallbacks::wait(&self.pool, handoff_ids).await
    }

    async fn retry_fallback_in(
        &self,
        handoff_id: &str,
        after: Duration,
    ) -> Result<(), sqlx::Error> {
        fallbacks::retry_in(&self.pool, handoff_id, after).await
    }

    async fn confirm_send(
        &self,
        handoff_id: &str,
        message_id: &str,
        provider_message_id: &str,
    ) -> Result<(), sqlx::Error> {
        fallbacks::confirm(&self.pool, handoff_id, message_id, provider_message_id).await
    }

    async fn record_fallback(&self, fell: &Fell) -> Result<bool, sqlx::Error> {
        fallbacks::record(&self.pool, fell).await
    }
}

/// Writes handoffs about to send: each claims its idempotency key (free, expired, or already its
/// own: a retry finishing it), is written in progress with its request, and, when the gate
/// decided from memory, takes its consumer's lease unless another live handoff holds it.
struct Intents(SqlitePool);

impl Statement for Intents {
    type Row = Arc<Intent>;
    type Output = Intended;

    async fn run(&self, intents: &[Arc<Intent>]) -> Result<Vec<Intended>, sqlx::Error> {
        let mut tx = self.0.begin_with("BEGIN IMMEDIATE").await?;
        let mut outcomes = Vec::with_capacity(intents.len());
        for intent in intents {
            outcomes.push(intend(&mut tx, intent).await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

async fn intend(tx: &mut SqliteConnection, intent: &Intent) -> Result<Intended, sqlx::Error> {
    let h = &intent.handoff;
    if !claim_key(tx, h, &intent.idempotency_key, &intent.fingerprint, true).await? {
        return Ok(Intended::KeyTaken);
    }
    sqlx::query(
        "INSERT INTO handoffs (handoff_id, account_id, handoff_config_id, consumer_phone, status, \
             skill_id, ivr_call_id, ivr_number, created_at, request) \
         VALUES (?1, ?2, ?3, ?4, 'HANDOFF_STATUS_IN_PROGRESS', ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (handoff_id) DO NOTHING",
    )
    .bind(&h.handoff_id)
    .bind(&h.account_id)
    .bind(&h.handoff_config_id)
    .bind(&h.consumer_phone)
    .bind(&h.skill_id)
    .bind(&h.ivr_call_id)
    .bind(&h.ivr_number)
    .bind(micros(h.created_at))
    .bind(&intent.request)
    .execute(&mut *tx)
    .await?;
    if !intent.take_lease {
        return Ok(Intended::Holding);
    }
    let now = now();
    let leased: Option<String> = sqlx::query_scalar(
        "INSERT INTO consumer_leases (account_id, consumer_phone, handoff_id, until) \
         VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (account_id, consumer_phone) DO UPDATE \
         SET handoff_id = excluded.handoff_id, until = excluded.until \
         WHERE consumer_leases.until <= ?5 OR consumer_leases.handoff_id = excluded.handoff_id \
         RETURNING handoff_id",
    )
    .bind(&h.account_id)
    .bind(&h.consumer_phone)
    .bind(&h.handoff_id)
    .bind(now.saturating_add(span(intent.lease)))
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    if leased.is_some() {
        return Ok(Intended::Holding);
    }
    let holder: String = sqlx::query_scalar(
        "SELECT handoff_id FROM consumer_leases WHERE account_id = ?1 AND consumer_phone = ?2",
    )
    .bind(&h.account_id)
    .bind(&h.consumer_phone)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Intended::ConsumerHeld(holder))
}

/// Writes handoffs, each with its idempotency record, its events, its pending fallback and its
/// deflection (see `postgres::Saves`, whose rules these are): a handoff written before it sent
/// has its outcome written over its row while that is still in progress; any other claims its
/// key first, and a live record of the key means a twin won. A handoff that loses writes
/// nothing at all; one that sent nothing gives back its consumer's lease.
struct Saves(SqlitePool);

impl Statement for Saves {
    type Row = Arc<Save>;
    type Output = Saved;

    async fn run(&self, saves: &[Arc<Save>]) -> Result<Vec<Saved>, sqlx::Error> {
        let mut tx = self.0.begin_with("BEGIN IMMEDIATE").await?;
        let mut outcomes = Vec::with_capacity(saves.len());
        for save in saves {
            outcomes.push(write_save(&mut tx, save).await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

async fn write_save(tx: &mut SqliteConnection, save: &Save) -> Result<Saved, sqlx::Error> {
    let h = &save.handoff;
    let done = if save.intended {
        sqlx::query(
            "UPDATE handoffs SET status = ?2, channel = ?3, skill_id = ?4, attempts = ?5, \
                 duplicate_of = ?6, request = NULL \
             WHERE handoff_id = ?1 AND status = 'HANDOFF_STATUS_IN_PROGRESS'",
        )
        .bind(&h.handoff_id)
        .bind(h.status.as_str_name())
        .bind(h.channel.map(|c| c.as_str_name()))
        .bind(&h.skill_id)
        .bind(attempts_json(h)?)
        .bind(&h.duplicate_of)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1
    } else if claim_key(tx, h, &save.idempotency_key, &save.fingerprint, false).await? {
        sqlx::query(
            "INSERT INTO handoffs (handoff_id, account_id, handoff_config_id, consumer_phone, \
                 status, channel, skill_id, ivr_call_id, ivr_number, attempts, duplicate_of, \
                 created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )
        .bind(&h.handoff_id)
        .bind(&h.account_id)
        .bind(&h.handoff_config_id)
        .bind(&h.consumer_phone)
        .bind(h.status.as_str_name())
        .bind(h.channel.map(|c| c.as_str_name()))
        .bind(&h.skill_id)
        .bind(&h.ivr_call_id)
        .bind(&h.ivr_number)
        .bind(attempts_json(h)?)
        .bind(&h.duplicate_of)
        .bind(micros(h.created_at))
        .execute(&mut *tx)
        .await?;
        true
    } else {
        false
    };
    if !done {
        return Ok(Saved::Raced);
    }
    if save.release_consumer {
        sqlx::query(
            "DELETE FROM consumer_leases \
             WHERE account_id = ?1 AND consumer_phone = ?2 AND handoff_id = ?3",
        )
        .bind(&h.account_id)
        .bind(&h.consumer_phone)
        .bind(&h.handoff_id)
        .execute(&mut *tx)
        .await?;
    }
    outbox::enqueue_sqlite(tx, &save.events).await?;
    if let Some(f) = &save.fallback {
        let now = now();
        sqlx::query(
            "INSERT INTO fallbacks (handoff_id, account_id, message_id, remaining, deadline, \
                 window_seconds, confirm_by, next_check, watched_since) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
        )
        .bind(&h.handoff_id)
        .bind(&h.account_id)
        .bind(&f.message_id)
        .bind(f.remaining.to_string())
        .bind(f.deadline.map(micros))
        .bind(f.window_seconds)
        .bind(f.confirm_by.map(micros))
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    if let Some(deflection) = &save.deflection {
        enqueue_deflection(tx, deflection).await?;
    }
    Ok(Saved::Saved)
}
