//! Accounts and their settings, API keys, and the audit log.

use super::*;

impl SqliteConfigStore {
    pub(super) async fn create_account(
        &self,
        a: &Account,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO accounts (account_id, display_name, deflection_enabled, \
             landline_check_enabled, rate_limit_per_second, enabled_channels, \
             reply_lookback_hours, created_at, idle_close_minutes, help_text, time_zone) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )
        .bind(&a.id)
        .bind(&a.display_name)
        .bind(a.settings.deflection_enabled)
        .bind(a.settings.landline_check_enabled)
        .bind(i64::from(a.settings.rate_limit_per_second))
        .bind(json_list(&names(&a.settings.enabled_channels)))
        .bind(i64::from(a.settings.reply_lookback_hours))
        .bind(micros(a.created_at))
        .bind(i64::from(a.settings.idle_close_minutes))
        .bind(&a.settings.help_text)
        .bind(&a.settings.time_zone)
        .execute(&mut *tx)
        .await
        .map_err(conflict("account"))?;
        let change = audit(
            &mut tx,
            &a.id,
            actor,
            "CreateAccount",
            &format!("accounts/{}", a.id),
            None,
            Some(account_json(a)),
        )
        .await?;
        self.commit(tx, change).await
    }

    pub(super) async fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(account_row).transpose()?)
    }

    pub(super) async fn update_settings(
        &self,
        id: &str,
        s: &Settings,
        actor: Actor<'_>,
    ) -> Result<Option<Account>, StoreError> {
        let mut tx = self.write().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?1"
        )))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(account_row)
        .transpose()?
        else {
            return Ok(None);
        };
        let after = sqlx::query(sql(format!(
            "UPDATE accounts SET deflection_enabled = ?2, landline_check_enabled = ?3, \
             rate_limit_per_second = ?4, enabled_channels = ?5, reply_lookback_hours = ?6, \
             idle_close_minutes = ?7, help_text = ?8, time_zone = ?9 \
             WHERE account_id = ?1 RETURNING {ACCOUNT_COLUMNS}"
        )))
        .bind(id)
        .bind(s.deflection_enabled)
        .bind(s.landline_check_enabled)
        .bind(i64::from(s.rate_limit_per_second))
        .bind(json_list(&names(&s.enabled_channels)))
        .bind(i64::from(s.reply_lookback_hours))
        .bind(i64::from(s.idle_close_minutes))
        .bind(&s.help_text)
        .bind(&s.time_zone)
        .fetch_one(&mut *tx)
        .await?;
        let after = account_row(&after)?;
        let change = audit(
            &mut tx,
            id,
            actor,
            "UpdateAccountSettings",
            &format!("accounts/{id}"),
            Some(account_json(&before)),
            Some(account_json(&after)),
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(Some(after))
    }

    pub(super) async fn create_api_key(
        &self,
        k: &ApiKey,
        hash: &[u8],
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str_name()).collect();
        sqlx::query(
            "INSERT INTO api_keys (api_key_id, account_id, name, prefix, key_hash, created_at, \
             scopes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&k.id)
        .bind(&k.account_id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(hash)
        .bind(micros(k.created_at))
        .bind(json_list(&scopes))
        .execute(&mut *tx)
        .await
        .map_err(conflict("api key"))?;
        let after = c2m_proto::to_json("c2m.v1.ApiKey", &k.to_wire());
        let change = audit(
            &mut tx,
            &k.account_id,
            actor,
            "CreateApiKey",
            &format!("api_keys/{}", k.id),
            None,
            Some(after),
        )
        .await?;
        self.commit(tx, change).await
    }

    pub(super) async fn api_keys(&self, account_id: &str) -> Result<Vec<ApiKey>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE account_id = ?1 ORDER BY created_at"
        )))
        .bind(account_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(api_key_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn revoke_api_key(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let revoked = sqlx::query(sql(format!(
            "UPDATE api_keys SET revoked_at = ?3 \
             WHERE account_id = ?1 AND api_key_id = ?2 AND revoked_at IS NULL \
             RETURNING {KEY_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .bind(now())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(key) = revoked.as_ref().map(api_key_row).transpose()? else {
            return Ok(false);
        };
        let after = c2m_proto::to_json("c2m.v1.ApiKey", &key.to_wire());
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "RevokeApiKey",
            &format!("api_keys/{id}"),
            None,
            Some(after),
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(true)
    }

    pub(super) async fn use_api_key(&self, hash: &[u8]) -> Result<Option<ApiKey>, StoreError> {
        let row = sqlx::query(sql(format!(
            "UPDATE api_keys SET last_used_at = ?2 \
             WHERE key_hash = ?1 AND revoked_at IS NULL RETURNING {KEY_COLUMNS}"
        )))
        .bind(hash)
        .bind(now())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(api_key_row).transpose()?)
    }

    pub(super) async fn audit_records(
        &self,
        account_id: &str,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
        after: i64,
        limit: i64,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT audit_event_id, account_id, actor, action, resource, before, after, at \
             FROM audit_events \
             WHERE account_id = ?1 AND at >= ?2 AND at < ?3 AND audit_event_id > ?4 \
             ORDER BY audit_event_id LIMIT ?5",
        )
        .bind(account_id)
        .bind(micros(start))
        .bind(micros(end))
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let json = |text: Option<String>| text.and_then(|t| serde_json::from_str(&t).ok());
        rows.iter()
            .map(|row| {
                Ok(AuditRecord {
                    id: row.try_get("audit_event_id")?,
                    account_id: row.try_get("account_id")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    resource: row.try_get("resource")?,
                    before: json(row.try_get("before")?),
                    after: json(row.try_get("after")?),
                    at: time(row.try_get("at")?),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::Db)
    }
}
