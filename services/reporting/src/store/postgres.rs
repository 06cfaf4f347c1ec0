//! [`EventStore`] on PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::{EventStore, Grouping, StoredEvent, TransactionRow, transaction_event};

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
}

impl PgEventStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    async fn transactions(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows: Vec<TransactionRow> = sqlx::query_as(
            "WITH page AS ( \
                   SELECT handoff_id FROM events \
                   WHERE account_id = $1 AND handoff_id > $4 AND handoff_id <> '' \
                   GROUP BY handoff_id HAVING min(occurred_at) >= $2 AND min(occurred_at) < $3 \
                   ORDER BY handoff_id LIMIT $5) \
                 SELECT e.event_id, e.stage, e.occurred_at, e.handoff_id, e.channel, e.skill_id, \
                        e.conversation_id, e.error_code, e.source \
                 FROM events e JOIN page USING (handoff_id) WHERE e.account_id = $1 \
                 ORDER BY e.handoff_id, e.occurred_at, e.event_id",
        )
        .bind(account_id)
        .bind(start)
        .bind(end)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| transaction_event(account_id, row))
            .collect())
    }

    async fn append(&self, events: &[StoredEvent]) -> Result<u64, sqlx::Error> {
        let column = |f: fn(&StoredEvent) -> String| events.iter().map(f).collect::<Vec<_>>();
        let done = sqlx::query(
            "INSERT INTO events (event_id, account_id, stage, occurred_at, handoff_id, \
             handoff_config_id, channel, skill_id, conversation_id, ivr_number, error_code, source, \
             response_delay_ms) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], \
             $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], \
             $13::bigint[]) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(column(|e| e.event_id.clone()))
        .bind(column(|e| e.account_id.clone()))
        .bind(column(|e| e.stage.to_owned()))
        .bind(events.iter().map(|e| e.occurred_at).collect::<Vec<_>>())
        .bind(column(|e| e.handoff_id.clone()))
        .bind(column(|e| e.handoff_config_id.clone()))
        .bind(column(|e| e.channel.to_owned()))
        .bind(column(|e| e.skill_id.clone()))
        .bind(column(|e| e.conversation_id.clone()))
        .bind(column(|e| e.ivr_number.clone()))
        .bind(column(|e| e.error_code.clone()))
        .bind(column(|e| e.source.clone()))
        .bind(events.iter().map(|e| e.response_delay_ms).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn first_responses(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {group}::text, \
                 percentile_disc(0.5) WITHIN GROUP (ORDER BY response_delay_ms), \
                 percentile_disc(0.9) WITHIN GROUP (ORDER BY response_delay_ms) \
             FROM events WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                 AND stage = 'FUNNEL_STAGE_ANSWERED' AND response_delay_ms IS NOT NULL \
             GROUP BY 1 ORDER BY 1",
            group = grouping.column()
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
    }

    async fn funnel(
        &self,
        account_id: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        grouping: Grouping,
    ) -> Result<Vec<(String, String, i64)>, sqlx::Error> {
        let group = grouping.column();
        // A handoff's events come from three services through three outboxes, so the gateway's
        // DELIVERED can arrive before Handoff's SENT. An event about a handoff is counted once
        // Handoff's own events for it (its ATTEMPTED, written with its SENT or its refusal) are
        // here: no funnel shows a later stage of a handoff without its earlier ones.
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {group}::text, stage, count(*) FROM events e \
             WHERE account_id = $1 AND occurred_at >= $2 AND occurred_at < $3 \
                 AND (handoff_id = '' OR stage = 'FUNNEL_STAGE_ATTEMPTED' OR EXISTS ( \
                     SELECT 1 FROM events a WHERE a.handoff_id <> '' AND a.handoff_id = e.handoff_id \
                         AND a.stage = 'FUNNEL_STAGE_ATTEMPTED')) \
             GROUP BY 1, 2 ORDER BY 1, 2"
        )))
        .bind(account_id)
        .bind(start)
        .bind(end)
        .fetch_all(&self.pool)
        .await
    }
}
