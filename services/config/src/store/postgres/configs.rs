use sqlx::PgPool;

use super::*;

pub(super) async fn create_handoff_config(
    pool: &PgPool,
    c: &HandoffConfig,
    actor: Actor<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO handoff_configs (handoff_config_id, account_id, name, skill_id, channel_priority, \
         messages, whatsapp_template_id, apple_business_id, apple_intent_id, apple_group_id, \
         delivery_deadline_seconds, version, updated_at, apple_body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(&c.id)
    .bind(&c.account_id)
    .bind(&c.name)
    .bind(&c.skill_id)
    .bind(names(&c.channel_priority))
    .bind(messages_json(c))
    .bind(&c.whatsapp_template_id)
    .bind(&c.apple_business_id)
    .bind(&c.apple_intent_id)
    .bind(&c.apple_group_id)
    .bind(c.delivery_deadline_seconds as i32)
    .bind(c.version)
    .bind(c.updated_at)
    .bind(&c.apple_body)
    .execute(&mut *tx)
    .await
    .map_err(conflict("handoff configuration (id or name)"))?;
    audit(
        &mut tx,
        &c.account_id,
        actor,
        "CreateHandoffConfig",
        &format!("handoff_configs/{}", c.id),
        None,
        Some(config_json(c)),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn handoff_config(
    pool: &PgPool,
    account_id: &str,
    id: &str,
) -> Result<Option<HandoffConfig>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {CONFIG_COLUMNS} FROM handoff_configs WHERE account_id = $1 AND handoff_config_id = $2"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(config_row).transpose()?)
}

pub(super) async fn handoff_configs(
    pool: &PgPool,
    account_id: &str,
    after: &str,
    limit: i64,
    channel: Option<Channel>,
    skill_id: Option<&str>,
) -> Result<Vec<HandoffConfig>, StoreError> {
    let rows = sqlx::query(sql(format!(
        "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
         WHERE account_id = $1 AND handoff_config_id > $2 \
         AND ($3::text IS NULL OR $3 = ANY(channel_priority)) \
         AND ($4::text IS NULL OR skill_id = $4) \
         ORDER BY handoff_config_id LIMIT $5"
    )))
    .bind(account_id)
    .bind(after)
    .bind(channel.map(|c| c.as_str_name()))
    .bind(skill_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(config_row).collect::<Result<_, _>>()?)
}

pub(super) async fn update_handoff_config(
    pool: &PgPool,
    c: &HandoffConfig,
    actor: Actor<'_>,
) -> Result<Updated, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query(sql(format!(
        "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
         WHERE account_id = $1 AND handoff_config_id = $2 FOR UPDATE"
    )))
    .bind(&c.account_id)
    .bind(&c.id)
    .fetch_optional(&mut *tx)
    .await?
    .map(config_row)
    .transpose()?
    else {
        return Ok(Updated::Missing);
    };
    if before.version != c.version {
        return Ok(Updated::Stale(before.version));
    }
    let after = sqlx::query(sql(format!(
        "UPDATE handoff_configs SET name = $3, skill_id = $4, channel_priority = $5, messages = $6, \
         whatsapp_template_id = $7, apple_business_id = $8, apple_intent_id = $9, apple_group_id = $10, \
         delivery_deadline_seconds = $11, apple_body = $12, version = version + 1, updated_at = now() \
         WHERE account_id = $1 AND handoff_config_id = $2 RETURNING {CONFIG_COLUMNS}"
    )))
    .bind(&c.account_id)
    .bind(&c.id)
    .bind(&c.name)
    .bind(&c.skill_id)
    .bind(names(&c.channel_priority))
    .bind(messages_json(c))
    .bind(&c.whatsapp_template_id)
    .bind(&c.apple_business_id)
    .bind(&c.apple_intent_id)
    .bind(&c.apple_group_id)
    .bind(c.delivery_deadline_seconds as i32)
    .bind(&c.apple_body)
    .fetch_one(&mut *tx)
    .await
    .map_err(conflict("handoff configuration name"))
    .and_then(|row| config_row(row).map_err(StoreError::Db))?;
    audit(
        &mut tx,
        &c.account_id,
        actor,
        "UpdateHandoffConfig",
        &format!("handoff_configs/{}", c.id),
        Some(config_json(&before)),
        Some(config_json(&after)),
    )
    .await?;
    tx.commit().await?;
    Ok(Updated::Done(Box::new(after)))
}

pub(super) async fn delete_handoff_config(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    actor: Actor<'_>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query(sql(format!(
        "DELETE FROM handoff_configs WHERE account_id = $1 AND handoff_config_id = $2 RETURNING {CONFIG_COLUMNS}"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(config_row)
    .transpose()?
    else {
        return Ok(false);
    };
    audit(
        &mut tx,
        account_id,
        actor,
        "DeleteHandoffConfig",
        &format!("handoff_configs/{id}"),
        Some(config_json(&before)),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
