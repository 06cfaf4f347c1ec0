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
//! - `GET /v1/accounts/{account_id}/consent-changes.csv` — all of them as one CSV file (the same
//!   filters), oldest first, for the brand's records

use axum::{
    Router,
    body::Bytes,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use c2m_proto::v1::{self as pb, conversation_service_server::ConversationService};
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
        .route(
            "/v1/accounts/{account_id}/consent-changes.csv",
            get(consent_csv),
        )
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

/// A GET whose request is the query string, on `account_id`.
async fn on_query<Req, Resp, Fut>(
    names: (&str, &str),
    account_id: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    rpc: impl FnOnce(tonic::Request<Req>) -> Fut,
) -> Response
where
    Req: Message + Default,
    Resp: Message,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    match query_body(query) {
        Ok(body) => call(names, &[("account_id", account_id)], headers, &body, rpc).await,
        Err(status) => error_response(&status),
    }
}

async fn list(
    State(s): State<Service>,
    Path(account_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let names = (
        "c2m.v1.ListConversationsRequest",
        "c2m.v1.ListConversationsResponse",
    );
    on_query(names, &account_id, query.as_deref(), &headers, |r| {
        s.list_conversations(r)
    })
    .await
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
    let names = (
        "c2m.v1.ListConsentChangesRequest",
        "c2m.v1.ListConsentChangesResponse",
    );
    on_query(names, &account_id, query.as_deref(), &headers, |r| {
        s.list_consent_changes(r)
    })
    .await
}

/// Rows read from the log per statement while exporting.
const EXPORT_PAGE: i64 = 1000;

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

async fn consent_csv(
    State(s): State<Service>,
    Path(account_id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let filters = query_body(query.as_deref()).and_then(|body| {
        parse_with::<pb::ListConsentChangesRequest>(
            "c2m.v1.ListConsentChangesRequest",
            &[("account_id", account_id.as_str())],
            &body,
        )
    });
    let filters = match filters {
        Ok(filters) if filters.page_size != 0 || !filters.page_token.is_empty() => {
            return error_response(&c2m_runtime::status::invalid_field(
                "page_size",
                "the export has every change: no paging",
            ));
        }
        Ok(filters) => filters,
        Err(status) => return error_response(&status),
    };
    let request = grpc_request((), &headers);
    if let Err(status) = s.access(request.metadata(), &account_id).await {
        return error_response(&status);
    }
    let consumer = Some(filters.consumer_phone.as_str()).filter(|p| !p.is_empty());
    let channel = pb::Channel::try_from(filters.channel)
        .ok()
        .filter(|c| *c != pb::Channel::Unspecified);
    let mut csv = String::from("consumer_phone,channel,opted_in,source,at\n");
    let mut after = 0;
    loop {
        let page = match s
            .store
            .consent_changes(&account_id, consumer, channel, after, EXPORT_PAGE)
            .await
        {
            Ok(page) => page,
            Err(error) => {
                return error_response(&c2m_storage::postgres::db_status("routing", error));
            }
        };
        for (id, change) in &page {
            after = *id;
            let at = change
                .at
                .as_ref()
                .and_then(c2m_proto::from_timestamp)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                .unwrap_or_default();
            let channel = pb::Channel::try_from(change.channel).unwrap_or_default();
            csv.push_str(&format!(
                "{},{},{},{},{}\n",
                csv_field(&change.consumer_phone),
                channel.as_str_name(),
                change.opted_in,
                csv_field(&change.source),
                at
            ));
        }
        if (page.len() as i64) < EXPORT_PAGE {
            break;
        }
    }
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"consent-changes.csv\"",
            ),
        ],
        csv,
    )
        .into_response()
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
