//! [`HandoffStore`] on PostgreSQL: the hot path's writes are statements batched across
//! concurrent handoffs (`c2m_storage::batch`), one round trip and one commit for many.

mod fallbacks;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, HandoffStatus};
use c2m_runtime::metrics;
use c2m_storage::{
    ServiceDb,
    batch::{Batcher, Statement},
    outbox,
};
use chrono::{DateTime, Utc};
use prost::Message;
use sqlx::{PgPool, Row, postgres::PgRow};

use super::{
    COLUMNS, Due, Fallback, Fell, HandoffStore, Intended, Intent, Recent, Save, Saved,
    StoredHandoff,
};

/// Handoff's schema in PostgreSQL.
pub struct PgHandoffStore {
    db: ServiceDb,
    saves: Batcher<Saves>,
    intents: Batcher<Intents>,
    replays: Batcher<Replays>,
}

impl PgHandoffStore {
    pub fn new(db: ServiceDb) -> Self {
        Self {
            saves: Batcher::new(Saves(db.batch_pool().clone())),
            intents: Batcher::new(Intents(db.batch_pool().clone())),
            replays: Batcher::new(Replays(db.batch_pool().clone())),
            db,
        }
    }
}

#[async_trait]
impl HandoffStore for PgHandoffStore {
    fn is_ready(&self) -> bool {
        self.db.is_migrated()
    }

    async fn replay(
        &self,
        account_id: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, StoredHandoff)>, sqlx::Error> {
        self.replays
            .run((account_id.to_owned(), key.to_owned()))
            .await
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
        load(self.db.pool(), account_id, handoff_id).await
    }

    async fn abandoned(
        &self,
        after: Duration,
        limit: i64,
    ) -> Result<Vec<(String, DateTime<Utc>, Vec<u8>)>, sqlx::Error> {
        abandoned(self.db.pool(), after, limit).await
    }

    async fn recent(&self, account_id: &str, span: Duration) -> Result<Vec<Recent>, sqlx::Error> {
        recent(self.db.pool(), account_id, span).await
    }

    async fn prune_leases(&self) -> Result<u64, sqlx::Error> {
        fallbacks::prune_leases(self.db.pool()).await
    }

    async fn claim_fallbacks(&self, limit: i64, lease: Duration) -> Result<Vec<Due>, sqlx::Error> {
        fallbacks::claim(self.db.pool(), limit, lease).await
    }

    async fn drop_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
        fallbacks::drop(self.db.pool(), handoff_ids).await
    }

    async fn wait_fallbacks(&self, handoff_ids: &[String]) -> Result<(), sqlx::Error> {
        fallbacks::wait(self.db.pool(), handoff_ids).await
    }

    async fn retry_fallback_in(
        &self,
        handoff_id: &str,
        after: Duration,
    ) -> Result<(), sqlx::Error> {
        fallbacks::retry_in(self.db.pool(), handoff_id, after).await
    }

    async fn confirm_send(
        &self,
        handoff_id: &str,
        message_id: &str,
        provider_message_id: &str,
    ) -> Result<(), sqlx::Error> {
        fallbacks::confirm(self.db.pool(), handoff_id, message_id, provider_message_id).await
    }

    async fn record_fallback(&self, fell: &Fell) -> Result<bool, sqlx::Error> {
        fallbacks::record(self.db.pool(), fell).await
    }
}

fn handoff(row: PgRow) -> Result<StoredHandoff, sqlx::Error> {
    let attempts: serde_json::Value = row.try_get("attempts")?;
    Ok(StoredHandoff {
        handoff_id: row.try_get("handoff_id")?,
        account_id: row.try_get("account_id")?,
        handoff_config_id: row.try_get("handoff_config_id")?,
        consumer_phone: row.try_get("consumer_phone")?,
        status: HandoffStatus::from_str_name(&row.try_get::<String, _>("status")?)
            .unwrap_or_default(),
        channel: row
            .try_get::<Option<String>, _>("channel")?
            .and_then(|c| Channel::from_str_name(&c)),
        skill_id: row.try_get("skill_id")?,
        ivr_call_id: row.try_get("ivr_call_id")?,
        ivr_number: row.try_get("ivr_number")?,
        attempts: serde_json::from_value(attempts).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
        duplicate_of: row.try_get("duplicate_of")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A handoff locked for change inside `tx`.
async fn load_for_update(
    tx: &mut sqlx::PgConnection,
    handoff_id: &str,
) -> Result<Option<StoredHandoff>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM handoffs WHERE handoff_id = $1 FOR UPDATE"
    )))
    .bind(handoff_id)
    .fetch_optional(&mut *tx)
    .await?
    .map(handoff)
    .transpose()
}

