//! Webhook endpoints: admins create, change, rotate, test and delete them, and read what was
//! delivered. The secret is shown when it is made, never again.

use std::time::Duration;

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;
use crate::{
    model::WebhookEndpoint,
    webhooks::{self, post},
};

/// How long deliveries still carry the old secret's signature after a rotation.
const ROTATION_OVERLAP: Duration = Duration::from_secs(24 * 3600);

fn missing(id: &str) -> Status {
    Status::not_found(format!("webhook endpoint {id} not found"))
}

fn secret() -> Result<(Vec<u8>, String), Status> {
    post::new_secret().map_err(|_| Status::internal("no randomness available"))
}

pub(super) async fn create_webhook_endpoint(
    service: &Service,
    request: Request<pb::CreateWebhookEndpointRequest>,
) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let mut violations = FieldViolations::new();
    let wire = r.endpoint.unwrap_or_default();
    if !wire.webhook_endpoint_id.is_empty() {
        violations.add(
            "endpoint.webhook_endpoint_id",
            "made by c2m: leave it empty",
        );
    }
    let endpoint = WebhookEndpoint::from_wire(&wire, &r.account_id, "endpoint", &mut violations);
    violations.into_result()?;
    service.existing_account(&r.account_id).await?;
    let (bytes, shown) = secret()?;
    service
        .store
        .create_webhook_endpoint(&endpoint, &bytes, Actor(&caller.sub))
        .await
        .map_err(store_status)?;
    tracing::info!(account_id = %endpoint.account_id, webhook_endpoint_id = %endpoint.id, "webhook endpoint created");
    Ok(Response::new(pb::CreateWebhookEndpointResponse {
        endpoint: Some(endpoint.to_wire()),
        secret: shown,
    }))
}

pub(super) async fn get_webhook_endpoint(
    service: &Service,
    request: Request<pb::GetWebhookEndpointRequest>,
) -> Result<Response<pb::GetWebhookEndpointResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let endpoint = service
        .store
        .webhook_endpoint(&r.account_id, &r.webhook_endpoint_id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| missing(&r.webhook_endpoint_id))?;
    Ok(Response::new(pb::GetWebhookEndpointResponse {
        endpoint: Some(endpoint.to_wire()),
    }))
}

pub(super) async fn list_webhook_endpoints(
    service: &Service,
    request: Request<pb::ListWebhookEndpointsRequest>,
) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let endpoints = service
        .store
        .webhook_endpoints(&r.account_id)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::ListWebhookEndpointsResponse {
        endpoints: endpoints.iter().map(WebhookEndpoint::to_wire).collect(),
    }))
}

pub(super) async fn update_webhook_endpoint(
    service: &Service,
    request: Request<pb::UpdateWebhookEndpointRequest>,
) -> Result<Response<pb::UpdateWebhookEndpointResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let wire = r.endpoint.unwrap_or_default();
    let mut violations = FieldViolations::new();
    if wire.webhook_endpoint_id.is_empty() {
        violations.add("endpoint.webhook_endpoint_id", "required");
    }
    let endpoint = WebhookEndpoint::from_wire(&wire, &r.account_id, "endpoint", &mut violations);
    violations.into_result()?;
    let updated = service
        .store
        .update_webhook_endpoint(&endpoint, Actor(&caller.sub))
        .await
        .map_err(store_status)?
        .ok_or_else(|| missing(&endpoint.id))?;
    Ok(Response::new(pb::UpdateWebhookEndpointResponse {
        endpoint: Some(updated.to_wire()),
    }))
}

pub(super) async fn delete_webhook_endpoint(
    service: &Service,
    request: Request<pb::DeleteWebhookEndpointRequest>,
) -> Result<Response<pb::DeleteWebhookEndpointResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    if !service
        .store
        .delete_webhook_endpoint(&r.account_id, &r.webhook_endpoint_id, Actor(&caller.sub))
        .await
        .map_err(store_status)?
    {
        return Err(missing(&r.webhook_endpoint_id));
    }
    Ok(Response::new(pb::DeleteWebhookEndpointResponse {}))
}

pub(super) async fn rotate_webhook_secret(
    service: &Service,
    request: Request<pb::RotateWebhookSecretRequest>,
) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let (bytes, shown) = secret()?;
    if !service
        .store
        .rotate_webhook_secret(
            &r.account_id,
            &r.webhook_endpoint_id,
            &bytes,
            ROTATION_OVERLAP,
            Actor(&caller.sub),
        )
        .await
        .map_err(store_status)?
    {
        return Err(missing(&r.webhook_endpoint_id));
    }
    Ok(Response::new(pb::RotateWebhookSecretResponse {
        secret: shown,
    }))
}

pub(super) async fn send_test_webhook(
    service: &Service,
    request: Request<pb::SendTestWebhookRequest>,
) -> Result<Response<pb::SendTestWebhookResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let leased = service
        .store
        .webhook_for_test(&r.account_id, &r.webhook_endpoint_id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| missing(&r.webhook_endpoint_id))?;
    let mut secrets: Vec<&[u8]> = vec![&leased.secret];
    if let Some(previous) = &leased.previous_secret {
        secrets.push(previous);
    }
    let now = Utc::now();
    let body = webhooks::payload(
        "webhook.test",
        now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        serde_json::json!({ "webhookEndpointId": leased.endpoint.id, "accountId": r.account_id }),
    );
    let webhook_id = ids::generate("test");
    let delivery = post::post(
        service.webhooks.http(),
        &post::Message {
            endpoint_id: &leased.endpoint.id,
            url: &leased.endpoint.url,
            secrets,
            webhook_id: &webhook_id,
            event_type: "webhook.test",
            body: &body,
            attempt: 1,
        },
    )
    .await;
    service
        .store
        .record_webhook_delivery(&delivery)
        .await
        .map_err(store_status)?;
    Ok(Response::new(pb::SendTestWebhookResponse {
        delivery: Some(delivery.to_wire()),
    }))
}

pub(super) async fn list_webhook_deliveries(
    service: &Service,
    request: Request<pb::ListWebhookDeliveriesRequest>,
) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let before = match r.page_token.as_str() {
        "" => 0,
        token => token.parse::<i64>().map_err(|_| {
            status::invalid_field("page_token", "not a token this service gave out")
        })?,
    };
    // The endpoint must be the caller's account's.
    service
        .store
        .webhook_endpoint(&r.account_id, &r.webhook_endpoint_id)
        .await
        .map_err(store_status)?
        .ok_or_else(|| missing(&r.webhook_endpoint_id))?;
    let limit = page_size(r.page_size);
    let page = service
        .store
        .webhook_deliveries(&r.webhook_endpoint_id, before, limit)
        .await
        .map_err(store_status)?;
    let next_page_token = match page.last() {
        Some((id, _)) if page.len() as i64 == limit => id.to_string(),
        _ => String::new(),
    };
    Ok(Response::new(pb::ListWebhookDeliveriesResponse {
        deliveries: page.iter().map(|(_, d)| d.to_wire()).collect(),
        next_page_token,
    }))
}
