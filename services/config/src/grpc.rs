//! The `c2m.v1.ConfigService` RPCs: authorise, validate, store.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_proto::v1::{self as pb, config_service_server::ConfigService};
use c2m_runtime::{
    auth::Role,
    ids,
    status::{self, FieldViolations},
};
use chrono::Utc;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    Service,
    model::{Account, ApiKey, HandoffConfig, Settings, Template},
    store::{Actor, StoreError, TemplateDeleted, Updated},
};

/// Storage failures as gRPC statuses: conflicts are the caller's, the rest are ours.
fn store_status(error: StoreError) -> Status {
    match error {
        StoreError::Conflict(what) => Status::already_exists(format!("{what} already exists")),
        StoreError::Db(e) => c2m_storage::postgres::db_status("config", e),
    }
}

/// API keys: `c2m_` and 32 random bytes, base64url. Only their SHA-256 is stored.
fn new_api_key() -> Result<String, Status> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|_| Status::internal("no randomness available"))?;
    Ok(format!("c2m_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

fn hash_key(plaintext: &str) -> Vec<u8> {
    Sha256::digest(plaintext.as_bytes()).to_vec()
}

/// Page sizes: at most 100, 50 when unset.
fn page_size(requested: i32) -> i64 {
    match requested {
        n if n <= 0 => 50,
        n => i64::from(n.min(100)),
    }
}

/// Page tokens are the last key of the page, opaque to callers.
fn next_token(last: Option<&str>, full: bool) -> String {
    match last {
        Some(last) if full => URL_SAFE_NO_PAD.encode(last),
        _ => String::new(),
    }
}

fn after_token(token: &str) -> Result<String, Status> {
    if token.is_empty() {
        return Ok(String::new());
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| status::invalid_field("page_token", "not a token this service gave out"))
}

impl Service {
    /// A configuration that sends a WhatsApp template needs one Meta has approved.
    async fn check_template(
        &self,
        config: &HandoffConfig,
        violations: &mut FieldViolations,
    ) -> Result<(), Status> {
        let Some(id) = &config.whatsapp_template_id else {
            return Ok(());
        };
        match self
            .store
            .template(&config.account_id, id)
            .await
            .map_err(store_status)?
        {
            None => violations.add("config.whatsapp_template_id", format!("no template {id}")),
            Some(t) if t.status != pb::WhatsAppTemplateStatus::Approved => violations.add(
                "config.whatsapp_template_id",
                format!("template {id} is {}, not approved", t.status.as_str_name()),
            ),
            Some(_) => {}
        }
        Ok(())
    }

    async fn existing_account(&self, id: &str) -> Result<Account, Status> {
        self.store
            .account(id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("account {id} not found")))
    }
}

#[tonic::async_trait]
impl ConfigService for Service {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::CreateAccountResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.require_operator()?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let id = if request.account_id.is_empty() {
            ids::generate("acct")
        } else {
            if !ids::is_slug(&request.account_id) {
                violations.add("account_id", "3 to 64 lowercase letters, digits or dashes");
            }
            request.account_id.clone()
        };
        let display_name = request.display_name.trim().to_owned();
        if display_name.is_empty() || display_name.chars().count() > 200 {
            violations.add("display_name", "required, at most 200 characters");
        }
        let settings = match &request.settings {
            Some(wire) => Settings::from_wire(wire, "settings", &mut violations),
            None => Settings::default(),
        };
        violations.into_result()?;
        let account = Account {
            id,
            display_name,
            settings,
            created_at: Utc::now(),
        };
        self.store
            .create_account(&account, Actor(&caller.sub))
            .await
            .map_err(store_status)?;
        tracing::info!(account_id = %account.id, "account created");
        Ok(Response::new(pb::CreateAccountResponse {
            account: Some(account.to_wire()),
        }))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.authorize(&request.get_ref().account_id, Role::Viewer)?;
        let account = self.existing_account(&request.get_ref().account_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(account.to_wire()),
        }))
    }

    async fn update_account_settings(
        &self,
        request: Request<pb::UpdateAccountSettingsRequest>,
    ) -> Result<Response<pb::UpdateAccountSettingsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.authorize(&request.get_ref().account_id, Role::Admin)?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let Some(wire) = &request.settings else {
            violations.add("settings", "required");
            return Err(violations.into_result().expect_err("one violation"));
        };
        let settings = Settings::from_wire(wire, "settings", &mut violations);
        violations.into_result()?;
        let account = self
            .store
            .update_settings(&request.account_id, &settings, Actor(&caller.sub))
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!("account {} not found", request.account_id))
            })?;
        tracing::info!(account_id = %account.id, "account settings updated");
        Ok(Response::new(pb::UpdateAccountSettingsResponse {
            account: Some(account.to_wire()),
        }))
    }

    async fn create_handoff_config(
        &self,
        request: Request<pb::CreateHandoffConfigRequest>,
    ) -> Result<Response<pb::CreateHandoffConfigResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.authorize(&request.get_ref().account_id, Role::Editor)?;
        let request = request.into_inner();
        let account = self.existing_account(&request.account_id).await?;
        let mut violations = FieldViolations::new();
        let Some(wire) = &request.config else {
            violations.add("config", "required");
            return Err(violations.into_result().expect_err("one violation"));
        };
        let config = HandoffConfig::from_wire(&account, wire, &mut violations);
        self.check_template(&config, &mut violations).await?;
        violations.into_result()?;
        self.store
            .create_handoff_config(&config, Actor(&caller.sub))
            .await
            .map_err(store_status)?;
        tracing::info!(account_id = %config.account_id, handoff_config_id = %config.id, "handoff configuration created");
        Ok(Response::new(pb::CreateHandoffConfigResponse {
            config: Some(config.to_wire()),
        }))
    }

    async fn get_handoff_config(
        &self,
        request: Request<pb::GetHandoffConfigRequest>,
    ) -> Result<Response<pb::GetHandoffConfigResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let request = request.into_inner();
        caller.authorize(&request.account_id, Role::Viewer)?;
        let config = self
            .store
            .handoff_config(&request.account_id, &request.handoff_config_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "handoff configuration {} not found in account {}",
                    request.handoff_config_id, request.account_id
                ))
            })?;
        Ok(Response::new(pb::GetHandoffConfigResponse {
            config: Some(config.to_wire()),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let request = request.into_inner();
        caller.authorize(&request.account_id, Role::Admin)?;
        let name = request.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(status::invalid_field(
                "name",
                "required, at most 100 characters",
            ));
        }
        self.existing_account(&request.account_id).await?;
        let plaintext = new_api_key()?;
        let key = ApiKey {
            id: ids::generate("key"),
            account_id: request.account_id,
            name,
            prefix: plaintext.chars().take(12).collect(),
            created_at: Utc::now(),
            last_used_at: None,
            revoked_at: None,
        };
        self.store
            .create_api_key(&key, &hash_key(&plaintext), Actor(&caller.sub))
            .await
            .map_err(store_status)?;
        tracing::info!(account_id = %key.account_id, api_key_id = %key.id, "api key created");
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key.to_wire()),
            plaintext,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.authorize(&request.get_ref().account_id, Role::Admin)?;
        let keys = self
            .store
            .api_keys(&request.get_ref().account_id)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(ApiKey::to_wire).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let request = request.into_inner();
        caller.authorize(&request.account_id, Role::Admin)?;
        if !self
            .store
            .revoke_api_key(&request.account_id, &request.api_key_id, Actor(&caller.sub))
            .await
            .map_err(store_status)?
        {
            return Err(Status::not_found(format!(
                "no live api key {} in account {}",
                request.api_key_id, request.account_id
            )));
        }
        tracing::info!(account_id = %request.account_id, api_key_id = %request.api_key_id, "api key revoked");
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }

    async fn authenticate_api_key(
        &self,
        request: Request<pb::AuthenticateApiKeyRequest>,
    ) -> Result<Response<pb::AuthenticateApiKeyResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let key = self
            .store
            .use_api_key(&hash_key(&request.get_ref().plaintext))
            .await
            .map_err(store_status)?
            // The caller (a c2m service) is authenticated; the key it asks about is unknown.
            .ok_or_else(|| Status::not_found("unknown or revoked api key"))?;
        Ok(Response::new(pb::AuthenticateApiKeyResponse {
            account_id: key.account_id,
            api_key_id: key.id,
        }))
    }

    async fn list_handoff_configs(
        &self,
        request: Request<pb::ListHandoffConfigsRequest>,
    ) -> Result<Response<pb::ListHandoffConfigsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let limit = page_size(r.page_size);
        let channel = match pb::Channel::try_from(r.channel) {
            Ok(pb::Channel::Unspecified) => None,
            Ok(channel) => Some(channel),
            Err(_) => return Err(status::invalid_field("channel", "not a channel")),
        };
        let skill = Some(r.skill_id.as_str()).filter(|s| !s.is_empty());
        let configs = self
            .store
            .handoff_configs(
                &r.account_id,
                &after_token(&r.page_token)?,
                limit,
                channel,
                skill,
            )
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListHandoffConfigsResponse {
            next_page_token: next_token(
                configs.last().map(|c| c.id.as_str()),
                configs.len() as i64 == limit,
            ),
            configs: configs.iter().map(HandoffConfig::to_wire).collect(),
        }))
    }

    async fn update_handoff_config(
        &self,
        request: Request<pb::UpdateHandoffConfigRequest>,
    ) -> Result<Response<pb::UpdateHandoffConfigResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        let account = self.existing_account(&r.account_id).await?;
        let mut violations = FieldViolations::new();
        let Some(wire) = &r.config else {
            return Err(status::invalid_field("config", "required"));
        };
        if wire.handoff_config_id.is_empty() {
            violations.add("config.handoff_config_id", "required");
        }
        if wire.version <= 0 {
            violations.add("config.version", "the version last read is required");
        }
        let mut config = HandoffConfig::from_wire(&account, wire, &mut violations);
        config.version = wire.version;
        self.check_template(&config, &mut violations).await?;
        violations.into_result()?;
        match self
            .store
            .update_handoff_config(&config, Actor(&caller.sub))
            .await
            .map_err(store_status)?
        {
            Updated::Done(updated) => Ok(Response::new(pb::UpdateHandoffConfigResponse {
                config: Some(updated.to_wire()),
            })),
            Updated::Stale(current) => Err(Status::aborted(format!(
                "configuration {} is at version {current}, not {}: read it again and reapply the change",
                config.id, config.version
            ))),
            Updated::Missing => Err(Status::not_found(format!(
                "handoff configuration {} not found",
                config.id
            ))),
        }
    }

    async fn delete_handoff_config(
        &self,
        request: Request<pb::DeleteHandoffConfigRequest>,
    ) -> Result<Response<pb::DeleteHandoffConfigResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        if !self
            .store
            .delete_handoff_config(&r.account_id, &r.handoff_config_id, Actor(&caller.sub))
            .await
            .map_err(store_status)?
        {
            return Err(Status::not_found(format!(
                "handoff configuration {} not found",
                r.handoff_config_id
            )));
        }
        Ok(Response::new(pb::DeleteHandoffConfigResponse {}))
    }

    async fn create_whats_app_template(
        &self,
        request: Request<pb::CreateWhatsAppTemplateRequest>,
    ) -> Result<Response<pb::CreateWhatsAppTemplateResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        self.existing_account(&r.account_id).await?;
        let Some(wire) = &r.template else {
            return Err(status::invalid_field("template", "required"));
        };
        let mut violations = FieldViolations::new();
        let template = Template::from_wire(&r.account_id, wire, &mut violations);
        violations.into_result()?;
        self.store
            .create_template(&template, Actor(&caller.sub))
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::CreateWhatsAppTemplateResponse {
            template: Some(template.to_wire()),
        }))
    }

    async fn list_whats_app_templates(
        &self,
        request: Request<pb::ListWhatsAppTemplatesRequest>,
    ) -> Result<Response<pb::ListWhatsAppTemplatesResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let limit = page_size(r.page_size);
        let templates = self
            .store
            .templates(&r.account_id, &after_token(&r.page_token)?, limit)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ListWhatsAppTemplatesResponse {
            next_page_token: next_token(
                templates.last().map(|t| t.id.as_str()),
                templates.len() as i64 == limit,
            ),
            templates: templates.iter().map(Template::to_wire).collect(),
        }))
    }

    async fn delete_whats_app_template(
        &self,
        request: Request<pb::DeleteWhatsAppTemplateRequest>,
    ) -> Result<Response<pb::DeleteWhatsAppTemplateResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        match self
            .store
            .delete_template(&r.account_id, &r.template_id, Actor(&caller.sub))
            .await
            .map_err(store_status)?
        {
            TemplateDeleted::Done => Ok(Response::new(pb::DeleteWhatsAppTemplateResponse {})),
            TemplateDeleted::Missing => Err(Status::not_found(format!(
                "template {} not found",
                r.template_id
            ))),
            TemplateDeleted::InUse(configs) => Err(Status::failed_precondition(format!(
                "template {} is used by handoff configuration(s) {}: change them first",
                r.template_id,
                configs.join(", ")
            ))),
        }
    }

    async fn update_whats_app_template_status(
        &self,
        request: Request<pb::UpdateWhatsAppTemplateStatusRequest>,
    ) -> Result<Response<pb::UpdateWhatsAppTemplateStatusResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        caller.require_internal()?;
        let r = request.into_inner();
        let status = pb::WhatsAppTemplateStatus::try_from(r.status)
            .ok()
            .filter(|s| *s != pb::WhatsAppTemplateStatus::Unspecified)
            .ok_or_else(|| status::invalid_field("status", "a template status is required"))?;
        let template = self
            .store
            .set_template_status(&r.account_id, &r.template_id, status, Actor(&caller.sub))
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("template {} not found", r.template_id)))?;
        Ok(Response::new(pb::UpdateWhatsAppTemplateStatusResponse {
            template: Some(template.to_wire()),
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Admin)?;
        let start = r
            .start_time
            .as_ref()
            .and_then(c2m_proto::from_timestamp)
            .unwrap_or(chrono::DateTime::UNIX_EPOCH);
        let end = r
            .end_time
            .as_ref()
            .and_then(c2m_proto::from_timestamp)
            .unwrap_or_else(|| Utc::now() + chrono::Duration::days(1));
        let after = match after_token(&r.page_token)?.as_str() {
            "" => 0,
            id => id.parse().map_err(|_| {
                status::invalid_field("page_token", "not a token this service gave out")
            })?,
        };
        let limit = page_size(r.page_size);
        let records = self
            .store
            .audit(&r.account_id, start, end, after, limit)
            .await
            .map_err(store_status)?;
        let json =
            |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        Ok(Response::new(pb::ListAuditEventsResponse {
            next_page_token: next_token(
                records.last().map(|e| e.id.to_string()).as_deref(),
                records.len() as i64 == limit,
            ),
            events: records
                .iter()
                .map(|e| pb::AuditEvent {
                    audit_event_id: e.id.to_string(),
                    account_id: e.account_id.clone(),
                    actor: e.actor.clone(),
                    action: e.action.clone(),
                    resource: e.resource.clone(),
                    before_json: json(&e.before),
                    after_json: json(&e.after),
                    at: Some(c2m_proto::timestamp(e.at)),
                })
                .collect(),
        }))
    }

    async fn watch_config(
        &self,
        request: Request<pb::WatchConfigRequest>,
    ) -> Result<Response<crate::watch::ChangeStream>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        Ok(Response::new(
            self.watch.subscribe(request.into_inner().account_id),
        ))
    }
}
