//! Meta's WhatsApp Cloud API and its webhooks, on the wire as Meta documents them.

use c2m_proto::v1::{FunnelStage, MetaWhatsAppCredentials, WhatsAppTemplateMessage};
use c2m_runtime::media::MediaKind;
use ring::hmac;
use serde::Deserialize;
use serde_json::json;

use crate::outcome::SendOutcome;

/// Meta's "rate limit hit": the business number's throughput is spent for the moment.
const THROUGHPUT_LIMIT: i64 = 130_429;

/// What a WhatsApp message carries.
#[derive(Debug, Clone, Copy)]
pub enum Content<'a> {
    /// Free-form text, inside the customer-service window.
    Text(&'a str),
    /// An approved template: how a business starts a conversation.
    Template(&'a WhatsAppTemplateMessage),
    /// One file by link, with the text as its caption where its kind shows one.
    Media { url: &'a str, caption: &'a str },
}

impl<'a> Content<'a> {
    /// A template when there is one, else the first file (the API refuses more), else text.
    pub fn of(
        text: &'a str,
        template: Option<&'a WhatsAppTemplateMessage>,
        media_urls: &'a [String],
    ) -> Self {
        match (template, media_urls.first()) {
            (Some(template), _) => Self::Template(template),
            (None, Some(url)) => Self::Media { url, caption: text },
            (None, None) => Self::Text(text),
        }
    }

    /// The message's JSON without the envelope (product, recipient).
    fn body(self) -> serde_json::Value {
        match self {
            Content::Template(template) => json!({
                "type": "template",
                "template": {
                    "name": template.name,
                    "language": { "code": template.language },
                    "components": [{
                        "type": "body",
                        "parameters": template.body_parameters.iter()
                            .map(|p| json!({ "type": "text", "text": p }))
                            .collect::<Vec<_>>(),
                    }],
                },
            }),
            Content::Text(text) => json!({ "type": "text", "text": { "body": text } }),
            Content::Media { url, caption } => {
                let kind = MediaKind::of(url);
                let mut media = json!({ "link": url });
                if kind.takes_caption() && !caption.trim().is_empty() {
                    media["caption"] = caption.into();
                }
                if kind == MediaKind::Document
                    && let Some(name) = url
                        .split(['?', '#'])
                        .next()
                        .and_then(|path| path.rsplit('/').next())
                        .filter(|name| !name.is_empty())
                {
                    media["filename"] = name.into();
                }
                let mut body = json!({ "type": kind.whatsapp_type() });
                body[kind.whatsapp_type()] = media;
                body
            }
        }
    }
}

/// `POST {base}/{version}/{phone-number-id}/messages` with the access token as a bearer. Our
/// message id rides as `biz_opaque_callback_data`, which Meta hands back on the message's status
/// webhooks: they find the message even when Meta's answer to the send was lost.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    version: &str,
    credentials: &MetaWhatsAppCredentials,
    message: (&str, &str),
    content: Content<'_>,
) -> SendOutcome {
    let (message_id, to) = message;
    let url = format!(
        "{}/{version}/{}/messages",
        base.trim_end_matches('/'),
        credentials.phone_number_id
    );
    let mut body = content.body();
    body["messaging_product"] = "whatsapp".into();
    body["recipient_type"] = "individual".into();
    // Meta takes the number in international format without the plus.
    body["to"] = to.trim_start_matches('+').into();
    body["biz_opaque_callback_data"] = message_id.into();
    // Meta reports its throughput limit (130429) in the error body, whatever the HTTP status: a
    // refused message was not sent, so it is tried again like a 429, at most twice.
    let mut throttled = 0;
    let (status, value) = loop {
        crate::retry::handing_over();
        let response = match crate::retry::send(|| {
            http.post(&url)
                .bearer_auth(&credentials.access_token)
                .json(&body)
        })
        .await
        {
            Ok(response) => response,
            Err(error) => return SendOutcome::unanswered("meta", &error),
        };
        let status = response.status();
        let value: serde_json::Value = match response.bytes().await {
            Ok(body) => serde_json::from_slice(&body).unwrap_or_default(),
            // Meta answered, but its answer broke off: a 2xx means it has the message.
            Err(error) if status.is_success() => return SendOutcome::unanswered("meta", &error),
            Err(_) => serde_json::Value::Null,
        };
        let wait = crate::retry::backoff(throttled);
        if value["error"]["code"].as_i64() != Some(THROUGHPUT_LIMIT)
            || throttled == 2
            || !crate::retry::time_for(wait)
        {
            break (status, value);
        }
        tokio::time::sleep(wait).await;
        throttled += 1;
    };
    if let Some(id) = value["messages"][0]["id"]
        .as_str()
        .filter(|_| status.is_success())
    {
        return SendOutcome::Accepted { sid: id.to_owned() };
    }
    // A 5xx may come after Meta took the message, and Meta has no idempotency key to ask again
    // with: the message may be on its way, and its status webhooks (which carry our id) tell.
    if status.is_server_error() {
        return SendOutcome::Unconfirmed {
            why: format!("meta answered {status}: {}", value["error"]["message"]),
        };
    }
    SendOutcome::Failed {
        code: value["error"]["code"]
            .as_i64()
            .map_or_else(|| status.as_u16().to_string(), |c| c.to_string()),
        message: value["error"]["message"]
            .as_str()
            .map_or_else(|| format!("meta answered {status}"), str::to_owned),
    }
}

