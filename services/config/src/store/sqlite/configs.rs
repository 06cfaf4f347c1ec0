//! Handoff configurations and the WhatsApp templates they send.

use super::*;

impl SqliteConfigStore {
    pub(super) async fn create_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO handoff_configs (handoff_config_id, account_id, name, skill_id, \
             channel_priority, messages, whatsapp_template_id, apple_business_id, \
             apple_intent_id, apple_group_id, delivery_deadline_seconds, version, updated_at, \
             apple_body) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )
        .bind(&c.id)
        .bind(&c.account_id)
        .bind(&c.name)
        .bind(&c.skill_id)
        .bind(json_list(&names(&c.channel_priority)))
        .bind(messages_json(c).to_string())
        .bind(&c.whatsapp_template_id)
        .bind(&c.apple_business_id)
        .bind(&c.apple_intent_id)
        .bind(&c.apple_group_id)
        .bind(i64::from(c.delivery_deadline_seconds))
        .bind(c.version)
        .bind(micros(c.updated_at))
        .bind(&c.apple_body)
        .execute(&mut *tx)
        .await
        .map_err(conflict("handoff configuration (id or name)"))?;
        let change = audit(
            &mut tx,
            &c.account_id,
            actor,
            "CreateHandoffConfig",
            &format!("handoff_configs/{}", c.id),
            None,
            Some(config_json(c)),
        )
        .await?;
        self.commit(tx, change).await
    }

    pub(super) async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<HandoffConfig>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
             WHERE account_id = ?1 AND handoff_config_id = ?2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(config_row).transpose()?)
    }

    pub(super) async fn handoff_configs(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
        channel: Option<Channel>,
        skill_id: Option<&str>,
    ) -> Result<Vec<HandoffConfig>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
             WHERE account_id = ?1 AND handoff_config_id > ?2 \
             AND (?3 IS NULL OR EXISTS (SELECT 1 FROM json_each(channel_priority) \
                 WHERE value = ?3)) \
             AND (?4 IS NULL OR skill_id = ?4) \
             ORDER BY handoff_config_id LIMIT ?5"
        )))
        .bind(account_id)
        .bind(after)
        .bind(channel.map(|c| c.as_str_name()))
        .bind(skill_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(config_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn update_handoff_config(
        &self,
        c: &HandoffConfig,
        actor: Actor<'_>,
    ) -> Result<Updated, StoreError> {
        let mut tx = self.write().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {CONFIG_COLUMNS} FROM handoff_configs \
             WHERE account_id = ?1 AND handoff_config_id = ?2"
        )))
        .bind(&c.account_id)
        .bind(&c.id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(config_row)
        .transpose()?
        else {
            return Ok(Updated::Missing);
        };
        if before.version != c.version {
            return Ok(Updated::Stale(before.version));
        }
        let after = sqlx::query(sql(format!(
            "UPDATE handoff_configs SET name = ?3, skill_id = ?4, channel_priority = ?5, \
             messages = ?6, whatsapp_template_id = ?7, apple_business_id = ?8, \
             apple_intent_id = ?9, apple_group_id = ?10, delivery_deadline_seconds = ?11, \
             apple_body = ?12, version = version + 1, updated_at = ?13 \
             WHERE account_id = ?1 AND handoff_config_id = ?2 RETURNING {CONFIG_COLUMNS}"
        )))
        .bind(&c.account_id)
        .bind(&c.id)
        .bind(&c.name)
        .bind(&c.skill_id)
        .bind(json_list(&names(&c.channel_priority)))
        .bind(messages_json(c).to_string())
        .bind(&c.whatsapp_template_id)
        .bind(&c.apple_business_id)
        .bind(&c.apple_intent_id)
        .bind(&c.apple_group_id)
        .bind(i64::from(c.delivery_deadline_seconds))
        .bind(&c.apple_body)
        .bind(now())
        .fetch_one(&mut *tx)
        .await
        .map_err(conflict("handoff configuration name"))?;
        let after = config_row(&after)?;
        let change = audit(
            &mut tx,
            &c.account_id,
            actor,
            "UpdateHandoffConfig",
            &format!("handoff_configs/{}", c.id),
            Some(config_json(&before)),
            Some(config_json(&after)),
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(Updated::Done(Box::new(after)))
    }

    pub(super) async fn delete_handoff_config(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let gone = sqlx::query(sql(format!(
            "DELETE FROM handoff_configs WHERE account_id = ?1 AND handoff_config_id = ?2 \
             RETURNING {CONFIG_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(before) = gone.as_ref().map(config_row).transpose()? else {
            return Ok(false);
        };
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "DeleteHandoffConfig",
            &format!("handoff_configs/{id}"),
            Some(config_json(&before)),
            None,
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(true)
    }

    pub(super) async fn create_template(
        &self,
        t: &Template,
        actor: Actor<'_>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO whatsapp_templates (template_id, account_id, name, language, category, \
             body, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&t.id)
        .bind(&t.account_id)
        .bind(&t.name)
        .bind(&t.language)
        .bind(t.category.as_str_name())
        .bind(&t.body)
        .bind(t.status.as_str_name())
        .execute(&mut *tx)
        .await
        .map_err(conflict("template (id, or name and language)"))?;
        let change = audit(
            &mut tx,
            &t.account_id,
            actor,
            "CreateWhatsAppTemplate",
            &format!("whatsapp_templates/{}", t.id),
            None,
            Some(template_json(t)),
        )
        .await?;
        self.commit(tx, change).await
    }

    pub(super) async fn template(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Option<Template>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates \
             WHERE account_id = ?1 AND template_id = ?2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(template_row).transpose()?)
    }

    pub(super) async fn template_named(
        &self,
        account_id: &str,
        name: &str,
        language: &str,
    ) -> Result<Option<Template>, StoreError> {
        let row = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates \
             WHERE account_id = ?1 AND name = ?2 AND language = ?3"
        )))
        .bind(account_id)
        .bind(name)
        .bind(language)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(template_row).transpose()?)
    }

    pub(super) async fn templates(
        &self,
        account_id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<Template>, StoreError> {
        let rows = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates \
             WHERE account_id = ?1 AND template_id > ?2 ORDER BY template_id LIMIT ?3"
        )))
        .bind(account_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(template_row).collect::<Result<_, _>>()?)
    }

    pub(super) async fn set_template_status(
        &self,
        account_id: &str,
        id: &str,
        status: WhatsAppTemplateStatus,
        actor: Actor<'_>,
    ) -> Result<Option<Template>, StoreError> {
        let mut tx = self.write().await?;
        let Some(before) = sqlx::query(sql(format!(
            "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates \
             WHERE account_id = ?1 AND template_id = ?2"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(template_row)
        .transpose()?
        else {
            return Ok(None);
        };
        sqlx::query(
            "UPDATE whatsapp_templates SET status = ?3 WHERE account_id = ?1 AND template_id = ?2",
        )
        .bind(account_id)
        .bind(id)
        .bind(status.as_str_name())
        .execute(&mut *tx)
        .await?;
        let after = Template {
            status,
            ..before.clone()
        };
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "UpdateWhatsAppTemplateStatus",
            &format!("whatsapp_templates/{id}"),
            Some(template_json(&before)),
            Some(template_json(&after)),
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(Some(after))
    }

    pub(super) async fn delete_template(
        &self,
        account_id: &str,
        id: &str,
        actor: Actor<'_>,
    ) -> Result<TemplateDeleted, StoreError> {
        let mut tx = self.write().await?;
        let users: Vec<String> = sqlx::query_scalar(
            "SELECT handoff_config_id FROM handoff_configs \
             WHERE account_id = ?1 AND whatsapp_template_id = ?2 ORDER BY 1",
        )
        .bind(account_id)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        if !users.is_empty() {
            return Ok(TemplateDeleted::InUse(users));
        }
        let gone = sqlx::query(sql(format!(
            "DELETE FROM whatsapp_templates WHERE account_id = ?1 AND template_id = ?2 \
             RETURNING {TEMPLATE_COLUMNS}"
        )))
        .bind(account_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(before) = gone.as_ref().map(template_row).transpose()? else {
            return Ok(TemplateDeleted::Missing);
        };
        let change = audit(
            &mut tx,
            account_id,
            actor,
            "DeleteWhatsAppTemplate",
            &format!("whatsapp_templates/{id}"),
            Some(template_json(&before)),
            None,
        )
        .await?;
        self.commit(tx, change).await?;
        Ok(TemplateDeleted::Done)
    }
}
