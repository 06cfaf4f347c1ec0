//! REST for IVRs that cannot speak gRPC (Twilio Studio's HTTP widget, Genesys data actions, an
//! Amazon Connect Lambda): the same RPCs, the same auth, JSON in the proto3 JSON mapping, served on
//! the gRPC port (the shared pieces are `c2m_runtime::rest`).
//!
//! - `POST /v1/accounts/{account_id}/handoffs` — CreateHandoff
//! - `POST /v1/accounts/{account_id}/eligibility` — CheckEligibility
//! - `GET /v1/accounts/{account_id}/handoffs/{handoff_id}` — GetHandoff
//! - `GET /v1/openapi.json` — the OpenAPI document

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    response::Response,
    routing::{get, post},
};
use c2m_proto::v1::{self as pb, handoff_service_server::HandoffService};
use c2m_runtime::rest::{answer, error_response, grpc_request, openapi_document, parse};

use crate::Service;

pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/accounts/{account_id}/handoffs", post(create_handoff))
        .route(
            "/v1/accounts/{account_id}/eligibility",
            post(check_eligibility),
        )
        .route(
            "/v1/accounts/{account_id}/handoffs/{handoff_id}",
            get(get_handoff),
        )
        .route("/v1/openapi.json", get(openapi_document))
        .with_state(service)
}

async fn create_handoff(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let message: pb::CreateHandoffRequest =
        match parse("c2m.v1.CreateHandoffRequest", &account_id, &body) {
            Ok(message) => message,
            Err(status) => return error_response(&status),
        };
    let result = service
        .create_handoff(grpc_request(message, &headers))
        .await;
    answer("c2m.v1.CreateHandoffResponse", result)
}

async fn check_eligibility(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let message: pb::CheckEligibilityRequest =
        match parse("c2m.v1.CheckEligibilityRequest", &account_id, &body) {
            Ok(message) => message,
            Err(status) => return error_response(&status),
        };
    let result = service
        .check_eligibility(grpc_request(message, &headers))
        .await;
    answer("c2m.v1.CheckEligibilityResponse", result)
}

async fn get_handoff(
    State(service): State<Service>,
    Path((account_id, handoff_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let message = pb::GetHandoffRequest {
        account_id,
        handoff_id,
    };
    let result = service.get_handoff(grpc_request(message, &headers)).await;
    answer("c2m.v1.GetHandoffResponse", result)
}