/// `sha256=<hex HMAC-SHA256(app secret, raw body)>`: what the sandbox signs with, as Meta does.
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac::sign(&key(app_secret), body)))
}

fn key(app_secret: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, app_secret.as_bytes())
}

/// Checks `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, raw body)>` in constant time.
pub fn verify(app_secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(presented) = hex::decode(hex_digest) else {
        return false;
    };
    hmac::verify(&key(app_secret), body, &presented).is_ok()
}

/// The funnel stage a WhatsApp message status reports.
pub fn stage(status: &str) -> Option<FunnelStage> {
    match status {
        "sent" => Some(FunnelStage::Sent),
        "delivered" => Some(FunnelStage::Delivered),
        "read" => Some(FunnelStage::Read),
        "failed" => Some(FunnelStage::Failed),
        _ => None,
    }
}

/// The webhook envelope: `{"object":"whatsapp_business_account","entry":[{"changes":[{"value":…}]}]}`.
#[derive(Debug, Deserialize)]
pub struct Envelope {
    pub object: String,
    #[serde(default)]
    pub entry: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
pub struct Entry {
    #[serde(default)]
    pub changes: Vec<Change>,
}

#[derive(Debug, Deserialize)]
pub struct Change {
    /// `messages` (statuses and inbound messages) or `message_template_status_update`.
    #[serde(default)]
    pub field: String,
    #[serde(default)]
    pub value: serde_json::Value,
}

impl Change {
    pub fn messages(&self) -> Value {
        serde_json::from_value(self.value.clone()).unwrap_or_default()
    }

    pub fn template_update(&self) -> Option<TemplateUpdate> {
        (self.field == "message_template_status_update")
            .then(|| serde_json::from_value(self.value.clone()).ok())
            .flatten()
    }
}

/// Meta's review of a template: `{"event":"APPROVED","message_template_name":…,
/// "message_template_language":…}`.
#[derive(Debug, Deserialize)]
pub struct TemplateUpdate {
    pub event: String,
    pub message_template_name: String,
    pub message_template_language: String,
}

impl TemplateUpdate {
    /// The template status the event means, if it means one.
    pub fn status(&self) -> Option<c2m_proto::v1::WhatsAppTemplateStatus> {
        use c2m_proto::v1::WhatsAppTemplateStatus as S;
        match self.event.as_str() {
            "APPROVED" | "REINSTATED" => Some(S::Approved),
            "REJECTED" => Some(S::Rejected),
            "PAUSED" | "FLAGGED" => Some(S::Paused),
            "DISABLED" | "PENDING_DELETION" | "DELETED" => Some(S::Disabled),
            "PENDING" => Some(S::Pending),
            _ => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct Value {
    #[serde(default)]
    pub messaging_product: String,
    #[serde(default)]
    pub statuses: Vec<Status>,
    #[serde(default)]
    pub messages: Vec<Inbound>,
}

#[derive(Debug, Deserialize)]
pub struct Status {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub errors: Vec<Error>,
    /// Our message id, as the send carried it.
    #[serde(default)]
    pub biz_opaque_callback_data: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Error {
    pub code: i64,
}

#[derive(Debug, Deserialize)]
pub struct Inbound {
    pub from: String,
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub text: Option<Text>,
    /// Unix seconds, as a string.
    #[serde(default)]
    pub timestamp: String,
}

impl Inbound {
    /// When the consumer sent it; now, if Meta's timestamp is missing or unreadable.
    pub fn sent_at(&self) -> chrono::DateTime<chrono::Utc> {
        self.timestamp
            .parse::<i64>()
            .ok()
            .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .filter(|at| *at <= chrono::Utc::now())
            .unwrap_or_else(chrono::Utc::now)
    }
}

#[derive(Debug, Deserialize)]
pub struct Text {
    pub body: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_of_the_raw_body() {
        // HMAC-SHA256("secret", "{\"a\":1}"), computed apart from this code (Python's `hmac`).
        let body = br#"{"a":1}"#;
        let good = "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494";
        assert_eq!(signature("secret", body), good);
        assert!(verify("secret", body, good));
        assert!(!verify("other", body, good));
        assert!(!verify("secret", br#"{"a":2}"#, good));
        assert!(!verify("secret", body, "sha1=abc"));
        assert!(!verify("secret", body, "sha256=zz"));
    }

    #[test]
    fn envelopes_parse_statuses_and_messages() {
        let envelope: Envelope = serde_json::from_str(
            r#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"messages","value":{
              "messaging_product":"whatsapp","metadata":{"phone_number_id":"123"},
              "statuses":[{"id":"wamid.X","status":"failed","timestamp":"1700000000","recipient_id":"14155550123","errors":[{"code":131026,"title":"Message undeliverable"}]}],
              "messages":[{"from":"14155550123","id":"wamid.Y","timestamp":"1700000001","type":"text","text":{"body":"hi"}}]}}]}]}"#,
        )
        .expect("parses");
        let value = envelope.entry[0].changes[0].messages();
        assert_eq!(value.statuses[0].errors[0].code, 131026);
        assert_eq!(value.messages[0].text.as_ref().expect("text").body, "hi");
    }
}
