//! IVR API keys: created once in plaintext, kept as hashes.

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn create_api_key(
    service: &Service,
    request: Request<pb::CreateApiKeyRequest>,
) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let request = request.into_inner();
    caller.authorize(&request.account_id, Role::Admin)?;
    let name = request.name.trim().to_owned();
    let mut violations = FieldViolations::new();
    if name.is_empty() || name.chars().count() > 100 {
        violations.add("name", "required, at most 100 characters");
    }
    let scopes = ApiKey::scopes_from_wire(&request.scopes, &mut violations);
    violations.into_result()?;
    service.existing_account(&request.account_id).await?;
    let plaintext = new_api_key()?;
    let key = ApiKey {
        id: ids::generate("key"),
        account_id: request.account_id,
        name,
        prefix: plaintext.chars().take(12).collect(),
        scopes,
        created_at: Utc::now(),
        last_used_at: None,
        revoked_at: None,
    };
    service
        .store
        .create_api_key(&key, &hash_key(&plaintext), Actor(&caller.sub))
        .await
        .map_err(store_status)?;
    tracing::info!(account_id = %key.account_id, api_key_id = %key.id, "api key created");
    Ok(Response::new(pb::CreateApiKeyResponse {
        api_key: Some(key.to_wire()),
        plaintext,
    }))
}

pub(super) async fn list_api_keys(
    service: &Service,
    request: Request<pb::ListApiKeysRequest>,
) -> Result<Response<pb::ListApiKeysResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    caller.authorize(&request.get_ref().account_id, Role::Admin)?;
    let keys = service
        .store
        .api_keys(&request.get_ref().account_id)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListApiKeysResponse {
        api_keys: keys.iter().map(ApiKey::to_wire).collect(),
    }))
}

pub(super) async fn revoke_api_key(
    service: &Service,
    request: Request<pb::RevokeApiKeyRequest>,
) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let request = request.into_inner();
    caller.authorize(&request.account_id, Role::Admin)?;
    if !service
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

pub(super) async fn authenticate_api_key(
    service: &Service,
    request: Request<pb::AuthenticateApiKeyRequest>,
) -> Result<Response<pb::AuthenticateApiKeyResponse>, Status> {
    service.key.caller(request.metadata())?.require_internal()?;
    let key = service
        .store
        .use_api_key(&hash_key(&request.get_ref().plaintext))
        .await
        .map_err(store_status)?
        // The caller (a c2m service) is authenticated; the key it asks about is unknown.
        .ok_or_else(|| Status::not_found("unknown or revoked api key"))?;
    Ok(Response::new(pb::AuthenticateApiKeyResponse {
        account_id: key.account_id,
        api_key_id: key.id,
        scopes: key.scopes.iter().map(|s| *s as i32).collect(),
        name: key.name,
    }))
}
