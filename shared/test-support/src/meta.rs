//! A Meta WhatsApp Cloud API emulator on loopback: the messages endpoint as Meta documents it
//! (bearer token, JSON template, text and media messages, `wamid` answers, Graph error bodies), and the
//! webhooks Meta sends back, signed with `X-Hub-Signature-256` as Meta signs them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use ring::hmac;

/// One message the emulator accepted: its `wamid` and the JSON body as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentWhatsApp {
    pub wamid: String,
    pub phone_number_id: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    tokens: HashMap<String, String>,
    sent: Vec<SentWhatsApp>,
    refuse_next: Option<(u16, i64, String)>,
    throttle_next: usize,
    requests: usize,
    counter: u64,
    stall_next: Option<Stall>,
}

/// A send Meta never answers: the connection stays open, no response comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Meta took the message (its status webhooks follow); the answer was lost.
    AfterTaking,
    /// The request never got as far as Meta taking it.
    BeforeTaking,
}

/// The emulator. Dropping it stops the server.
pub struct MetaEmulator {
    base_url: String,
    inner: Arc<Mutex<Inner>>,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MetaEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaEmulator")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

fn graph_error(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({
            "error": { "message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbCdEf" }
        })),
    )
        .into_response()
}

async fn messages(
    State(inner): State<Arc<Mutex<Inner>>>,
    Path((_version, phone_number_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (response, stall) = {
        let mut inner = inner.lock().expect("emulator state");
        inner.requests += 1;
        match inner.stall_next.take() {
            Some(Stall::BeforeTaking) => (None, true),
            stall => {
                let response = take_message(&mut inner, phone_number_id, &headers, &body);
                let stall = stall.is_some() && response.status().is_success();
                (Some(response), stall)
            }
        }
    };
    if stall {
        std::future::pending::<()>().await;
    }
    response.expect("a send that is not stalled is answered")
}

/// What Meta makes of a send: the message taken (its `wamid`), or the Graph error.
fn take_message(
    inner: &mut Inner,
    phone_number_id: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if token.is_none() || inner.tokens.get(&phone_number_id).map(String::as_str) != token {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token");
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    };
    if body["messaging_product"] != "whatsapp" || !body["to"].is_string() {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
    // An arbitrary string of at most 512 characters, handed back on the status webhooks.
    if let Some(data) = body.get("biz_opaque_callback_data")
        && data.as_str().is_none_or(|d| d.chars().count() > 512)
    {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter");
    }
    match body["type"].as_str() {
        Some("template")
            if body["template"]["name"].is_string()
                && body["template"]["language"]["code"].is_string() => {}
        Some("text") if body["text"]["body"].is_string() => {}
        // Media by link; a caption only where WhatsApp shows one, at most 1,024 characters.
        Some(kind @ ("image" | "video" | "document" | "audio" | "sticker"))
            if body[kind]["link"]
                .as_str()
                .is_some_and(|l| l.starts_with("https://") || l.starts_with("http://"))
                && match body[kind].get("caption") {
                    None => true,
                    Some(caption) => {
                        matches!(kind, "image" | "video" | "document")
                            && caption.as_str().is_some_and(|c| c.chars().count() <= 1024)
                    }
                } => {}
        _ => return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid parameter"),
    }
    if inner.throttle_next > 0 {
        inner.throttle_next -= 1;
        return graph_error(
            StatusCode::BAD_REQUEST,
            130_429,
            "(#130429) Rate limit hit: Cloud API message throughput has been reached.",
        );
    }
    if let Some((status, code, message)) = inner.refuse_next.take() {
        return graph_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            &message,
        );
    }
    inner.counter += 1;
    let wamid = format!("wamid.HBgL{:020}", inner.counter);
    let to = body["to"].clone();
    inner.sent.push(SentWhatsApp {
        wamid: wamid.clone(),
        phone_number_id,
        body,
    });
    Json(serde_json::json!({
        "messaging_product": "whatsapp",
        "contacts": [{ "input": to, "wa_id": to }],
        "messages": [{ "id": wamid }],
    }))
    .into_response()
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// `sha256=<hex HMAC-SHA256(app secret, body)>`, as Meta signs webhooks.
pub fn meta_signature(app_secret: &str, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, app_secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body)))
}

