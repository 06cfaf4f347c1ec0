//! Accounts and their settings.

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn create_account(
    service: &Service,
    request: Request<pb::CreateAccountRequest>,
) -> Result<Response<pb::CreateAccountResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
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
    service
        .store
        .create_account(&account, Actor(&caller.sub))
        .await
        .map_err(store_status)?;
    tracing::info!(account_id = %account.id, "account created");
    Ok(Response::new(pb::CreateAccountResponse {
        account: Some(account.to_wire()),
    }))
}

pub(super) async fn get_account(
    service: &Service,
    request: Request<pb::GetAccountRequest>,
) -> Result<Response<pb::GetAccountResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    caller.authorize(&request.get_ref().account_id, Role::Viewer)?;
    let account = service
        .existing_account(&request.get_ref().account_id)
        .await?;
    Ok(Response::new(pb::GetAccountResponse {
        account: Some(account.to_wire()),
    }))
}

pub(super) async fn update_account_settings(
    service: &Service,
    request: Request<pb::UpdateAccountSettingsRequest>,
) -> Result<Response<pb::UpdateAccountSettingsResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    caller.authorize(&request.get_ref().account_id, Role::Admin)?;
    let request = request.into_inner();
    let mut violations = FieldViolations::new();
    let Some(wire) = &request.settings else {
        violations.add("settings", "required");
        return Err(violations.into_result().expect_err("one violation"));
    };
    let settings = Settings::from_wire(wire, "settings", &mut violations);
    violations.into_result()?;
    let account = service
        .store
        .update_settings(&request.account_id, &settings, Actor(&caller.sub))
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("account {} not found", request.account_id)))?;
    tracing::info!(account_id = %account.id, "account settings updated");
    Ok(Response::new(pb::UpdateAccountSettingsResponse {
        account: Some(account.to_wire()),
    }))
}
