//! Provider webhooks on an HTTP listener of their own (the one port to expose publicly). Every
//! request is verified against the provider's signature before anything else is done with it,
//! stored in the inbox before it is acknowledged, and processed once however often it is retried.

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use c2m_proto::v1::{self as pb, Channel, MetaWhatsAppCredentials, Provider};
use c2m_runtime::mask_phone;
use tonic::Code;

use crate::{Service, credentials, messages, meta, twilio};

/// Twilio wants TwiML back from an inbound-message webhook; an empty response sends no reply.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

pub fn router(service: Service) -> Router {
    Router::new()
        .route("/webhooks/twilio/{account_id}/status", post(twilio_status))
        .route(
            "/webhooks/twilio/{account_id}/inbound",
            post(twilio_inbound),
        )
        .route(
            "/webhooks/meta/{account_id}",
            get(meta_verify).post(meta_events),
        )
        .with_state(service)
}

/// The standard opt-out keywords (Twilio's defaults), in any case, alone in the message.
pub(crate) fn is_opt_out(body: &str) -> bool {
    const KEYWORDS: [&str; 8] = [
        "STOP",
        "STOPALL",
        "UNSUBSCRIBE",
        "CANCEL",
        "END",
        "QUIT",
        "REVOKE",
        "OPTOUT",
    ];
    let word = body
        .trim()
        .trim_end_matches(['.', '!'])
        .to_ascii_uppercase();
    KEYWORDS.contains(&word.as_str())
}

fn twiml() -> Response {
    ([(header::CONTENT_TYPE, "text/xml")], EMPTY_TWIML).into_response()
}

/// A verified Twilio form: its parameters, or the response that refuses it.
async fn verified_twilio_form(
    service: &Service,
    account_id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<(String, String)>, Response> {
    let forbidden = || (StatusCode::FORBIDDEN, "invalid signature").into_response();
    let Some(presented) = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return Err(forbidden());
    };
    // Twilio's auth token signs Twilio's webhooks; the sandbox's derived one signs the sandbox's.
    let auth_token = match service
        .credentials::<c2m_proto::v1::TwilioCredentials>(account_id, Provider::Twilio)
        .await
    {
        Ok(credentials) => credentials.auth_token,
        Err(credentials::CredentialsError::Db(error)) => {
            tracing::warn!(%error, "webhook: credentials unavailable");
            return Err(StatusCode::SERVICE_UNAVAILABLE.into_response());
        }
        Err(credentials::CredentialsError::Missing(_)) => match service
            .credentials::<c2m_proto::v1::SandboxCredentials>(account_id, Provider::Sandbox)
            .await
        {
            Ok(_) => crate::sandbox::auth_token(&service.settings.credentials_key, account_id),
            Err(_) => return Err(forbidden()),
        },
        // Unknown account or no Twilio set up: nothing can verify it.
        Err(_) => return Err(forbidden()),
    };
    let Ok(params) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) else {
        return Err(forbidden());
    };
    // Twilio signs the URL it called: our public URL, this path and its query.
    let path_and_query = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let url = format!(
        "{}{path_and_query}",
        service.settings.public_url.trim_end_matches('/')
    );
    if !twilio::verify(&auth_token, &url, &params, presented) {
        tracing::warn!(account_id, "webhook: bad twilio signature");
        return Err(forbidden());
    }
    Ok(params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Stores a verified delivery in the inbox. `Ok(false)`: already processed, acknowledge again.
async fn store(
    tx: &mut sqlx::PgConnection,
    dedup_key: &str,
    body: &Bytes,
) -> Result<bool, sqlx::Error> {
    let provider = dedup_key.split(':').next().unwrap_or_default();
    sqlx::query(
        "INSERT INTO webhook_inbox (provider, dedup_key, body) VALUES ($3, $1, $2) \
         ON CONFLICT (dedup_key) DO NOTHING",
    )
    .bind(dedup_key)
    .bind(body.as_ref())
    .bind(provider)
    .execute(&mut *tx)
    .await?;
    let processed: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT processed_at FROM webhook_inbox WHERE dedup_key = $1 FOR UPDATE",
    )
    .bind(dedup_key)
    .fetch_one(&mut *tx)
    .await?;
    Ok(processed.is_none())
}