/// Writes what a fallback changed: the attempts, the channel, the status.
async fn update_delivery(
    tx: &mut sqlx::PgConnection,
    h: &StoredHandoff,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE handoffs SET attempts = $2, channel = $3, status = $4 WHERE handoff_id = $1",
    )
    .bind(&h.handoff_id)
    .bind(serde_json::to_value(&h.attempts).map_err(|e| sqlx::Error::Encode(Box::new(e)))?)
    .bind(h.channel.map(|c| c.as_str_name()))
    .bind(h.status.as_str_name())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Handoffs left in progress for longer than `after` (and less than a day): their ids, when
/// they were written, and their requests, oldest first.
async fn abandoned(
    pool: &PgPool,
    after: std::time::Duration,
    limit: i64,
) -> Result<Vec<(String, DateTime<Utc>, Vec<u8>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT handoff_id, created_at, request FROM handoffs \
         WHERE status = 'HANDOFF_STATUS_IN_PROGRESS' AND request IS NOT NULL \
             AND created_at < now() - make_interval(secs => $1) \
             AND created_at > now() - interval '1 day' \
         ORDER BY created_at LIMIT $2",
    )
    .bind(after.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The account's handoffs of the last `span`, with their ages: what its rate-limit window and
/// its consumers' leases held.
async fn recent(
    pool: &PgPool,
    account_id: &str,
    span: std::time::Duration,
) -> Result<Vec<Recent>, sqlx::Error> {
    let rows: Vec<(String, String, f64, bool)> = sqlx::query_as(
        "SELECT handoff_id, consumer_phone, \
             greatest(extract(epoch FROM now() - created_at), 0)::float8, \
             status IN ('HANDOFF_STATUS_SENT', 'HANDOFF_STATUS_IN_PROGRESS') \
         FROM handoffs WHERE account_id = $1 AND created_at > now() - make_interval(secs => $2)",
    )
    .bind(account_id)
    .bind(span.as_secs_f64())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(handoff_id, consumer_phone, age, holds_consumer)| Recent {
            handoff_id,
            consumer_phone,
            age: std::time::Duration::from_secs_f64(age),
            holds_consumer,
        })
        .collect())
}

pub async fn load(
    pool: &PgPool,
    account_id: &str,
    handoff_id: &str,
) -> Result<Option<StoredHandoff>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM handoffs WHERE account_id = $1 AND handoff_id = $2"
    )))
    .bind(account_id)
    .bind(handoff_id)
    .fetch_optional(pool)
    .await?
    .map(handoff)
    .transpose()
}

/// The handoffs unexpired idempotency keys point at, with the fingerprint each was made with:
/// rows are `(account_id, idempotency_key)`, looked up together.
pub(crate) struct Replays(pub PgPool);

impl Statement for Replays {
    type Row = (String, String);
    type Output = Option<(Vec<u8>, StoredHandoff)>;

