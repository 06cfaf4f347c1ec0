//! Handoff configurations.

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn create_handoff_config(
    service: &Service,
    request: Request<pb::CreateHandoffConfigRequest>,
) -> Result<Response<pb::CreateHandoffConfigResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    caller.authorize(&request.get_ref().account_id, Role::Editor)?;
    let request = request.into_inner();
    let account = service.existing_account(&request.account_id).await?;
    let mut violations = FieldViolations::new();
    let Some(wire) = &request.config else {
        violations.add("config", "required");
        return Err(violations.into_result().expect_err("one violation"));
    };
    let config = HandoffConfig::from_wire(&account, wire, &mut violations);
    service.check_template(&config, &mut violations).await?;
    violations.into_result()?;
    service
        .store
        .create_handoff_config(&config, Actor(&caller.sub))
        .await
        .map_err(store_status)?;
    tracing::info!(account_id = %config.account_id, handoff_config_id = %config.id, "handoff configuration created");
    Ok(Response::new(pb::CreateHandoffConfigResponse {
        config: Some(config.to_wire()),
    }))
}

pub(super) async fn get_handoff_config(
    service: &Service,
    request: Request<pb::GetHandoffConfigRequest>,
) -> Result<Response<pb::GetHandoffConfigResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let request = request.into_inner();
    caller.authorize(&request.account_id, Role::Viewer)?;
    let config = service
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

pub(super) async fn list_handoff_configs(
    service: &Service,
    request: Request<pb::ListHandoffConfigsRequest>,
) -> Result<Response<pb::ListHandoffConfigsResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Viewer)?;
    let limit = page_size(r.page_size);
    let channel = match pb::Channel::try_from(r.channel) {
        Ok(pb::Channel::Unspecified) => None,
        Ok(channel) => Some(channel),
        Err(_) => return Err(status::invalid_field("channel", "not a channel")),
    };
    let skill = Some(r.skill_id.as_str()).filter(|s| !s.is_empty());
    let configs = service
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

pub(super) async fn update_handoff_config(
    service: &Service,
    request: Request<pb::UpdateHandoffConfigRequest>,
) -> Result<Response<pb::UpdateHandoffConfigResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Editor)?;
    let account = service.existing_account(&r.account_id).await?;
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
    service.check_template(&config, &mut violations).await?;
    violations.into_result()?;
    match service
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

pub(super) async fn delete_handoff_config(
    service: &Service,
    request: Request<pb::DeleteHandoffConfigRequest>,
) -> Result<Response<pb::DeleteHandoffConfigResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Editor)?;
    if !service
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
