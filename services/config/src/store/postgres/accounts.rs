use sqlx::PgPool;

use super::*;

pub(super) async fn create_account(
    pool: &PgPool,
    a: &Account,
    actor: Actor<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO accounts (account_id, display_name, deflection_enabled, landline_check_enabled, \
         rate_limit_per_second, enabled_channels, reply_lookback_hours, created_at, \
         idle_close_minutes, help_text, time_zone) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&a.id)
    .bind(&a.display_name)
    .bind(a.settings.deflection_enabled)
    .bind(a.settings.landline_check_enabled)
    .bind(a.settings.rate_limit_per_second as i32)
    .bind(names(&a.settings.enabled_channels))
    .bind(a.settings.reply_lookback_hours as i32)
    .bind(a.created_at)
    .bind(a.settings.idle_close_minutes as i32)
    .bind(&a.settings.help_text)
    .bind(&a.settings.time_zone)
    .execute(&mut *tx)
    .await
    .map_err(conflict("account"))?;
    audit(
        &mut tx,
        &a.id,
        actor,
        "CreateAccount",
        &format!("accounts/{}", a.id),
        None,
        Some(account_json(a)),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn account(pool: &PgPool, id: &str) -> Result<Option<Account>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(account_row).transpose()?)
}

pub(super) async fn update_settings(
    pool: &PgPool,
    id: &str,
    s: &Settings,
    actor: Actor<'_>,
) -> Result<Option<Account>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query(sql(format!(
        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(account_row)
    .transpose()?
    else {
        return Ok(None);
    };
    let after = sqlx::query(sql(format!(
        "UPDATE accounts SET deflection_enabled = $2, landline_check_enabled = $3, \
         rate_limit_per_second = $4, enabled_channels = $5, reply_lookback_hours = $6, \
         idle_close_minutes = $7, help_text = $8, time_zone = $9 \
         WHERE account_id = $1 RETURNING {ACCOUNT_COLUMNS}"
    )))
    .bind(id)
    .bind(s.deflection_enabled)
    .bind(s.landline_check_enabled)
    .bind(s.rate_limit_per_second as i32)
    .bind(names(&s.enabled_channels))
    .bind(s.reply_lookback_hours as i32)
    .bind(s.idle_close_minutes as i32)
    .bind(&s.help_text)
    .bind(&s.time_zone)
    .fetch_one(&mut *tx)
    .await
    .and_then(account_row)?;
    audit(
        &mut tx,
        id,
        actor,
        "UpdateAccountSettings",
        &format!("accounts/{id}"),
        Some(account_json(&before)),
        Some(account_json(&after)),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(after))
}

pub(super) async fn create_api_key(
    pool: &PgPool,
    k: &ApiKey,
    hash: &[u8],
    actor: Actor<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO api_keys (api_key_id, account_id, name, prefix, key_hash, created_at, scopes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&k.id)
    .bind(&k.account_id)
    .bind(&k.name)
    .bind(&k.prefix)
    .bind(hash)
    .bind(k.created_at)
    .bind(k.scopes.iter().map(|s| s.as_str_name()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await
    .map_err(conflict("api key"))?;
    let after = c2m_proto::to_json("c2m.v1.ApiKey", &k.to_wire());
    audit(
        &mut tx,
        &k.account_id,
        actor,
        "CreateApiKey",
        &format!("api_keys/{}", k.id),
        None,
        Some(after),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn api_keys(pool: &PgPool, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
    let rows = sqlx::query(sql(format!(
        "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = $1 ORDER BY created_at"
    )))
    .bind(account_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(api_key_row)
        .collect::<Result<_, _>>()?)
}

pub(super) async fn revoke_api_key(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    actor: Actor<'_>,
) -> Result<bool, StoreError> {
    let mut tx = pool.begin().await?;
    let revoked = sqlx::query(sql(format!(
        "UPDATE api_keys SET revoked_at = now() \
         WHERE account_id = $1 AND api_key_id = $2 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(api_key_row)
    .transpose()?;
    let Some(key) = revoked else {
        return Ok(false);
    };
    let after = c2m_proto::to_json("c2m.v1.ApiKey", &key.to_wire());
    audit(
        &mut tx,
        account_id,
        actor,
        "RevokeApiKey",
        &format!("api_keys/{id}"),
        None,
        Some(after),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn use_api_key(pool: &PgPool, hash: &[u8]) -> Result<Option<ApiKey>, StoreError> {
    let row = sqlx::query(sql(format!(
        "UPDATE api_keys SET last_used_at = now() \
         WHERE key_hash = $1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
    )))
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(api_key_row).transpose()?)
}
