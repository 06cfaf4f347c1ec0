//! Meta's webhooks: the subscription handshake and events verified by `X-Hub-Signature-256`.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use c2m_proto::v1::{self as pb, Channel, MetaWhatsAppCredentials, Provider};
use tonic::Code;

use super::{StatusReport, deliver_once, take_status, unavailable};
use crate::{Service, credentials, meta, sandbox};

async fn meta_credentials(
    service: &Service,
    account_id: &str,
) -> Result<MetaWhatsAppCredentials, Response> {
    match service
        .credentials::<MetaWhatsAppCredentials>(account_id, Provider::MetaWhatsapp)
        .await
    {
        Ok(credentials) => Ok(credentials),
        Err(credentials::CredentialsError::Db(error)) => Err(unavailable(error)),
        // The sandbox signs what it plays with a secret derived for the account.
        Err(credentials::CredentialsError::Missing(_)) => {
            match service.has_sandbox(account_id).await {
                Ok(true) => {
                    let secret =
                        sandbox::Player::Meta.secret(&service.settings.credentials_key, account_id);
                    Ok(MetaWhatsAppCredentials {
                        phone_number_id: "sandbox".into(),
                        access_token: String::new(),
                        app_secret: secret.clone(),
                        verify_token: secret,
                    })
                }
                Ok(false) => Err((StatusCode::FORBIDDEN, "unknown account").into_response()),
                Err(_) => Err(StatusCode::SERVICE_UNAVAILABLE.into_response()),
            }
        }
        Err(_) => Err((StatusCode::FORBIDDEN, "unknown account").into_response()),
    }
}

/// Meta's subscription handshake: echo `hub.challenge` when `hub.verify_token` is the account's.
pub(super) async fn verify(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Response {
    let credentials = match meta_credentials(&service, &account_id).await {
        Ok(credentials) => credentials,
        Err(refusal) => return refusal,
    };
    let query: Vec<(String, String)> =
        serde_urlencoded::from_str(uri.query().unwrap_or_default()).unwrap_or_default();
    let get = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let token_ok = get("hub.verify_token").is_some_and(|t| {
        t.len() == credentials.verify_token.len()
            && t.bytes()
                .zip(credentials.verify_token.bytes())
                .fold(0, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    match (get("hub.mode"), get("hub.challenge")) {
        (Some("subscribe"), Some(challenge)) if token_ok => challenge.to_owned().into_response(),
        _ => (StatusCode::FORBIDDEN, "verification refused").into_response(),
    }
}

/// Meta's events: message statuses move messages forward; text messages are routed.
pub(super) async fn events(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let credentials = match meta_credentials(&service, &account_id).await {
        Ok(credentials) => credentials,
        Err(refusal) => return refusal,
    };
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !meta::verify(&credentials.app_secret, &body, signature) {
        tracing::warn!(account_id, "webhook: bad meta signature");
        return (StatusCode::FORBIDDEN, "invalid signature").into_response();
    }
    let envelope: meta::Envelope = match serde_json::from_slice(&body) {
        Ok(envelope) => envelope,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a webhook envelope: {error}"),
            )
                .into_response();
        }
    };
    if envelope.object != "whatsapp_business_account" {
        return StatusCode::OK.into_response();
    }
    for change in envelope.entry.iter().flat_map(|e| &e.changes) {
        if let Some(update) = change.template_update() {
            let Some(status) = update.status() else {
                continue;
            };
            let recorded = service
                .peers
                .config()
                .update_whats_app_template_status(pb::UpdateWhatsAppTemplateStatusRequest {
                    account_id: account_id.clone(),
                    template_id: String::new(),
                    status: status as i32,
                    name: update.message_template_name.clone(),
                    language: update.message_template_language.clone(),
                })
                .await;
            match recorded {
                Ok(_) => {
                    tracing::info!(account_id, template = %update.message_template_name, event = %update.event, "template status from meta")
                }
                Err(status) if status.code() == Code::NotFound => {
                    tracing::info!(account_id, template = %update.message_template_name, "meta reviewed a template c2m does not know")
                }
                Err(status) => {
                    tracing::warn!(account_id, %status, "template status not recorded, meta will retry");
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            }
            continue;
        }
        let value = change.messages();
        for status in &value.statuses {
            let dedup_key = format!("meta:status:{}:{}", status.id, status.status);
            let code = status.errors.first().map(|e| e.code.to_string());
            let result = take_status(
                &service,
                &dedup_key,
                &body,
                StatusReport {
                    account_id: &account_id,
                    channel: Channel::Whatsapp,
                    provider_message_id: &status.id,
                    message_id: status.biz_opaque_callback_data.as_deref(),
                    stage: meta::stage(&status.status),
                    error_code: code.as_deref(),
                    source: "META",
                },
            )
            .await;
            match result {
                Ok(events) if events > 0 => service.relay.wake(),
                Ok(_) => {}
                Err(error) => return unavailable(error),
            }
        }
        for message in &value.messages {
            let dedup_key = format!("meta:inbound:{}", message.id);
            let from = format!("+{}", message.from.trim_start_matches('+'));
            // The consumer wrote: free-form text may answer for 24 hours.
            if let Err(error) = service
                .store
                .inbound(&account_id, &from, message.sent_at())
                .await
            {
                return unavailable(error);
            }
            let text = message
                .text
                .as_ref()
                .map(|t| t.body.clone())
                .unwrap_or_default();
            let delivered = deliver_once(&service, &dedup_key, &body, || async {
                service
                    .peers
                    .routing()
                    .route_inbound_message(pb::RouteInboundMessageRequest {
                        account_id: account_id.clone(),
                        consumer_address: from.clone(),
                        channel: Channel::Whatsapp as i32,
                        text,
                        provider_message_id: message.id.clone(),
                        received_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
                    })
                    .await
                    .map(|_| ())
            })
            .await;
            if let Err(retry) = delivered {
                return retry;
            }
        }
    }
    StatusCode::OK.into_response()
}
