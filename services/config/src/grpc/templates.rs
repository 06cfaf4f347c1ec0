//! WhatsApp templates.

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn create_whats_app_template(
    service: &Service,
    request: Request<pb::CreateWhatsAppTemplateRequest>,
) -> Result<Response<pb::CreateWhatsAppTemplateResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Editor)?;
    service.existing_account(&r.account_id).await?;
    let Some(wire) = &r.template else {
        return Err(status::invalid_field("template", "required"));
    };
    let mut violations = FieldViolations::new();
    let template = Template::from_wire(&r.account_id, wire, &mut violations);
    violations.into_result()?;
    service
        .store
        .create_template(&template, Actor(&caller.sub))
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::CreateWhatsAppTemplateResponse {
        template: Some(template.to_wire()),
    }))
}

pub(super) async fn list_whats_app_templates(
    service: &Service,
    request: Request<pb::ListWhatsAppTemplatesRequest>,
) -> Result<Response<pb::ListWhatsAppTemplatesResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Viewer)?;
    let limit = page_size(r.page_size);
    let templates = service
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

pub(super) async fn delete_whats_app_template(
    service: &Service,
    request: Request<pb::DeleteWhatsAppTemplateRequest>,
) -> Result<Response<pb::DeleteWhatsAppTemplateResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Editor)?;
    match service
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

pub(super) async fn update_whats_app_template_status(
    service: &Service,
    request: Request<pb::UpdateWhatsAppTemplateStatusRequest>,
) -> Result<Response<pb::UpdateWhatsAppTemplateStatusResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    caller.require_internal()?;
    let r = request.into_inner();
    let status = pb::WhatsAppTemplateStatus::try_from(r.status)
        .ok()
        .filter(|s| *s != pb::WhatsAppTemplateStatus::Unspecified)
        .ok_or_else(|| status::invalid_field("status", "a template status is required"))?;
    let template_id = if r.template_id.is_empty() {
        service
            .store
            .template_named(&r.account_id, &r.name, &r.language)
            .await
            .map_err(store_status)?
            .map(|t| t.id)
            .ok_or_else(|| Status::not_found(format!("no template {} in {}", r.name, r.language)))?
    } else {
        r.template_id.clone()
    };
    let template = service
        .store
        .set_template_status(&r.account_id, &template_id, status, Actor(&caller.sub))
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("template {} not found", r.template_id)))?;
    Ok(Response::new(pb::UpdateWhatsAppTemplateStatusResponse {
        template: Some(template.to_wire()),
    }))
}

pub(super) async fn get_whats_app_template(
    service: &Service,
    request: Request<pb::GetWhatsAppTemplateRequest>,
) -> Result<Response<pb::GetWhatsAppTemplateResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Viewer)?;
    let template = service
        .store
        .template(&r.account_id, &r.template_id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("template {} not found", r.template_id)))?;
    Ok(Response::new(pb::GetWhatsAppTemplateResponse {
        template: Some(template.to_wire()),
    }))
}
