//! Google RBM's webhook: the set-up handshake (`clientToken` and `secret`, answered with the
//! secret) and events signed with `X-Goog-Signature`. RBM signs the decoded `message.data`, not
//! the body: the envelope is read for that one string, the signature checked on its bytes, and
//! only then is the event itself parsed.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::{self as pb, Channel, FunnelStage, GoogleRbmCredentials, Provider};
use serde::Deserialize;

use super::{StatusReport, deliver_once, take_status, unavailable};
use crate::{Service, credentials, rbm, sandbox};

#[derive(Deserialize)]
struct Handshake {
    #[serde(rename = "clientToken")]
    client_token: String,
    secret: String,
}

#[derive(Deserialize)]
struct Envelope {
    message: PubSubMessage,
}

#[derive(Deserialize)]
struct PubSubMessage {
    data: String,
}

/// A user event, a user message or a server event: RBM's fields, all optional here.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Event {
    sender_phone_number: String,
    event_type: String,
    event_id: String,
    message_id: String,
    text: Option<String>,
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn refuse(status: StatusCode, why: &'static str) -> Response {
    (status, why).into_response()
}

pub(super) async fn events(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let credentials = match service
        .credentials::<GoogleRbmCredentials>(&account_id, Provider::GoogleRbm)
        .await
    {
        Ok(credentials) => credentials,
        Err(credentials::CredentialsError::Db(error)) => return unavailable(error),
        // The sandbox signs what it plays with a token derived for the account.
        Err(credentials::CredentialsError::Missing(_)) => {
            match service.has_sandbox(&account_id).await {
                Ok(true) => GoogleRbmCredentials {
                    client_token: sandbox::Player::Google
                        .secret(&service.settings.credentials_key, &account_id),
                    ..Default::default()
                },
                Ok(false) => return refuse(StatusCode::FORBIDDEN, "unknown account"),
                Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
            }
        }
        Err(_) => return refuse(StatusCode::FORBIDDEN, "unknown account"),
    };
    let Some(signature) = headers
        .get("x-goog-signature")
        .and_then(|v| v.to_str().ok())
    else {
        // Unsigned: only the set-up handshake, proven by the client token.
        return match serde_json::from_slice::<Handshake>(&body) {
            Ok(h) if same(&h.client_token, &credentials.client_token) => h.secret.into_response(),
            _ => refuse(StatusCode::FORBIDDEN, "unsigned and not a valid handshake"),
        };
    };
    let Ok(envelope) = serde_json::from_slice::<Envelope>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "not an RBM envelope");
    };
    let Ok(data) = STANDARD.decode(envelope.message.data.trim()) else {
        return refuse(StatusCode::BAD_REQUEST, "message.data is not base64");
    };
    if !rbm::verify(&credentials.client_token, &data, signature) {
        tracing::warn!(account_id, "webhook: bad rbm signature");
        return refuse(StatusCode::FORBIDDEN, "invalid signature");
    }
    let Ok(event) = serde_json::from_slice::<Event>(&data) else {
        return refuse(StatusCode::BAD_REQUEST, "message.data is not an RBM event");
    };
    let dedup_key = if event.event_id.is_empty() {
        format!("google:{}:{}", event.message_id, event.event_type)
    } else {
        format!("google:{}", event.event_id)
    };

    if let Some(text) = event.text.filter(|_| event.event_type.is_empty()) {
        let from = event.sender_phone_number;
        let provider_message_id = if event.message_id.is_empty() {
            event.event_id
        } else {
            event.message_id
        };
        let delivered = deliver_once(&service, &dedup_key, &body, || async {
            service
                .peers
                .routing()
                .route_inbound_message(pb::RouteInboundMessageRequest {
                    account_id: account_id.clone(),
                    consumer_address: from,
                    channel: Channel::Rcs as i32,
                    text,
                    provider_message_id,
                    received_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
                })
                .await
                .map(|_| ())
        })
        .await;
        return match delivered {
            Ok(()) => StatusCode::OK.into_response(),
            Err(retry) => retry,
        };
    }

    // DELIVERED and READ from the phone; the server's TTL_EXPIRATION_REVOKED means the message
    // was withdrawn undelivered: a cue to fall back. Anything else (IS_TYPING, …) is stored and
    // acknowledged.
    let (stage, error_code) = match event.event_type.as_str() {
        "DELIVERED" => (Some(FunnelStage::Delivered), None),
        "READ" => (Some(FunnelStage::Read), None),
        "TTL_EXPIRATION_REVOKED" => (Some(FunnelStage::Failed), Some("TTL_EXPIRATION_REVOKED")),
        _ => (None, None),
    };
    match take_status(
        &service,
        &dedup_key,
        &body,
        StatusReport {
            account_id: &account_id,
            channel: Channel::Rcs,
            provider_message_id: &event.message_id,
            // RBM's messageId is ours; only a report of the message itself confirms it.
            message_id: stage.map(|_| event.message_id.as_str()),
            stage,
            error_code,
            source: "GOOGLE_RBM",
        },
    )
    .await
    {
        Ok(events) => {
            if events > 0 {
                service.relay.wake();
            }
            StatusCode::OK.into_response()
        }
        Err(error) => unavailable(error),
    }
}