    async fn run(&self, keys: &[(String, String)]) -> Result<Vec<Self::Output>, sqlx::Error> {
        let (accounts, keys): (Vec<&str>, Vec<&str>) =
            keys.iter().map(|(a, k)| (a.as_str(), k.as_str())).unzip();
        // LATERAL with OFFSET 0 is not flattened into a join: each key is one probe of the
        // primary keys, whatever the generic plan thought of the tables' sizes.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT q.n, found.* \
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(account_id, idempotency_key, n) \
             CROSS JOIN LATERAL ( \
                 SELECT i.request_hash, {} FROM idempotency_keys i \
                 JOIN handoffs h ON h.handoff_id = i.handoff_id \
                 WHERE i.account_id = q.account_id AND i.idempotency_key = q.idempotency_key \
                     AND i.expires_at > now() OFFSET 0) AS found",
            COLUMNS
                .split(", ")
                .map(|c| format!("h.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
        .bind(&accounts)
        .bind(&keys)
        .fetch_all(&self.0)
        .await?;
        let mut found = vec![None; accounts.len()];
        for row in rows {
            let n: i64 = row.try_get("n")?;
            let hash: Vec<u8> = row.try_get("request_hash")?;
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| found.get_mut(i)) {
                *slot = Some((hash, handoff(row)?));
            }
        }
        Ok(found)
    }
}

/// Writes handoffs about to send, together: each claims its idempotency key (free, expired, or
/// already its own: a retry finishing it), is written in progress with its request, and, when
/// the gate decided from memory, takes its consumer's lease unless another live handoff holds
/// it. Two intents for one consumer in one batch fail the
/// statement, which makes the batcher run them one by one.
pub(crate) struct Intents(pub PgPool);

impl Statement for Intents {
    type Row = Arc<Intent>;
    type Output = Intended;

    async fn run(&self, intents: &[Arc<Intent>]) -> Result<Vec<Intended>, sqlx::Error> {
        let column = |f: fn(&Intent) -> &str| intents.iter().map(|i| f(i)).collect::<Vec<_>>();
        let rows: Vec<(String, bool, bool)> = sqlx::query_as(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::timestamptz[], $9::text[], $10::bytea[], \
                     $11::float8[], $12::bytea[], $13::bool[]) \
                 AS t(handoff_id, account_id, handoff_config_id, consumer_phone, skill_id, \
                     ivr_call_id, ivr_number, created_at, idempotency_key, request_hash, \
                     lease_secs, request, take_lease)), \
             claim AS ( \
                 INSERT INTO idempotency_keys (account_id, idempotency_key, request_hash, handoff_id, expires_at) \
                 SELECT account_id, idempotency_key, request_hash, handoff_id, now() + interval '24 hours' \
                 FROM input \
                 ON CONFLICT (account_id, idempotency_key) DO UPDATE \
                 SET request_hash = EXCLUDED.request_hash, handoff_id = EXCLUDED.handoff_id, \
                     expires_at = EXCLUDED.expires_at \
                 WHERE idempotency_keys.expires_at <= now() \
                     OR idempotency_keys.handoff_id = EXCLUDED.handoff_id \
                 RETURNING handoff_id), \
             handoff AS ( \
                 INSERT INTO handoffs (handoff_id, account_id, handoff_config_id, consumer_phone, \
                     status, skill_id, ivr_call_id, ivr_number, created_at, request) \
                 SELECT handoff_id, account_id, handoff_config_id, consumer_phone, \
                     'HANDOFF_STATUS_IN_PROGRESS', skill_id, ivr_call_id, ivr_number, created_at, \
                     request \
                 FROM input WHERE handoff_id IN (SELECT handoff_id FROM claim) \
                 ON CONFLICT (handoff_id) DO NOTHING), \
             lease AS ( \
                 INSERT INTO consumer_leases (account_id, consumer_phone, handoff_id, until) \
                 SELECT account_id, consumer_phone, handoff_id, now() + make_interval(secs => lease_secs) \
                 FROM input WHERE take_lease AND handoff_id IN (SELECT handoff_id FROM claim) \
                 ON CONFLICT (account_id, consumer_phone) DO UPDATE \
                 SET handoff_id = EXCLUDED.handoff_id, until = EXCLUDED.until \
                 WHERE consumer_leases.until <= now() \
                     OR consumer_leases.handoff_id = EXCLUDED.handoff_id \
                 RETURNING handoff_id) \
             SELECT handoff_id, handoff_id IN (SELECT handoff_id FROM claim), \
                 NOT take_lease OR handoff_id IN (SELECT handoff_id FROM lease) \
             FROM input",
        )
        .bind(column(|i| &i.handoff.handoff_id))
        .bind(column(|i| &i.handoff.account_id))
        .bind(column(|i| &i.handoff.handoff_config_id))
        .bind(column(|i| &i.handoff.consumer_phone))
        .bind(column(|i| &i.handoff.skill_id))
        .bind(column(|i| &i.handoff.ivr_call_id))
        .bind(column(|i| &i.handoff.ivr_number))
        .bind(intents.iter().map(|i| i.handoff.created_at).collect::<Vec<_>>())
        .bind(column(|i| &i.idempotency_key))
        .bind(intents.iter().map(|i| i.fingerprint.as_slice()).collect::<Vec<_>>())
        .bind(intents.iter().map(|i| i.lease.as_secs_f64()).collect::<Vec<_>>())
        .bind(intents.iter().map(|i| i.request.as_slice()).collect::<Vec<_>>())
        .bind(intents.iter().map(|i| i.take_lease).collect::<Vec<_>>())
        .fetch_all(&self.0)
        .await?;
        // Who holds the consumers this batch could not lease: read after the statement, which
        // waited for any concurrent holder to commit.
        let (accounts, phones): (Vec<&str>, Vec<&str>) = intents
            .iter()
            .zip(&rows)
            .filter(|(_, (_, claimed, leased))| *claimed && !leased)
            .map(|(i, _)| {
                (
                    i.handoff.account_id.as_str(),
                    i.handoff.consumer_phone.as_str(),
                )
            })
            .unzip();
        let holders: Vec<(String, String, String)> = if accounts.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT account_id, consumer_phone, handoff_id FROM consumer_leases \
                 WHERE (account_id, consumer_phone) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            )
            .bind(&accounts)
            .bind(&phones)
            .fetch_all(&self.0)
            .await?
        };
        Ok(intents
            .iter()
            .zip(rows)
            .map(|(intent, (_, claimed, leased))| match (claimed, leased) {
                (false, _) => Intended::KeyTaken,
                (true, true) => Intended::Holding,
                (true, false) => Intended::ConsumerHeld(
                    holders
                        .iter()
                        .find(|(a, p, _)| {
                            *a == intent.handoff.account_id && *p == intent.handoff.consumer_phone
                        })
                        .map(|(_, _, holder)| holder.clone())
                        .unwrap_or_default(),
                ),
            })
            .collect())
    }
}

