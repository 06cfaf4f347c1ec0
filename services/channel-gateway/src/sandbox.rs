//! The built-in sandbox: plays the provider and the consumer for an account's channels that have no
//! real credentials — Twilio for SMS (and Apple Messages invites), Meta for WhatsApp, Google RBM for
//! RCS. It accepts a message, then posts the webhooks that provider would — sent, delivered (or
//! failed), read where the channel has it, and, when configured, the consumer's reply — to this
//! gateway's own public webhook URL, signed the way that provider signs, so they take exactly the
//! path real webhooks take.

use std::time::Duration;

use c2m_proto::v1::SandboxCredentials;
use ring::hmac;

use crate::twilio;

/// The number the sandbox sends from (Twilio's own magic test number).
pub const FROM: &str = "+15005550006";

/// The Twilio auth token sandbox webhooks are signed with.
fn auth_token(credentials_key: &str, account_id: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, credentials_key.as_bytes());
    let mut mac = hmac::Context::with_key(&key);
    mac.update(b"c2m-sandbox\0");
    mac.update(account_id.as_bytes());
    hex::encode(mac.sign())
}

/// The provider the sandbox plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Player {
    /// Twilio, for SMS and Apple Messages invites.
    Twilio,
    /// Meta's Cloud API, for WhatsApp.
    Meta,
    /// Google RBM, for RCS.
    Google,
}

impl Player {
    /// The secret its webhooks are signed with (Twilio's auth token, Meta's app secret, RBM's
    /// client token), derived from the credentials key so every gateway replica verifies them.
    pub fn secret(self, credentials_key: &str, account_id: &str) -> String {
        match self {
            Player::Twilio => auth_token(credentials_key, account_id),
            Player::Meta => auth_token(credentials_key, &format!("{account_id}\0meta")),
            Player::Google => auth_token(credentials_key, &format!("{account_id}\0google")),
        }
    }

    /// The provider's id for the message, in the provider's own shape (RBM keeps ours).
    pub fn message_id(self, message_id: &str) -> String {
        let hex: String = message_id.replace('-', "").chars().rev().take(32).collect();
        match self {
            Player::Twilio => format!("SM{hex}"),
            Player::Meta => format!("wamid.SANDBOX{hex}"),
            Player::Google => message_id.to_owned(),
        }
    }

    /// Plays the provider and the consumer for one accepted message, in the background.
    pub fn simulate(self, http: reqwest::Client, sim: Simulation) {
        match self {
            Player::Twilio => simulate_sms(http, sim),
            Player::Meta => simulate_whatsapp(http, sim),
            Player::Google => simulate_rcs(http, sim),
        }
    }
}

