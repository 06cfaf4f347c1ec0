//! ConversationService over REST, for desks and bot frameworks that speak HTTP only (a desk that
//! takes the account's webhooks answers through `…/messages`). The shared pieces, and the
//! OpenAPI document that lists these routes, are `c2m_runtime::rest`. The live stream stays
//! gRPC's WatchConversations; HTTP-only clients get events by webhook.
//!
//! - `GET /v1/accounts/{account_id}/conversations` — ListConversations (filters as query parameters)
//! - `GET /v1/accounts/{account_id}/conversations/{conversation_id}` — GetConversation
//! - `POST …/conversations/{conversation_id}/messages` — SendConversationMessage
//! - `POST …/conversations/{conversation_id}/assign`, `/release`, `/transfer`, `/close`
//! - `GET /v1/accounts/{account_id}/consent-changes` — ListConsentChanges

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::HeaderMap,
    response::Response,
    routing::{get, post},
};
use c2m_proto::v1::conversation_service_server::ConversationService;
use c2m_runtime::rest::{answer, error_response, grpc_request, parse_with, query_body};
use prost::Message;
use tonic::Status;

use crate::Service;

const CONVERSATION: &str = "/v1/accounts/{account_id}/conversations/{conversation_id}";

pub fn router(service: Service) -> Router {
    Router::new()
        .route("/v1/accounts/{account_id}/conversations", get(list))
        .route(CONVERSATION, get(get_one))
        .route(&format!("{CONVERSATION}/messages"), post(send))
        .route(&format!("{CONVERSATION}/assign"), post(assign))
        .route(&format!("{CONVERSATION}/release"), post(release))
        .route(&format!("{CONVERSATION}/transfer"), post(transfer))
        .route(&format!("{CONVERSATION}/close"), post(close))
        .route("/v1/accounts/{account_id}/consent-changes", get(consent))
        .with_state(service)
}

/// Parses the request (`Req`, named `request` in the descriptors) from `body` with the path's
/// ids, calls `rpc` with the HTTP caller's credentials, and answers in JSON.
async fn call<Req, Resp, Fut>(
    (request, response): (&str, &str),
    path: &[(&str, &str)],
    headers: &HeaderMap,
    body: &Bytes,
    rpc: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: Message + Default,
    Resp: Message,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    match parse_with::<Req>(request, path, body) {
        Ok(message) => answer(response, rpc(grpc_request(message, headers)).await),
        Err(status) => error_response(&status),
    }
}

async fn list(
    State(s): State<Service>,
    Path(account_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let body = match query_body(query.as_deref()) {
        Ok(body) => body,
        Err(status) => return error_response(&status),
    };
    let names = (
        "c2m.v1.ListConversationsRequest",
        "c2m.v1.ListConversationsResponse",
    );
    let path = [("account_id", account_id.as_str())];
    call(names, &path, &headers, &body, |r| s.list_conversations(r)).await
}

async fn get_one(
    State(s): State<Service>,
    Path((account_id, conversation_id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let names = (
        "c2m.v1.GetConversationRequest",
        "c2m.v1.GetConversationResponse",
    );
    let path = [
        ("account_id", account_id.as_str()),
        ("conversation_id", &conversation_id),
    ];
    call(names, &path, &headers, &Bytes::new(), |r| {
        s.get_conversation(r)
    })
    .await
}

async fn consent(
    State(s): State<Service>,
    Path(account_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let body = match query_body(query.as_deref()) {
        Ok(body) => body,
        Err(status) => return error_response(&status),
    };
    let names = (
        "c2m.v1.ListConsentChangesRequest",
        "c2m.v1.ListConsentChangesResponse",
    );
    let path = [("account_id", account_id.as_str())];
    call(names, &path, &headers, &body, |r| s.list_consent_changes(r)).await
}

/// A POST on one conversation: `rpc`'s request from the body, with the path's ids.
macro_rules! on_conversation {
    ($name:ident, $rpc:ident, $request:literal, $response:literal) => {
        async fn $name(
            State(s): State<Service>,
            Path((account_id, conversation_id)): Path<(String, String)>,
            headers: HeaderMap,
            body: Bytes,
        ) -> Response {
            let path = [
                ("account_id", account_id.as_str()),
                ("conversation_id", &conversation_id),
            ];
            call(($request, $response), &path, &headers, &body, |r| s.$rpc(r)).await
        }
    };
}

on_conversation!(
    send,
    send_conversation_message,
    "c2m.v1.SendConversationMessageRequest",
    "c2m.v1.SendConversationMessageResponse"
);
on_conversation!(
    assign,
    assign_conversation,
    "c2m.v1.AssignConversationRequest",
    "c2m.v1.AssignConversationResponse"
);
on_conversation!(
    release,
    release_conversation,
    "c2m.v1.ReleaseConversationRequest",
    "c2m.v1.ReleaseConversationResponse"
);
on_conversation!(
    transfer,
    transfer_conversation,
    "c2m.v1.TransferConversationRequest",
    "c2m.v1.TransferConversationResponse"
);
on_conversation!(
    close,
    close_conversation,
    "c2m.v1.CloseConversationRequest",
    "c2m.v1.CloseConversationResponse"
);