/// Puts a deflection in the outbox that ships them to Routing, inside the caller's transaction.
async fn enqueue_deflection(
    tx: &mut sqlx::PgConnection,
    deflection: &pb::Deflection,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO deflection_outbox (payload) VALUES ($1)")
        .bind(deflection.encode_to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Writes handoffs, each with its idempotency record, its events, its pending fallback and its
/// deflection, in one statement for the whole batch (one round trip, one commit: this is the hot
/// path). A handoff written before it sent ([`Intents`]) has its outcome written over its row
/// while that is still in progress; any other claims its idempotency key first: an expired record
/// of the same key is replaced, and a live one means a concurrent twin won. Either way, a handoff
/// that loses writes nothing at all. One that sent nothing gives back its consumer's lease.
pub(crate) struct Saves(pub PgPool);

impl Statement for Saves {
    /// Shared, so that a save PostgreSQL refused can be offered again without a copy.
    type Row = Arc<Save>;
    type Output = Saved;

    /// One handoff twice in a batch (two carriers finishing it at once) would read as written by
    /// both, with the events of both: the statement's parts all see the table as it was before
    /// it. So a batch goes in rounds of distinct handoffs, in order, each seeing what the one
    /// before it wrote; nearly always there is one round. Should a later round fail, the batch
    /// is offered again row by row, where a row an earlier round wrote reads as raced, and its
    /// caller finds the handoff by its key.
    async fn run(&self, saves: &[Arc<Save>]) -> Result<Vec<Saved>, sqlx::Error> {
        let mut outcomes: Vec<Option<Saved>> = saves.iter().map(|_| None).collect();
        let mut left: Vec<usize> = (0..saves.len()).collect();
        while !left.is_empty() {
            let mut seen = HashSet::new();
            let (round, later): (Vec<usize>, Vec<usize>) = left
                .iter()
                .partition(|&&i| seen.insert(saves[i].handoff.handoff_id.as_str()));
            let written = if round.len() == saves.len() {
                self.write(saves).await?
            } else {
                let rows: Vec<Arc<Save>> = round.iter().map(|&i| saves[i].clone()).collect();
                self.write(&rows).await?
            };
            for (i, saved) in round.into_iter().zip(written) {
                outcomes[i] = Some(saved);
            }
            left = later;
        }
        Ok(outcomes.into_iter().flatten().collect())
    }
}

impl Saves {
    /// The statement, for a batch of distinct handoffs.
    async fn write(&self, saves: &[Arc<Save>]) -> Result<Vec<Saved>, sqlx::Error> {
        let column = |f: fn(&Save) -> &str| saves.iter().map(|s| f(s)).collect::<Vec<_>>();
        let mut event_ids = Vec::new();
        let mut payloads = Vec::new();
        let mut event_handoffs = Vec::new();
        for save in saves {
            let (ids, bytes) = outbox::rows(&save.events)?;
            event_handoffs.extend(ids.iter().map(|_| save.handoff.handoff_id.as_str()));
            event_ids.extend(ids);
            payloads.extend(bytes);
        }
        let attempts = saves
            .iter()
            .map(|s| serde_json::to_value(&s.handoff.attempts))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let fallbacks: Vec<(&str, &Fallback)> = saves
            .iter()
            .filter_map(|s| Some((s.handoff.handoff_id.as_str(), s.fallback.as_ref()?)))
            .collect();
        let (deflected, deflections): (Vec<&str>, Vec<Vec<u8>>) = saves
            .iter()
            .filter_map(|s| {
                let deflection = s.deflection.as_ref()?;
                Some((s.handoff.handoff_id.as_str(), deflection.encode_to_vec()))
            })
            .unzip();
        let claimed: Vec<String> = sqlx::query_scalar(
            "WITH input AS ( \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
                     $6::text[], $7::text[], $8::text[], $9::text[], $10::jsonb[], $11::text[], \
                     $12::timestamptz[], $13::text[], $14::bytea[], $26::bool[], $27::bool[]) \
                 AS t(handoff_id, account_id, handoff_config_id, consumer_phone, status, channel, \
                     skill_id, ivr_call_id, ivr_number, attempts, duplicate_of, created_at, \
                     idempotency_key, request_hash, intended, release_consumer)), \
             claim AS ( \
                 INSERT INTO idempotency_keys (account_id, idempotency_key, request_hash, handoff_id, expires_at) \
                 SELECT account_id, idempotency_key, request_hash, handoff_id, now() + interval '24 hours' \
                 FROM input WHERE NOT intended \
                 ON CONFLICT (account_id, idempotency_key) DO UPDATE \
                 SET request_hash = EXCLUDED.request_hash, handoff_id = EXCLUDED.handoff_id, \
                     expires_at = EXCLUDED.expires_at \
                 WHERE idempotency_keys.expires_at <= now() \
                 RETURNING handoff_id), \
             handoff AS ( \
                 INSERT INTO handoffs (handoff_id, account_id, handoff_config_id, consumer_phone, status, \
                     channel, skill_id, ivr_call_id, ivr_number, attempts, duplicate_of, created_at) \
                 SELECT handoff_id, account_id, handoff_config_id, consumer_phone, status, channel, \
                     skill_id, ivr_call_id, ivr_number, attempts, duplicate_of, created_at \
                 FROM input WHERE handoff_id IN (SELECT handoff_id FROM claim)), \
             finish AS ( \
                 UPDATE handoffs h SET status = i.status, channel = i.channel, skill_id = i.skill_id, \
                     attempts = i.attempts, duplicate_of = i.duplicate_of, request = NULL \
                 FROM input i \
                 WHERE h.handoff_id = ANY(ARRAY(SELECT handoff_id FROM input WHERE intended)) \
                     AND i.intended AND h.handoff_id = i.handoff_id \
                     AND h.status = 'HANDOFF_STATUS_IN_PROGRESS' \
                 RETURNING h.handoff_id), \
             done AS (SELECT handoff_id FROM claim UNION ALL SELECT handoff_id FROM finish), \
             released AS ( \
                 DELETE FROM consumer_leases c USING input i \
                 WHERE i.release_consumer AND c.account_id = i.account_id \
                     AND c.consumer_phone = i.consumer_phone AND c.handoff_id = i.handoff_id \
                     AND i.handoff_id IN (SELECT handoff_id FROM done)), \
             events AS ( \
                 INSERT INTO outbox (event_id, payload) \
                 SELECT event_id, payload FROM unnest($15::uuid[], $16::bytea[], $17::text[]) \
                     AS e(event_id, payload, handoff_id) \
                 WHERE handoff_id IN (SELECT handoff_id FROM done)), \
             fallback AS ( \
                 INSERT INTO fallbacks (handoff_id, account_id, message_id, remaining, deadline, window_seconds, confirm_by) \
                 SELECT f.handoff_id, i.account_id, f.message_id, f.remaining, f.deadline, f.window_seconds, f.confirm_by \
                 FROM unnest($18::text[], $19::text[], $20::jsonb[], $21::timestamptz[], $22::int[], \
                     $25::timestamptz[]) \
                     AS f(handoff_id, message_id, remaining, deadline, window_seconds, confirm_by) \
                 JOIN input i USING (handoff_id) \
                 WHERE handoff_id IN (SELECT handoff_id FROM done)), \
             deflection AS ( \
                 INSERT INTO deflection_outbox (payload) \
                 SELECT payload FROM unnest($23::text[], $24::bytea[]) WITH ORDINALITY \
                     AS d(handoff_id, payload, n) \
                 WHERE handoff_id IN (SELECT handoff_id FROM done) ORDER BY n) \
             SELECT handoff_id FROM done",
        )
        .bind(column(|s| &s.handoff.handoff_id))
        .bind(column(|s| &s.handoff.account_id))
        .bind(column(|s| &s.handoff.handoff_config_id))
        .bind(column(|s| &s.handoff.consumer_phone))
        .bind(column(|s| s.handoff.status.as_str_name()))
        .bind(
            saves
                .iter()
                .map(|s| s.handoff.channel.map(|c| c.as_str_name()))
                .collect::<Vec<_>>(),
        )
        .bind(column(|s| &s.handoff.skill_id))
        .bind(column(|s| &s.handoff.ivr_call_id))
        .bind(column(|s| &s.handoff.ivr_number))
        .bind(&attempts)
        .bind(
            saves
                .iter()
                .map(|s| s.handoff.duplicate_of.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(saves.iter().map(|s| s.handoff.created_at).collect::<Vec<_>>())
        .bind(column(|s| &s.idempotency_key))
        .bind(saves.iter().map(|s| s.fingerprint.as_slice()).collect::<Vec<_>>())
        .bind(&event_ids)
        .bind(&payloads)
        .bind(&event_handoffs)
        .bind(fallbacks.iter().map(|(h, _)| *h).collect::<Vec<_>>())
        .bind(
            fallbacks
                .iter()
                .map(|(_, f)| f.message_id.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(fallbacks.iter().map(|(_, f)| &f.remaining).collect::<Vec<_>>())
        .bind(fallbacks.iter().map(|(_, f)| f.deadline).collect::<Vec<_>>())
        .bind(fallbacks.iter().map(|(_, f)| f.window_seconds).collect::<Vec<_>>())
        .bind(&deflected)
        .bind(&deflections)
        .bind(fallbacks.iter().map(|(_, f)| f.confirm_by).collect::<Vec<_>>())
        .bind(saves.iter().map(|s| s.intended).collect::<Vec<_>>())
        .bind(saves.iter().map(|s| s.release_consumer).collect::<Vec<_>>())
        .fetch_all(&self.0)
        .await?;
        Ok(saves
            .iter()
            .map(|s| {
                if claimed.contains(&s.handoff.handoff_id) {
                    Saved::Saved
                } else {
                    Saved::Raced
                }
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use c2m_proto::v1::FunnelStage;
    use c2m_test_support::TestDatabase;

    pub(super) fn save(handoff_id: &str, key: &str, fallback: bool) -> Arc<Save> {
        let handoff = StoredHandoff {
            handoff_id: handoff_id.into(),
            account_id: "acme".into(),
            handoff_config_id: "default".into(),
            consumer_phone: "+447700900123".into(),
            status: HandoffStatus::Sent,
            channel: Some(Channel::Sms),
            skill_id: "billing".into(),
            ivr_call_id: String::new(),
            ivr_number: String::new(),
            attempts: Vec::new(),
            duplicate_of: None,
            created_at: Utc::now(),
        };
        Arc::new(Save {
            events: [FunnelStage::Attempted, FunnelStage::Sent]
                .into_iter()
                .map(|stage| pb::Event {
                    handoff_id: handoff_id.into(),
                    ..outbox::event("acme", stage)
                })
                .collect(),
            fallback: fallback.then(|| Fallback {
                message_id: format!("{handoff_id}-1"),
                remaining: serde_json::json!([]),
                deadline: None,
                window_seconds: Some(60),
                confirm_by: None,
            }),
            deflection: Some(pb::Deflection {
                account_id: "acme".into(),
                handoff_id: handoff_id.into(),
                consumer_phone: handoff.consumer_phone.clone(),
                channel: Channel::Sms.into(),
                skill_id: handoff.skill_id.clone(),
                ..Default::default()
            }),
            handoff,
            idempotency_key: key.into(),
            fingerprint: key.as_bytes().to_vec(),
            intended: false,
            release_consumer: false,
        })
    }

    pub(super) async fn count(pool: &PgPool, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await
            .expect("counts")
    }

    /// One statement saves a batch: each handoff whose key is free is written whole (row,
    /// idempotency record, events, fallback, deflection), and one whose key a committed handoff holds writes
    /// nothing at all. Two rows of one batch with the same key fail the statement, which is what
    /// makes the batcher run them one by one (the first saves, the second has raced).
    #[tokio::test]
    async fn a_batch_saves_each_handoff_whole_or_not_at_all() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        let saves = Saves(db.batch_pool().clone());

        let first = saves.run(&[save("ho_first", "k-taken", false)]).await;
        assert!(matches!(first.as_deref(), Ok([Saved::Saved])));

        let batch = [
            save("ho_plain", "k-plain", false),
            save("ho_fallback", "k-fallback", true),
            save("ho_late", "k-taken", true),
        ];
        let outcome = saves.run(&batch).await.expect("one statement");
        assert!(matches!(
            outcome.as_slice(),
            [Saved::Saved, Saved::Saved, Saved::Raced]
        ));
        let pool = db.pool();
        assert_eq!(count(pool, "SELECT count(*) FROM handoffs").await, 3);
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM handoffs WHERE handoff_id = 'ho_late'"
            )
            .await,
            0
        );
        assert_eq!(count(pool, "SELECT count(*) FROM outbox").await, 6);
        let shipping: Vec<String> =
            sqlx::query_scalar::<_, Vec<u8>>("SELECT payload FROM deflection_outbox ORDER BY seq")
                .fetch_all(pool)
                .await
                .expect("deflections")
                .iter()
                .map(|p| {
                    pb::Deflection::decode(p.as_slice())
                        .expect("decodes")
                        .handoff_id
                })
                .collect();
        assert_eq!(shipping, ["ho_first", "ho_plain", "ho_fallback"]);
        assert_eq!(
            sqlx::query_scalar::<_, String>("SELECT handoff_id FROM fallbacks")
                .fetch_all(pool)
                .await
                .expect("fallbacks"),
            vec!["ho_fallback".to_owned()]
        );
        assert_eq!(
            sqlx::query_scalar::<_, String>(
                "SELECT handoff_id FROM idempotency_keys WHERE idempotency_key = 'k-taken'"
            )
            .fetch_one(pool)
            .await
            .expect("key"),
            "ho_first"
        );

        let twins = [save("ho_a", "k-twin", false), save("ho_b", "k-twin", false)];
        assert!(matches!(
            saves.run(&twins).await,
            Err(sqlx::Error::Database(_))
        ));
        assert!(matches!(
            saves.run(&twins[..1]).await.as_deref(),
            Ok([Saved::Saved])
        ));
        assert!(matches!(
            saves.run(&twins[1..]).await.as_deref(),
            Ok([Saved::Raced])
        ));
        assert_eq!(count(pool, "SELECT count(*) FROM outbox").await, 8);
        assert_eq!(
            count(pool, "SELECT count(*) FROM deflection_outbox").await,
            4
        );
    }

    fn intent(handoff_id: &str, key: &str, phone: &str) -> Arc<Intent> {
        Arc::new(Intent {
            handoff: StoredHandoff {
                handoff_id: handoff_id.into(),
                account_id: "acme".into(),
                handoff_config_id: "default".into(),
                consumer_phone: phone.into(),
                status: HandoffStatus::InProgress,
                channel: None,
                skill_id: "billing".into(),
                ivr_call_id: String::new(),
                ivr_number: String::new(),
                attempts: Vec::new(),
                duplicate_of: None,
                created_at: Utc::now(),
            },
            idempotency_key: key.into(),
            fingerprint: key.as_bytes().to_vec(),
            lease: std::time::Duration::from_secs(10),
            request: b"request".to_vec(),
            take_lease: true,
        })
    }

    /// A handoff about to send is written first: it holds its key and its consumer. Another key
    /// for that consumer is written but told who holds them; a twin of the key writes nothing;
    /// the handoff's own retry (the same id) holds both again. Once it has sent nothing, its
    /// outcome gives the consumer back.
    #[tokio::test]
    async fn an_intent_holds_its_key_and_its_consumer_until_it_sends_nothing() {
        let database = TestDatabase::create().await;
        let db = database.migrated(crate::SCHEMA, &crate::MIGRATOR).await;
        let intents = Intents(db.batch_pool().clone());
        let phone = "+447700900123";

        let first = intents
            .run(&[intent("ho_first", "k-first", phone)])
            .await
            .expect("writes");
        assert_eq!(first, [Intended::Holding]);
        let next = intents
            .run(&[
                intent("ho_second", "k-second", phone),
                intent("ho_twin", "k-first", "+447700900999"),
                intent("ho_other", "k-other", "+447700900456"),
            ])
            .await
            .expect("writes");
        assert_eq!(
            next,
            [
                Intended::ConsumerHeld("ho_first".into()),
                Intended::KeyTaken,
                Intended::Holding
            ]
        );
        let again = intents
            .run(&[intent("ho_first", "k-first", phone)])
            .await
            .expect("writes");
        assert_eq!(again, [Intended::Holding], "its own retry");
        let pool = db.pool();
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM handoffs WHERE status = 'HANDOFF_STATUS_IN_PROGRESS'"
            )
            .await,
            3,
            "ho_first, ho_second (to be skipped) and ho_other; not the twin"
        );

        // ho_first's every channel failed: written over its row, the consumer given back.
        let failed = Save {
            handoff: StoredHandoff {
                status: HandoffStatus::Failed,
                ..intent("ho_first", "k-first", phone).handoff.clone()
            },
            idempotency_key: "k-first".into(),
            fingerprint: b"k-first".to_vec(),
            events: Vec::new(),
            fallback: None,
            deflection: None,
            intended: true,
            release_consumer: true,
        };
        let saves = Saves(db.batch_pool().clone());
        let saved = saves.run(&[Arc::new(failed)]).await.expect("saves");
        assert!(matches!(saved.as_slice(), [Saved::Saved]));
        let saved = saves
            .run(&[Arc::new(Save {
                handoff: StoredHandoff {
                    status: HandoffStatus::Sent,
                    ..intent("ho_first", "k-first", phone).handoff.clone()
                },
                idempotency_key: "k-first".into(),
                fingerprint: b"k-first".to_vec(),
                events: Vec::new(),
                fallback: None,
                deflection: None,
                intended: true,
                release_consumer: false,
            })])
            .await
            .expect("saves");
        assert!(
            matches!(saved.as_slice(), [Saved::Raced]),
            "a finished handoff is not finished twice"
        );
        assert_eq!(
            count(
                pool,
                "SELECT count(*) FROM handoffs WHERE request IS NOT NULL"
            )
            .await,
            2,
            "ho_second and ho_other are still to finish; ho_first is done"
        );
        let later = intents
            .run(&[intent("ho_third", "k-third", phone)])
            .await
            .expect("writes");
        assert_eq!(later, [Intended::Holding], "the consumer is free again");
    }
}
