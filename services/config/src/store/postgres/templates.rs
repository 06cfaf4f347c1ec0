use sqlx::PgPool;

use super::*;

pub(super) async fn create_template(
    pool: &PgPool,
    t: &Template,
    actor: Actor<'_>,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO whatsapp_templates (template_id, account_id, name, language, category, body, status) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
    audit(
        &mut tx,
        &t.account_id,
        actor,
        "CreateWhatsAppTemplate",
        &format!("whatsapp_templates/{}", t.id),
        None,
        Some(template_json(t)),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn template(
    pool: &PgPool,
    account_id: &str,
    id: &str,
) -> Result<Option<Template>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(template_row).transpose()?)
}

pub(super) async fn templates(
    pool: &PgPool,
    account_id: &str,
    after: &str,
    limit: i64,
) -> Result<Vec<Template>, StoreError> {
    let rows = sqlx::query(sql(format!(
        "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id > $2 \
         ORDER BY template_id LIMIT $3"
    )))
    .bind(account_id)
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(template_row)
        .collect::<Result<_, _>>()?)
}

pub(super) async fn set_template_status(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    status: WhatsAppTemplateStatus,
    actor: Actor<'_>,
) -> Result<Option<Template>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = sqlx::query(sql(format!(
        "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2 FOR UPDATE"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(template_row)
    .transpose()?
    else {
        return Ok(None);
    };
    sqlx::query(
        "UPDATE whatsapp_templates SET status = $3 WHERE account_id = $1 AND template_id = $2",
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
    audit(
        &mut tx,
        account_id,
        actor,
        "UpdateWhatsAppTemplateStatus",
        &format!("whatsapp_templates/{id}"),
        Some(template_json(&before)),
        Some(template_json(&after)),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(after))
}

pub(super) async fn delete_template(
    pool: &PgPool,
    account_id: &str,
    id: &str,
    actor: Actor<'_>,
) -> Result<TemplateDeleted, StoreError> {
    let mut tx = pool.begin().await?;
    let users: Vec<String> = sqlx::query_scalar(
        "SELECT handoff_config_id FROM handoff_configs \
         WHERE account_id = $1 AND whatsapp_template_id = $2 ORDER BY 1 FOR SHARE",
    )
    .bind(account_id)
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    if !users.is_empty() {
        return Ok(TemplateDeleted::InUse(users));
    }
    let Some(before) = sqlx::query(sql(format!(
        "DELETE FROM whatsapp_templates WHERE account_id = $1 AND template_id = $2 RETURNING {TEMPLATE_COLUMNS}"
    )))
    .bind(account_id)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(template_row)
    .transpose()?
    else {
        return Ok(TemplateDeleted::Missing);
    };
    audit(
        &mut tx,
        account_id,
        actor,
        "DeleteWhatsAppTemplate",
        &format!("whatsapp_templates/{id}"),
        Some(template_json(&before)),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(TemplateDeleted::Done)
}

pub(super) async fn template_named(
    pool: &PgPool,
    account_id: &str,
    name: &str,
    language: &str,
) -> Result<Option<Template>, StoreError> {
    let row = sqlx::query(sql(format!(
        "SELECT {TEMPLATE_COLUMNS} FROM whatsapp_templates \
         WHERE account_id = $1 AND name = $2 AND language = $3"
    )))
    .bind(account_id)
    .bind(name)
    .bind(language)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(template_row).transpose()?)
}
