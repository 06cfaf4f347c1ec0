//! REST for IVRs that cannot speak gRPC (Twilio Studio's HTTP widget, Genesys data actions, an
//! Amazon Connect Lambda): the same RPCs, the same auth, JSON in the proto3 JSON mapping, served on
//! the gRPC port.
//!
//! - `POST /v1/accounts/{account_id}/handoffs` — CreateHandoff
//! - `POST /v1/accounts/{account_id}/eligibility` — CheckEligibility
//! - `GET /v1/accounts/{account_id}/handoffs/{handoff_id}` — GetHandoff
//! - `GET /v1/openapi.json` — the OpenAPI document
//!
//! Errors are JSON `{"code", "status", "message", "details"}` with the gRPC code mapped to an HTTP
//! status (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ABORTED
//! 409, RESOURCE_EXHAUSTED 429 with `Retry-After`, UNAVAILABLE 503, …).

use std::sync::LazyLock;

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use c2m_proto::v1::{self as pb, handoff_service_server::HandoffService};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions, Value,
};
use tonic::{Code, metadata::MetadataValue};
use tonic_types::StatusExt;

use crate::Service;

/// The descriptors of every c2m message, for the JSON mapping.
pub(crate) static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(c2m_proto::FILE_DESCRIPTOR_SET)
        .expect("the build embeds a valid descriptor set")
});

fn descriptor(name: &str) -> MessageDescriptor {
    POOL.get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is in the descriptor set"))
}

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
        .route("/v1/openapi.json", get(openapi))
        .with_state(service)
}

/// The HTTP status for a gRPC code (as Google's API gateways map them).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> String {
    // `InvalidArgument` → `INVALID_ARGUMENT`
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// A gRPC status as a JSON error response, with its details.
pub fn error_response(status: &tonic::Status) -> Response {
    let mut details = Vec::new();
    let parsed = status.get_error_details();
    if let Some(bad) = parsed.bad_request() {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": bad.field_violations.iter().map(|v| serde_json::json!({
                "field": v.field,
                "description": v.description,
            })).collect::<Vec<_>>(),
        }));
    }
    let retry = parsed.retry_info().and_then(|r| r.retry_delay);
    if let Some(delay) = retry {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": format!("{:.3}s", delay.as_secs_f64()),
        }));
    }
    let body = serde_json::json!({
        "code": status.code() as i32,
        "status": code_name(status.code()),
        "message": status.message(),
        "details": details,
    });
    let mut response = (http_status(status.code()), axum::Json(body)).into_response();
    if let Some(delay) = retry {
        let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        if let Ok(value) = HeaderValue::from_str(&seconds.max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

fn invalid_json(message: String) -> tonic::Status {
    c2m_runtime::status::invalid_field("body", message)
}

/// Parses a proto3-JSON body into `T`, with `account_id` taken from the path.
fn parse<T: Message + Default>(
    name: &str,
    account_id: &str,
    body: &Bytes,
) -> Result<T, tonic::Status> {
    let descriptor = descriptor(name);
    let body: &[u8] = if body.is_empty() { b"{}" } else { body };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let mut message = DynamicMessage::deserialize_with_options(
        descriptor,
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| invalid_json(format!("not a valid {name} in JSON: {e}")))?;
    deserializer
        .end()
        .map_err(|e| invalid_json(format!("trailing characters after the JSON object: {e}")))?;
    match message.get_field_by_name("account_id").as_deref() {
        Some(Value::String(given)) if !given.is_empty() && given != account_id => {
            return Err(c2m_runtime::status::invalid_field(
                "account_id",
                "differs from the account in the path",
            ));
        }
        _ => message.set_field_by_name("account_id", Value::String(account_id.to_owned())),
    }
    T::decode(message.encode_to_vec().as_slice()).map_err(|e| invalid_json(e.to_string()))
}

/// A prost message as proto3 JSON.
fn json<T: Message>(name: &str, message: &T) -> Response {
    match DynamicMessage::decode(descriptor(name), message.encode_to_vec().as_slice()) {
        Ok(dynamic) => {
            let mut out = Vec::new();
            let mut serializer = serde_json::Serializer::new(&mut out);
            match dynamic.serialize_with_options(&mut serializer, &SerializeOptions::new()) {
                Ok(()) => ([(header::CONTENT_TYPE, "application/json")], out).into_response(),
                Err(e) => error_response(&tonic::Status::internal(format!(
                    "cannot encode the answer: {e}"
                ))),
            }
        }
        Err(e) => error_response(&tonic::Status::internal(format!(
            "cannot encode the answer: {e}"
        ))),
    }
}

/// A gRPC request carrying the HTTP caller's credentials.
fn grpc_request<T>(message: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
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
    match service
        .create_handoff(grpc_request(message, &headers))
        .await
    {
        Ok(answer) => json("c2m.v1.CreateHandoffResponse", answer.get_ref()),
        Err(status) => error_response(&status),
    }
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
    match service
        .check_eligibility(grpc_request(message, &headers))
        .await
    {
        Ok(answer) => json("c2m.v1.CheckEligibilityResponse", answer.get_ref()),
        Err(status) => error_response(&status),
    }
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
    match service.get_handoff(grpc_request(message, &headers)).await {
        Ok(answer) => json("c2m.v1.GetHandoffResponse", answer.get_ref()),
        Err(status) => error_response(&status),
    }
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}
