//! Consumers' consent per channel: the current opt-outs every handoff reads, and the history of
//! every opt-out and opt-in, which brands list and export.

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::{mask_phone, status::FieldViolations};
use tonic::Status;

use crate::{db_status, required};
use c2m_storage::outbox;
use sqlx::{PgPool, Row};

/// A consumer opting out of a channel, or back in.
pub(crate) struct Change<'a> {
    pub account_id: &'a str,
    pub consumer_phone: &'a str,
    pub channel: Channel,
    pub source: &'a str,
    pub opted_in: bool,
}

/// Records a change of consent with its history row and funnel event; `false` when it changes
/// nothing (STOP from a consumer already opted out, START from one who never did), which is
/// neither recorded nor counted again.
pub(crate) async fn record(pool: &PgPool, c: &Change<'_>) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (account, phone, channel) = (c.account_id, c.consumer_phone, c.channel.as_str_name());
    let written = if c.opted_in {
        sqlx::query(
            "DELETE FROM opt_outs WHERE account_id = $1 AND consumer_phone = $2 AND channel = $3",
        )
        .bind(account)
        .bind(phone)
        .bind(channel)
        .execute(&mut *tx)
        .await?
    } else {
        sqlx::query(
            "INSERT INTO opt_outs (account_id, consumer_phone, channel, source) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (account_id, consumer_phone, channel) DO NOTHING",
        )
        .bind(account)
        .bind(phone)
        .bind(channel)
        .bind(c.source)
        .execute(&mut *tx)
        .await?
    };
    let changed = written.rows_affected() == 1;
    if changed {
        sqlx::query(
            "INSERT INTO consent_changes (account_id, consumer_phone, channel, opted_in, source) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(c.account_id)
        .bind(c.consumer_phone)
        .bind(c.channel.as_str_name())
        .bind(c.opted_in)
        .bind(c.source)
        .execute(&mut *tx)
        .await?;
        let stage = if c.opted_in {
            FunnelStage::OptedIn
        } else {
            FunnelStage::OptedOut
        };
        let event = pb::Event {
            channel: c.channel as i32,
            source: c.source.to_owned(),
            ..outbox::event(c.account_id, stage)
        };
        outbox::enqueue(&mut tx, &[event]).await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// An account's consent changes after `after`, oldest first, at most `limit`, for one consumer
/// or channel if asked; with the id of each.
pub(crate) async fn list(
    pool: &PgPool,
    account_id: &str,
    consumer_phone: Option<&str>,
    channel: Option<Channel>,
    after: i64,
    limit: i64,
) -> Result<Vec<(i64, pb::ConsentChange)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, consumer_phone, channel, opted_in, source, at FROM consent_changes \
         WHERE account_id = $1 AND id > $2 \
         AND ($3::text IS NULL OR consumer_phone = $3) AND ($4::text IS NULL OR channel = $4) \
         ORDER BY id LIMIT $5",
    )
    .bind(account_id)
    .bind(after)
    .bind(consumer_phone)
    .bind(channel.map(|c| c.as_str_name()))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                pb::ConsentChange {
                    consumer_phone: row.try_get("consumer_phone")?,
                    channel: Channel::from_str_name(&row.try_get::<String, _>("channel")?)
                        .unwrap_or_default() as i32,
                    opted_in: row.try_get("opted_in")?,
                    source: row.try_get("source")?,
                    at: Some(c2m_proto::timestamp(row.try_get("at")?)),
                },
            ))
        })
        .collect()
}

impl crate::Service {
    /// Validates and records an opt-out or opt-in.
    pub(crate) async fn record_consent(
        &self,
        account_id: &str,
        consumer_phone: &str,
        channel: i32,
        source: &str,
        opted_in: bool,
    ) -> Result<(), Status> {
        let mut violations = FieldViolations::new();
        required(&mut violations, "account_id", account_id);
        required(&mut violations, "consumer_phone", consumer_phone);
        if source.len() > 128 {
            violations.add("source", "at most 128 characters");
        }
        let channel = match Channel::try_from(channel) {
            Ok(Channel::Unspecified) | Err(_) => {
                violations.add("channel", "a channel is required");
                Channel::Unspecified
            }
            Ok(channel) => channel,
        };
        violations.into_result()?;
        let change = Change {
            account_id,
            consumer_phone,
            channel,
            source,
            opted_in,
        };
        if record(self.db.pool(), &change).await.map_err(db_status)? {
            self.relay.wake();
            tracing::info!(account_id, consumer = %mask_phone(consumer_phone), channel = channel.as_str_name(), source, opted_in, "consent changed");
        }
        Ok(())
    }
}
