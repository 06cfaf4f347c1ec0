//! The `c2m.v1.ConfigService` RPCs: authorise, validate, store.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_proto::v1::{self as pb, config_service_server::ConfigService};
use c2m_runtime::{auth::Role, ids, status::FieldViolations};
use chrono::Utc;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    Service,
    model::{Account, ApiKey, HandoffConfig, Settings},
    store::StoreError,
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

impl Service {
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
        self.key.caller(request.metadata())?.require_operator()?;
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
            .create_account(&account)
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
            .update_settings(&request.account_id, &settings)
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
        violations.into_result()?;
        self.store
            .create_handoff_config(&config)
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
            return Err(c2m_runtime::status::invalid_field(
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
            .create_api_key(&key, &hash_key(&plaintext))
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
            .revoke_api_key(&request.account_id, &request.api_key_id)
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
            .ok_or_else(|| Status::unauthenticated("unknown or revoked api key"))?;
        Ok(Response::new(pb::AuthenticateApiKeyResponse {
            account_id: key.account_id,
            api_key_id: key.id,
        }))
    }
}
