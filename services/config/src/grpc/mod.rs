//! The `c2m.v1.ConfigService` RPCs: authorise, validate, store; one file per resource.

mod accounts;
mod audit;
mod configs;
mod keys;
mod templates;
mod webhooks;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_proto::v1::{self as pb, config_service_server::ConfigService};
use c2m_runtime::{
    auth::Role,
    ids,
    status::{self, FieldViolations},
};
use chrono::Utc;
use ring::digest;
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
    digest::digest(&digest::SHA256, plaintext.as_bytes())
        .as_ref()
        .to_vec()
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
        accounts::create_account(self, request).await
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::GetAccountResponse>, Status> {
        accounts::get_account(self, request).await
    }

    async fn update_account_settings(
        &self,
        request: Request<pb::UpdateAccountSettingsRequest>,
    ) -> Result<Response<pb::UpdateAccountSettingsResponse>, Status> {
        accounts::update_account_settings(self, request).await
    }

    async fn create_handoff_config(
        &self,
        request: Request<pb::CreateHandoffConfigRequest>,
    ) -> Result<Response<pb::CreateHandoffConfigResponse>, Status> {
        configs::create_handoff_config(self, request).await
    }

    async fn get_handoff_config(
        &self,
        request: Request<pb::GetHandoffConfigRequest>,
    ) -> Result<Response<pb::GetHandoffConfigResponse>, Status> {
        configs::get_handoff_config(self, request).await
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        keys::create_api_key(self, request).await
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        keys::list_api_keys(self, request).await
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        keys::revoke_api_key(self, request).await
    }

    async fn authenticate_api_key(
        &self,
        request: Request<pb::AuthenticateApiKeyRequest>,
    ) -> Result<Response<pb::AuthenticateApiKeyResponse>, Status> {
        keys::authenticate_api_key(self, request).await
    }

    async fn list_handoff_configs(
        &self,
        request: Request<pb::ListHandoffConfigsRequest>,
    ) -> Result<Response<pb::ListHandoffConfigsResponse>, Status> {
        configs::list_handoff_configs(self, request).await
    }

    async fn update_handoff_config(
        &self,
        request: Request<pb::UpdateHandoffConfigRequest>,
    ) -> Result<Response<pb::UpdateHandoffConfigResponse>, Status> {
        configs::update_handoff_config(self, request).await
    }

    async fn delete_handoff_config(
        &self,
        request: Request<pb::DeleteHandoffConfigRequest>,
    ) -> Result<Response<pb::DeleteHandoffConfigResponse>, Status> {
        configs::delete_handoff_config(self, request).await
    }

    async fn create_whats_app_template(
        &self,
        request: Request<pb::CreateWhatsAppTemplateRequest>,
    ) -> Result<Response<pb::CreateWhatsAppTemplateResponse>, Status> {
        templates::create_whats_app_template(self, request).await
    }

    async fn list_whats_app_templates(
        &self,
        request: Request<pb::ListWhatsAppTemplatesRequest>,
    ) -> Result<Response<pb::ListWhatsAppTemplatesResponse>, Status> {
        templates::list_whats_app_templates(self, request).await
    }

    async fn delete_whats_app_template(
        &self,
        request: Request<pb::DeleteWhatsAppTemplateRequest>,
    ) -> Result<Response<pb::DeleteWhatsAppTemplateResponse>, Status> {
        templates::delete_whats_app_template(self, request).await
    }

    async fn update_whats_app_template_status(
        &self,
        request: Request<pb::UpdateWhatsAppTemplateStatusRequest>,
    ) -> Result<Response<pb::UpdateWhatsAppTemplateStatusResponse>, Status> {
        templates::update_whats_app_template_status(self, request).await
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        audit::list_audit_events(self, request).await
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

    async fn get_whats_app_template(
        &self,
        request: Request<pb::GetWhatsAppTemplateRequest>,
    ) -> Result<Response<pb::GetWhatsAppTemplateResponse>, Status> {
        templates::get_whats_app_template(self, request).await
    }

    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        webhooks::create_webhook_endpoint(self, request).await
    }

    async fn get_webhook_endpoint(
        &self,
        request: Request<pb::GetWebhookEndpointRequest>,
    ) -> Result<Response<pb::GetWebhookEndpointResponse>, Status> {
        webhooks::get_webhook_endpoint(self, request).await
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        webhooks::list_webhook_endpoints(self, request).await
    }

    async fn update_webhook_endpoint(
        &self,
        request: Request<pb::UpdateWebhookEndpointRequest>,
    ) -> Result<Response<pb::UpdateWebhookEndpointResponse>, Status> {
        webhooks::update_webhook_endpoint(self, request).await
    }

    async fn delete_webhook_endpoint(
        &self,
        request: Request<pb::DeleteWebhookEndpointRequest>,
    ) -> Result<Response<pb::DeleteWebhookEndpointResponse>, Status> {
        webhooks::delete_webhook_endpoint(self, request).await
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        webhooks::rotate_webhook_secret(self, request).await
    }

    async fn send_test_webhook(
        &self,
        request: Request<pb::SendTestWebhookRequest>,
    ) -> Result<Response<pb::SendTestWebhookResponse>, Status> {
        webhooks::send_test_webhook(self, request).await
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        webhooks::list_webhook_deliveries(self, request).await
    }
}
