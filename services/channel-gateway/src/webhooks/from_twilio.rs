//! Twilio's webhooks: status callbacks and inbound messages, verified by `X-Twilio-Signature`.

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use c2m_proto::v1::{self as pb, Channel, Provider};

use super::{StatusReport, deliver_once, take_status, unavailable};
use crate::{Service, credentials, twilio};

/// Twilio wants TwiML back from an inbound-message webhook; an empty response sends no reply.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

/// The carriers' and Twilio's standard keywords, which count only as the whole message (in any
/// case, a trailing `.` or `!` allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keyword {
    /// STOP and its kin: no more messages on this channel.
    OptOut,
    /// START, UNSTOP, YES: messages again.
    OptIn,
    /// HELP, INFO: the brand's help text.
    Help,
}

pub(crate) fn keyword(body: &str) -> Option<Keyword> {
    let word = body
        .trim()
        .trim_end_matches(['.', '!'])
        .to_ascii_uppercase();
    match word.as_str() {
        "STOP" | "STOPALL" | "UNSUBSCRIBE" | "CANCEL" | "END" | "QUIT" | "REVOKE" | "OPTOUT" => {
            Some(Keyword::OptOut)
        }
        "START" | "UNSTOP" | "YES" => Some(Keyword::OptIn),
        "HELP" | "INFO" => Some(Keyword::Help),
        _ => None,
    }
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
            Ok(_) => {
                crate::sandbox::Player::Twilio.secret(&service.settings.credentials_key, account_id)
            }
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

/// Twilio's status callback: the message moves forward; reporting hears of each stage once.
pub(super) async fn status(
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
    let error_code = Some(param(&params, "ErrorCode")).filter(|c| !c.is_empty());
    // Our id, from the callback URL the send gave Twilio (signed with the rest of the URL).
    let query: Vec<(String, String)> = uri
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let message_id = Some(param(&query, "message_id")).filter(|id| !id.is_empty());
    let result = take_status(
        &service,
        &dedup_key,
        &body,
        StatusReport {
            account_id: &account_id,
            channel: Channel::Sms,
            provider_message_id: sid,
            message_id,
            stage: twilio::stage(status),
            error_code,
            source: "TWILIO",
        },
    )
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
pub(super) async fn inbound(
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
    let text = param(&params, "Body");
    let delivered = deliver_once(&service, &dedup_key, &body, || async {
        let mut routing = service.peers.routing();
        let source = format!("keyword:{}", text.trim().to_ascii_uppercase());
        match keyword(text) {
            // The consumer is not to be messaged here again.
            Some(Keyword::OptOut) => {
                let opt_out = pb::RecordOptOutRequest {
                    account_id: account_id.clone(),
                    consumer_phone: from.to_owned(),
                    channel: Channel::Sms as i32,
                    source,
                };
                return routing.record_opt_out(opt_out).await.map(|_| ());
            }
            Some(Keyword::Help) => return answer_help(&service, &account_id, from, sid).await,
            // Messages again; and the word is still an answer ("yes" to a deflection opens the
            // conversation), so it is routed too.
            Some(Keyword::OptIn) => {
                let opt_in = pb::RecordOptInRequest {
                    account_id: account_id.clone(),
                    consumer_phone: from.to_owned(),
                    channel: Channel::Sms as i32,
                    source,
                };
                routing.record_opt_in(opt_in).await?;
            }
            None => {}
        }
        routing
            .route_inbound_message(pb::RouteInboundMessageRequest {
                account_id: account_id.clone(),
                consumer_address: from.to_owned(),
                channel: Channel::Sms as i32,
                text: text.to_owned(),
                provider_message_id: sid.to_owned(),
                received_at: Some(c2m_proto::timestamp(chrono::Utc::now())),
            })
            .await
            .map(|_| ())
    })
    .await;
    if let Err(retry) = delivered {
        return retry;
    }
    twiml()
}

/// Answers HELP with the account's help text (or its name and how to stop), by SMS from the
/// brand's number. Sent under an id made from the inbound message's, so a webhook Twilio
/// delivers again answers once.
async fn answer_help(
    service: &Service,
    account_id: &str,
    to: &str,
    inbound_sid: &str,
) -> Result<(), tonic::Status> {
    let account = service
        .peers
        .config()
        .get_account(pb::GetAccountRequest {
            account_id: account_id.to_owned(),
        })
        .await?
        .into_inner()
        .account
        .unwrap_or_default();
    let help = account
        .settings
        .map(|s| s.help_text)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| {
            format!(
                "{}: reply STOP to stop receiving messages.",
                account.display_name
            )
        });
    service
        .peers
        .channel_gateway()
        .send_message(pb::SendMessageRequest {
            account_id: account_id.to_owned(),
            message_id: format!("help-{inbound_sid}"),
            channel: Channel::Sms as i32,
            to: to.to_owned(),
            text: help,
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Keyword, keyword};

    #[test]
    fn keywords_count_alone_in_any_case() {
        for body in [
            "STOP",
            "stop",
            " Stop ",
            "unsubscribe",
            "OptOut",
            "quit!",
            "End.",
        ] {
            assert_eq!(keyword(body), Some(Keyword::OptOut), "{body}");
        }
        for body in ["start", "UNSTOP", "Yes!"] {
            assert_eq!(keyword(body), Some(Keyword::OptIn), "{body}");
        }
        for body in ["help", "Info."] {
            assert_eq!(keyword(body), Some(Keyword::Help), "{body}");
        }
        for body in [
            "stop sending me bills",
            "please stop",
            "yes please",
            "help me",
            "",
        ] {
            assert_eq!(keyword(body), None, "{body}");
        }
    }
}