/// Plays Meta and the consumer for a WhatsApp message: `sent`, `delivered` and `read` (or `failed`
/// with 131026), then the reply, in Meta's envelope with `X-Hub-Signature-256`.
fn simulate_whatsapp(http: reqwest::Client, sim: Simulation) {
    tokio::spawn(async move {
        let url = format!(
            "{}/webhooks/meta/{}",
            sim.public_url.trim_end_matches('/'),
            sim.account_id
        );
        let secret = sim.auth_token.clone();
        let to = sim.to.trim_start_matches('+').to_owned();
        let envelope = |value: serde_json::Value| {
            let mut value = value;
            value["messaging_product"] = "whatsapp".into();
            value["metadata"] = serde_json::json!({ "display_phone_number": FROM.trim_start_matches('+'), "phone_number_id": "sandbox" });
            serde_json::json!({
                "object": "whatsapp_business_account",
                "entry": [{ "id": "sandbox", "changes": [{ "field": "messages", "value": value }] }],
            })
        };
        let now = || chrono::Utc::now().timestamp().to_string();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let statuses: &[&str] = if sim.options.fail_delivery {
            &["sent", "failed"]
        } else {
            &["sent", "delivered", "read"]
        };
        for status in statuses {
            let mut entry = serde_json::json!({
                "id": sim.message_sid, "status": status, "timestamp": now(), "recipient_id": to,
            });
            if *status == "failed" {
                entry["errors"] =
                    serde_json::json!([{ "code": 131026, "title": "Message undeliverable" }]);
            }
            let body = envelope(serde_json::json!({ "statuses": [entry] }));
            post_json(&http, &url, &body, |raw| {
                ("X-Hub-Signature-256", crate::meta::signature(&secret, raw))
            })
            .await;
        }
        if sim.options.reply_text.is_empty() || sim.options.fail_delivery {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let body = envelope(serde_json::json!({
            "contacts": [{ "profile": { "name": "Sandbox consumer" }, "wa_id": to }],
            "messages": [{
                "from": to, "id": format!("wamid.SANDBOX{}", uuid_like(&sim.message_sid)),
                "timestamp": now(), "type": "text", "text": { "body": sim.options.reply_text },
            }],
        }));
        post_json(&http, &url, &body, |raw| {
            ("X-Hub-Signature-256", crate::meta::signature(&secret, raw))
        })
        .await;
    });
}

/// Plays RBM and the consumer for an RCS message: DELIVERED and READ (or the server's
/// TTL_EXPIRATION_REVOKED), then the reply, in RBM's envelope with `X-Goog-Signature`.
fn simulate_rcs(http: reqwest::Client, sim: Simulation) {
    use base64::{Engine, engine::general_purpose::STANDARD};
    tokio::spawn(async move {
        let url = format!(
            "{}/webhooks/google/{}",
            sim.public_url.trim_end_matches('/'),
            sim.account_id
        );
        let client_token = sim.auth_token.clone();
        let post_event = |event: serde_json::Value| {
            let http = http.clone();
            let url = url.clone();
            let client_token = client_token.clone();
            async move {
                let data = serde_json::to_vec(&event).expect("json");
                let signature = crate::rbm::signature(&client_token, &data);
                let body = serde_json::json!({
                    "message": { "data": STANDARD.encode(&data), "messageId": uuid_like(&signature) },
                    "subscription": "projects/c2m-sandbox/subscriptions/rbm",
                });
                post_json(&http, &url, &body, |_| {
                    ("X-Goog-Signature", signature.clone())
                })
                .await;
            }
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let events: &[&str] = if sim.options.fail_delivery {
            &["TTL_EXPIRATION_REVOKED"]
        } else {
            &["DELIVERED", "READ"]
        };
        for kind in events {
            post_event(serde_json::json!({
                "senderPhoneNumber": sim.to, "phoneNumber": sim.to, "eventType": kind,
                "eventId": format!("{kind}-{}", sim.message_sid), "messageId": sim.message_sid,
                "agentId": "c2m-sandbox",
            }))
            .await;
        }
        if sim.options.reply_text.is_empty() || sim.options.fail_delivery {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        post_event(serde_json::json!({
            "senderPhoneNumber": sim.to, "text": sim.options.reply_text,
            "eventId": format!("reply-{}", sim.message_sid),
            "messageId": format!("reply-{}", uuid_like(&sim.message_sid)), "agentId": "c2m-sandbox",
        }))
        .await;
    });
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    sign: impl Fn(&[u8]) -> (&'static str, String),
) {
    let raw = serde_json::to_vec(body).expect("json");
    let (header, signature) = sign(&raw);
    deliver(url, || {
        http.post(url)
            .header(header, signature.clone())
            .header("content-type", "application/json")
            .body(raw.clone())
    })
    .await;
}

/// How many times a sandbox webhook is posted before it is given up, and the longest pause
/// between two tries: about two minutes in all.
const ATTEMPTS: u32 = 10;
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// Posts a webhook until it is answered 2xx, as providers do: a refusal or no answer is tried
/// again after a pause that doubles from half a second (with jitter), up to [`ATTEMPTS`] times.
/// So a webhook c2m could not take (PostgreSQL restarting: 503) still arrives, and the sandbox's
/// funnel matches what a real provider's would be.
async fn deliver(url: &str, request: impl Fn() -> reqwest::RequestBuilder) {
    let pauses = c2m_runtime::backoff::Backoff::new(Duration::from_millis(500), MAX_PAUSE);
    for attempt in 1..=ATTEMPTS {
        let why = match request().send().await {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => format!("answered {}", response.status()),
            Err(error) => error.to_string(),
        };
        if attempt == ATTEMPTS {
            tracing::warn!(url, attempts = attempt, %why, "sandbox webhook given up (is channel_gateway.public_url reachable?)");
            return;
        }
        let pause = pauses.jittered(attempt - 1);
        tracing::info!(url, attempt, %why, retry_in = ?pause, "sandbox webhook not taken; posting it again");
        tokio::time::sleep(pause).await;
    }
}

/// What a simulated message needs.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub public_url: String,
    pub account_id: String,
    pub auth_token: String,
    pub message_sid: String,
    pub to: String,
    pub options: SandboxCredentials,
}

/// Plays Twilio and the consumer for an SMS: `sent`, `delivered` (or `undelivered`), the reply.
fn simulate_sms(http: reqwest::Client, sim: Simulation) {
    tokio::spawn(async move {
        let base = sim.public_url.trim_end_matches('/');
        let status_url = format!("{base}/webhooks/twilio/{}/status", sim.account_id);
        let inbound_url = format!("{base}/webhooks/twilio/{}/inbound", sim.account_id);
        // A real network takes a moment; so does the sandbox.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let last = if sim.options.fail_delivery {
            "undelivered"
        } else {
            "delivered"
        };
        for status in ["sent", last] {
            let mut params = vec![
                ("MessageSid", sim.message_sid.clone()),
                ("SmsSid", sim.message_sid.clone()),
                ("MessageStatus", status.to_owned()),
                ("SmsStatus", status.to_owned()),
                ("From", FROM.to_owned()),
                ("To", sim.to.clone()),
                ("ApiVersion", "2010-04-01".to_owned()),
            ];
            if status == "undelivered" {
                params.push(("ErrorCode", "30006".to_owned()));
            }
            post(&http, &status_url, &sim.auth_token, &params).await;
        }
        if sim.options.reply_text.is_empty() || sim.options.fail_delivery {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sid = format!("SM{}", uuid_like(&sim.message_sid));
        let params = vec![
            ("MessageSid", sid.clone()),
            ("SmsMessageSid", sid),
            ("From", sim.to.clone()),
            ("To", FROM.to_owned()),
            ("Body", sim.options.reply_text.clone()),
            ("NumMedia", "0".to_owned()),
            ("ApiVersion", "2010-04-01".to_owned()),
        ];
        post(&http, &inbound_url, &sim.auth_token, &params).await;
    });
}

/// A reply's sid, distinct from and derived from the message's.
fn uuid_like(message_sid: &str) -> String {
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, b"reply"),
        message_sid.as_bytes(),
    );
    hex::encode(&tag.as_ref()[..16])
}

async fn post(http: &reqwest::Client, url: &str, auth_token: &str, params: &[(&str, String)]) {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let signature = twilio::signature(auth_token, url, &owned);
    deliver(url, || {
        http.post(url)
            .header("X-Twilio-Signature", signature.clone())
            .form(&owned)
    })
    .await;
}
