//! REST beside gRPC, for clients that can only make HTTP calls (IVRs' HTTP widgets, desks, bot
//! frameworks): the same RPCs with the same auth, bodies in the proto3 JSON mapping, served on
//! the gRPC port. These are the pieces every role's routes share; `openapi` documents them all.
//!
//! Errors are JSON `{"code", "status", "message", "details"}` with the gRPC code mapped to an HTTP
//! status (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, ABORTED
//! 409, RESOURCE_EXHAUSTED 429 with `Retry-After`, UNAVAILABLE 503, …).

pub mod openapi;

use std::sync::LazyLock;

use axum::{
    body::Bytes,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions, Value,
};
use tonic::{Code, metadata::MetadataValue};
use tonic_types::StatusExt;

/// The descriptors of every c2m message, for the JSON mapping.
pub static POOL: &LazyLock<DescriptorPool> = &c2m_proto::DESCRIPTORS;

pub fn descriptor(name: &str) -> MessageDescriptor {
    POOL.get_message_by_name(name)
        .unwrap_or_else(|| panic!("{name} is in the descriptor set"))
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
    // The reason a client can act on without parsing the message.
    if let Some(info) = parsed.error_info() {
        details.push(serde_json::json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
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
    crate::status::invalid_field("body", message)
}

/// Parses a proto3-JSON body into `T`, with `account_id` taken from the path.
pub fn parse<T: Message + Default>(
    name: &str,
    account_id: &str,
    body: &Bytes,
) -> Result<T, tonic::Status> {
    parse_with(name, &[("account_id", account_id)], body)
}

/// Parses a proto3-JSON body into `T`, with the fields named in `path` (e.g. `account_id`,
/// `conversation_id`) taken from the URL: a body that names another value is refused.
pub fn parse_with<T: Message + Default>(
    name: &str,
    path: &[(&str, &str)],
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
    for (field, value) in path {
        match message.get_field_by_name(field).as_deref() {
            Some(Value::String(given)) if !given.is_empty() && given != value => {
                return Err(crate::status::invalid_field(
                    *field,
                    "differs from the one in the path",
                ));
            }
            _ => message.set_field_by_name(field, Value::String((*value).to_owned())),
        }
    }
    T::decode(message.encode_to_vec().as_slice()).map_err(|e| invalid_json(e.to_string()))
}

/// A prost message as proto3 JSON.
pub fn json<T: Message>(name: &str, message: &T) -> Response {
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
pub fn grpc_request<T>(message: T, headers: &HeaderMap) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| MetadataValue::try_from(v.as_bytes()).ok())
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A query string as a proto3-JSON body (`?state=CONVERSATION_STATE_OPEN&pageSize=20`): every
/// value a string, which the JSON mapping accepts for numbers, enums and timestamps alike.
pub fn query_body(query: Option<&str>) -> Result<Bytes, tonic::Status> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|e| crate::status::invalid_field("query", format!("not a query string: {e}")))?;
    let mut object = serde_json::Map::new();
    for (key, value) in pairs {
        if object.insert(key.clone(), value.into()).is_some() {
            return Err(crate::status::invalid_field(key, "given twice"));
        }
    }
    Ok(Bytes::from(
        serde_json::to_vec(&object).expect("json values serialize"),
    ))
}

/// An answer as JSON, or the status as a JSON error.
pub fn answer<T: Message>(
    name: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
) -> Response {
    match result {
        Ok(answer) => json(name, answer.get_ref()),
        Err(status) => error_response(&status),
    }
}

/// The OpenAPI document, as served at `GET /v1/openapi.json`.
pub async fn openapi_document() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}