async fn mark_processed(tx: &mut sqlx::PgConnection, dedup_key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE webhook_inbox SET processed_at = now() WHERE dedup_key = $1")
        .bind(dedup_key)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn unavailable(error: sqlx::Error) -> Response {
    tracing::warn!(%error, "webhook: storage unavailable");
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// Twilio's status callback: the message moves forward; reporting hears of each stage once.
async fn twilio_status(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match verified_twilio_form(&service, &account_id, &uri, &headers, &body).await {
        Ok(params) => params,
        Err(refusal) => return refusal,
    };
    let sid = param(&params, "MessageSid");
    let status = param(&params, "MessageStatus");
    if sid.is_empty() || status.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            "MessageSid and MessageStatus are required",
        )
            .into_response();
    }
    let dedup_key = format!("twilio:status:{sid}:{status}");
    let result: Result<usize, sqlx::Error> = async {
        let mut tx = service.db.pool().begin().await?;
        let mut events = 0;
        if store(&mut tx, &dedup_key, &body).await? {
            if let Some(stage) = twilio::stage(status) {
                let error_code = Some(param(&params, "ErrorCode")).filter(|c| !c.is_empty());
                events = messages::advance(
                    &mut tx,
                    &account_id,
                    Channel::Sms,
                    sid,
                    stage,
                    error_code,
                    "TWILIO",
                )
                .await?;
            }
            mark_processed(&mut tx, &dedup_key).await?;
        }
        tx.commit().await?;
        Ok(events)
    }
    .await;
    match result {
        Ok(events) => {
            if events > 0 {
                service.relay.wake();
            }
            tracing::debug!(
                account_id,
                message_sid = sid,
                status,
                events,
                "twilio status"
            );
            StatusCode::OK.into_response()
        }
        Err(error) => unavailable(error),
    }
}

/// A consumer's SMS: routed to the conversation (opening it from the deflection on the first
/// reply). Answered with empty TwiML; 503 while routing is unavailable, so Twilio retries.
async fn twilio_inbound(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = match verified_twilio_form(&service, &account_id, &uri, &headers, &body).await {
        Ok(params) => params,
        Err(refusal) => return refusal,
    };
    let sid = param(&params, "MessageSid");
    let from = param(&params, "From");
    if sid.is_empty() || from.is_empty() {
        return (StatusCode::BAD_REQUEST, "MessageSid and From are required").into_response();
    }
    let dedup_key = format!("twilio:inbound:{sid}");
    let fresh = async {
        let mut tx = service.db.pool().begin().await?;
        let fresh = store(&mut tx, &dedup_key, &body).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(fresh)
    }
    .await;
    match fresh {
        Ok(false) => return twiml(),
        Ok(true) => {}
        Err(error) => return unavailable(error),
    }
    let body_text = param(&params, "Body");
    let routed = if is_opt_out(body_text) {
        // STOP and its kin: the consumer is not to be messaged here again.
        service
            .peers
            .routing()
            .record_opt_out(pb::RecordOptOutRequest {
                account_id: account_id.clone(),
                consumer_phone: from.to_owned(),
                channel: Channel::Sms as i32,
                source: format!("keyword:{}", body_text.trim().to_ascii_uppercase()),
            })
            .await
            .map(|_| ())
    } else {
        service
            .peers
            .routing()
            .route_inbound_message(pb::RouteInboundMessageRequest {
                account_id: account_id.clone(),
                consumer_address: from.to_owned(),
                channel: Channel::Sms as i32,
                text: param(&params, "Body").to_owned(),
                provider_message_id: sid.to_owned(),
                received_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
            })
            .await
            .map(|_| ())
    };
    match routed {
        Ok(_) => {}
        // Nothing to route it to: final, acknowledge it.
        Err(status) if status.code() == Code::FailedPrecondition => {
            tracing::info!(account_id, consumer = %mask_phone(from), reason = status.message(), "inbound message not routed");
        }
        Err(status) => {
            tracing::warn!(account_id, %status, "inbound message: routing unavailable, twilio will retry");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let marked = async {
        let mut tx = service.db.pool().begin().await?;
        mark_processed(&mut tx, &dedup_key).await?;
        tx.commit().await
    }
    .await;
    if let Err(error) = marked {
        // Routing de-duplicates by message sid, so a retry after this is harmless.
        tracing::warn!(%error, "inbound message routed but not marked processed");
    }
    twiml()
}

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
        Err(_) => Err((StatusCode::FORBIDDEN, "unknown account").into_response()),
    }
}