impl MetaEmulator {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new()
            .route("/{version}/{phone_number_id}/messages", post(messages))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("emulator serves");
        });
        Self {
            base_url,
            inner,
            http: reqwest::Client::new(),
            server,
        }
    }

    /// The Graph API base to configure (`channel_gateway.meta_api_base`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Accepts sends from this phone number id with this access token.
    pub fn add_number(&self, phone_number_id: &str, access_token: &str) {
        self.inner
            .lock()
            .expect("emulator state")
            .tokens
            .insert(phone_number_id.into(), access_token.into());
    }

    /// Answers the next send with this HTTP status and Graph error code.
    pub fn refuse_next(&self, http_status: u16, code: i64, message: &str) {
        self.inner.lock().expect("emulator state").refuse_next =
            Some((http_status, code, message.into()));
    }

    /// Answers the next `times` sends with Meta's throughput error (HTTP 400, code 130429).
    pub fn throttle_next(&self, times: usize) {
        self.inner.lock().expect("emulator state").throttle_next = times;
    }

    /// Leaves the next send unanswered, after taking its message or before.
    pub fn stall_next(&self, stall: Stall) {
        self.inner.lock().expect("emulator state").stall_next = Some(stall);
    }

    /// Every send request, accepted or not.
    pub fn requests(&self) -> usize {
        self.inner.lock().expect("emulator state").requests
    }

    pub fn sent(&self) -> Vec<SentWhatsApp> {
        self.inner.lock().expect("emulator state").sent.clone()
    }

    /// Posts a webhook body as Meta does; `signature` overrides the right one.
    pub async fn post_webhook(
        &self,
        url: &str,
        app_secret: &str,
        body: &serde_json::Value,
        signature: Option<&str>,
    ) -> (u16, String) {
        let raw = serde_json::to_vec(body).expect("json");
        let signature = signature.map_or_else(|| meta_signature(app_secret, &raw), str::to_owned);
        let response = self
            .http
            .post(url)
            .header("X-Hub-Signature-256", signature)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .expect("webhook delivered");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    fn envelope(phone_number_id: &str, value: serde_json::Value) -> serde_json::Value {
        let mut value = value;
        value["messaging_product"] = "whatsapp".into();
        value["metadata"] = serde_json::json!({ "display_phone_number": "15550000000", "phone_number_id": phone_number_id });
        serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{ "id": "102290129340398", "changes": [{ "field": "messages", "value": value }] }],
        })
    }

    /// The status webhook for a sent message (`sent`, `delivered`, `read`, `failed`).
    pub async fn send_status(
        &self,
        url: &str,
        app_secret: &str,
        sent: &SentWhatsApp,
        status: &str,
        error_code: Option<i64>,
    ) -> (u16, String) {
        let mut entry = serde_json::json!({
            "id": sent.wamid,
            "status": status,
            "timestamp": "1764158400",
            "recipient_id": sent.body["to"],
        });
        // Meta hands back whatever the send carried as biz_opaque_callback_data.
        if let Some(data) = sent.body.get("biz_opaque_callback_data") {
            entry["biz_opaque_callback_data"] = data.clone();
        }
        if let Some(code) = error_code {
            entry["errors"] =
                serde_json::json!([{ "code": code, "title": "Message undeliverable" }]);
        }
        let body = Self::envelope(
            &sent.phone_number_id,
            serde_json::json!({ "statuses": [entry] }),
        );
        self.post_webhook(url, app_secret, &body, None).await
    }

    /// Meta's review of a template (`APPROVED`, `REJECTED`, `PAUSED`, …).
    pub async fn send_template_status(
        &self,
        url: &str,
        app_secret: &str,
        name: &str,
        language: &str,
        event: &str,
    ) -> (u16, String) {
        let body = serde_json::json!({
            "object": "whatsapp_business_account",
            "entry": [{ "id": "102290129340398", "time": 1764158400, "changes": [{
                "field": "message_template_status_update",
                "value": {
                    "event": event,
                    "message_template_id": 1_234_567_890,
                    "message_template_name": name,
                    "message_template_language": language,
                    "reason": "NONE",
                },
            }]}],
        });
        self.post_webhook(url, app_secret, &body, None).await
    }

    /// The webhook for a consumer's text message (`from` in international digits).
    pub async fn send_inbound(
        &self,
        url: &str,
        app_secret: &str,
        phone_number_id: &str,
        from: &str,
        text: &str,
    ) -> (u16, String) {
        let id = {
            let mut inner = self.inner.lock().expect("emulator state");
            inner.counter += 1;
            format!("wamid.IN{:020}", inner.counter)
        };
        let body = Self::envelope(
            phone_number_id,
            serde_json::json!({
                "contacts": [{ "profile": { "name": "Ada" }, "wa_id": from }],
                "messages": [{ "from": from, "id": id, "timestamp": now_unix().to_string(), "type": "text", "text": { "body": text } }],
            }),
        );
        self.post_webhook(url, app_secret, &body, None).await
    }
}

impl Drop for MetaEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}