/// Meta's subscription handshake: echo `hub.challenge` when `hub.verify_token` is the account's.
async fn meta_verify(
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
async fn meta_events(
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
            let result: Result<usize, sqlx::Error> = async {
                let mut tx = service.db.pool().begin().await?;
                let mut events = 0;
                if store(&mut tx, &dedup_key, &body).await? {
                    if let Some(stage) = meta::stage(&status.status) {
                        let code = status.errors.first().map(|e| e.code.to_string());
                        events = messages::advance(
                            &mut tx,
                            &account_id,
                            Channel::Whatsapp,
                            &status.id,
                            stage,
                            code.as_deref(),
                            "META",
                        )
                        .await?;
                    }
                    mark_processed(&mut tx, &dedup_key).await?;
                }
                tx.commit().await?;
                Ok(events)
            }
            .await;
            match result {
                Ok(events) if events > 0 => service.relay.wake(),
                Ok(_) => {}
                Err(error) => return unavailable(error),
            }
        }
        for message in &value.messages {
            let dedup_key = format!("meta:inbound:{}", message.id);
            let fresh = async {
                let mut tx = service.db.pool().begin().await?;
                let fresh = store(&mut tx, &dedup_key, &body).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(fresh)
            }
            .await;
            match fresh {
                Ok(false) => continue,
                Ok(true) => {}
                Err(error) => return unavailable(error),
            }
            let text = message
                .text
                .as_ref()
                .map(|t| t.body.clone())
                .unwrap_or_default();
            let routed = service
                .peers
                .routing()
                .route_inbound_message(pb::RouteInboundMessageRequest {
                    account_id: account_id.clone(),
                    consumer_address: format!("+{}", message.from.trim_start_matches('+')),
                    channel: Channel::Whatsapp as i32,
                    text,
                    provider_message_id: message.id.clone(),
                    received_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
                })
                .await;
            match routed {
                Ok(_) => {}
                Err(status) if status.code() == Code::FailedPrecondition => {
                    tracing::info!(account_id, kind = %message.kind, reason = status.message(), "inbound whatsapp message not routed");
                }
                Err(status) => {
                    tracing::warn!(account_id, %status, "inbound whatsapp message: routing unavailable, meta will retry");
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
            }
            let marked = async {
                let mut tx = service.db.pool().begin().await?;
                mark_processed(&mut tx, &dedup_key).await?;
                tx.commit().await
            }
            .await;
            if let Err(error) = marked {
                tracing::warn!(%error, "inbound message routed but not marked processed");
            }
        }
    }
    StatusCode::OK.into_response()
}

#[cfg(test)]
mod tests {
    use super::is_opt_out;

    #[test]
    fn opt_out_keywords_in_any_case() {
        for body in [
            "STOP",
            "stop",
            " Stop ",
            "unsubscribe",
            "OptOut",
            "quit!",
            "End.",
        ] {
            assert!(is_opt_out(body), "{body}");
        }
        for body in ["stop sending me bills", "please stop", "help", "start", ""] {
            assert!(!is_opt_out(body), "{body}");
        }
    }
}
