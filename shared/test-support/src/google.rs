//! A Google emulator on loopback: the OAuth 2.0 token endpoint for service accounts (the RS256
//! assertion is verified against the service account's public key, its issuer, audience, scope
//! and lifetime checked), RCS Business Messaging (capability checks and `agentMessages.create`,
//! idempotent on `messageId`, 404 for numbers without RCS) and FCM's HTTP v1 send (404
//! UNREGISTERED for dead tokens), each answering with Google's error bodies; and RBM's webhooks,
//! signed with `X-Goog-Signature` as Google signs them.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ring::hmac;
use ring::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, RsaKeyPair, UnparsedPublicKey};

/// A 2048-bit RSA key made for these tests with `openssl genpkey`; it signs nothing real.
pub const TEST_SERVICE_ACCOUNT_KEY: &str =
    include_str!("../fixtures/google-service-account-test-key.pem");

/// One RCS message the emulator accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct SentRcs {
    pub phone: String,
    pub message_id: String,
    pub agent_id: String,
    pub body: serde_json::Value,
}

/// One FCM message the emulator accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct SentFcm {
    pub project_id: String,
    pub name: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    /// client_email → the public key its assertions must verify with.
    accounts: HashMap<String, Vec<u8>>,
    /// access token → scope.
    tokens: HashMap<String, String>,
    token_requests: usize,
    rcs_phones: HashSet<String>,
    capability_checks: Vec<String>,
    rcs: Vec<SentRcs>,
    dead_fcm_tokens: HashSet<String>,
    /// Take the next push, then never answer.
    stall_next_fcm: bool,
    fcm: Vec<SentFcm>,
    counter: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// The emulator. Dropping it stops the server.
pub struct GoogleEmulator {
    base_url: String,
    inner: Shared,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for GoogleEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GoogleEmulator")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

fn google_error(status: StatusCode, message: &str, extra: serde_json::Value) -> Response {
    let mut error = serde_json::json!({
        "code": status.as_u16(),
        "message": message,
        "status": match status {
            StatusCode::NOT_FOUND => "NOT_FOUND",
            StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
            StatusCode::FORBIDDEN => "PERMISSION_DENIED",
            _ => "INVALID_ARGUMENT",
        },
    });
    if !extra.is_null() {
        error["details"] = extra;
    }
    (status, Json(serde_json::json!({ "error": error }))).into_response()
}

fn refuse(status: StatusCode, message: &str) -> Response {
    google_error(status, message, serde_json::Value::Null)
}

fn pkcs8(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    STANDARD.decode(body).expect("a PEM key")
}

/// Checks an RS256 assertion as Google's token endpoint does; the scope it grants.
fn check_assertion(inner: &Inner, assertion: &str, audience: &str) -> Result<String, String> {
    let mut parts = assertion.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT".into());
    };
    let decode = |part: &str| -> Result<serde_json::Value, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| "not base64url".to_owned())?;
        serde_json::from_slice(&bytes).map_err(|_| "not JSON".to_owned())
    };
    let (header, claims) = (decode(header)?, decode(claims)?);
    if header["alg"] != "RS256" {
        return Err("alg must be RS256".into());
    }
    let issuer = claims["iss"].as_str().unwrap_or_default();
    let key = inner
        .accounts
        .get(issuer)
        .ok_or_else(|| format!("unknown service account {issuer}"))?;
    let signed = &assertion[..assertion.rfind('.').expect("three parts")];
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
        .verify(
            signed.as_bytes(),
            &URL_SAFE_NO_PAD
                .decode(signature)
                .map_err(|_| "signature not base64url")?,
        )
        .map_err(|_| "invalid JWT signature".to_owned())?;
    if claims["aud"] != audience {
        return Err(format!("aud must be {audience}"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(0),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if (iat - now).abs() > 300 || exp <= now || exp - iat > 3600 {
        return Err("iat/exp outside the allowed lifetime".into());
    }
    claims["scope"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| "scope is required".into())
}

async fn token(State((inner, base)): State<(Shared, String)>, body: Bytes) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let mut inner = inner.lock().expect("emulator state");
    inner.token_requests += 1;
    let refuse = |description: String| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "invalid_grant", "error_description": description })),
        )
            .into_response()
    };
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return refuse("grant_type must be the JWT bearer grant".into());
    }
    let scope = match check_assertion(
        &inner,
        form.get("assertion").map_or("", String::as_str),
        &format!("{base}/token"),
    ) {
        Ok(scope) => scope,
        Err(why) => return refuse(why),
    };
    inner.counter += 1;
    let access_token = format!("ya29.test-{:08}", inner.counter);
    inner.tokens.insert(access_token.clone(), scope);
    Json(serde_json::json!({ "access_token": access_token, "expires_in": 3599, "token_type": "Bearer" }))
        .into_response()
}

fn authorized(inner: &Inner, headers: &HeaderMap, scope: &str) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|t| inner.tokens.get(t))
        .is_some_and(|granted| granted.split(' ').any(|s| s == scope))
}

const UNAUTHENTICATED: &str = "Request had invalid authentication credentials.";
const RBM_SCOPE: &str = "https://www.googleapis.com/auth/rcsbusinessmessaging";
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

async fn capabilities(
    State((inner, _)): State<(Shared, String)>,
    Path(phone): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let mut inner = inner.lock().expect("emulator state");
    if !authorized(&inner, &headers, RBM_SCOPE) {
        return refuse(StatusCode::UNAUTHORIZED, UNAUTHENTICATED);
    }
    if !query.contains_key("requestId") || !query.contains_key("agentId") {
        return refuse(
            StatusCode::BAD_REQUEST,
            "requestId and agentId are required",
        );
    }
    inner.capability_checks.push(phone.clone());
    if !inner.rcs_phones.contains(&phone) {
        return refuse(StatusCode::NOT_FOUND, "Requested entity was not found.");
    }
    Json(serde_json::json!({ "features": ["RICHCARD_STANDALONE", "ACTION_DIAL", "ACTION_OPEN_URL"] }))
        .into_response()
}

async fn agent_messages(
    State((inner, _)): State<(Shared, String)>,
    Path(phone): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = inner.lock().expect("emulator state");
    if !authorized(&inner, &headers, RBM_SCOPE) {
        return refuse(StatusCode::UNAUTHORIZED, UNAUTHENTICATED);
    }
    let (Some(message_id), Some(agent_id)) = (query.get("messageId"), query.get("agentId")) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "messageId and agentId are required",
        );
    };
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "Invalid JSON payload received.");
    };
    if let Err(why) = rbm_content(&body["contentMessage"]) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if !inner.rcs_phones.contains(&phone) {
        return refuse(StatusCode::NOT_FOUND, "Requested entity was not found.");
    }
    // A reused messageId is the same message: accepted, not sent again.
    if !inner.rcs.iter().any(|m| &m.message_id == message_id) {
        inner.rcs.push(SentRcs {
            phone: phone.clone(),
            message_id: message_id.clone(),
            agent_id: agent_id.clone(),
            body: body.clone(),
        });
    }
    Json(serde_json::json!({
        "name": format!("phones/{phone}/agentMessages/{message_id}"),
        "sendTime": "2026-11-26T12:00:00Z",
        "contentMessage": body["contentMessage"],
    }))
    .into_response()
}

/// RBM's `AgentContentMessage`: exactly one of text (at most 3,072 characters), a file
/// (`contentInfo.fileUrl`) or a rich card (a standalone card with an orientation and at least one
/// of title, description at most 2,000 characters, and media with a height and a file).
fn rbm_content(content: &serde_json::Value) -> Result<(), &'static str> {
    let Some(fields) = content.as_object() else {
        return Err("contentMessage is required");
    };
    let kinds = [
        "text",
        "contentInfo",
        "richCard",
        "fileUrl",
        "uploadedRbmFile",
    ];
    if fields
        .keys()
        .filter(|k| kinds.contains(&k.as_str()))
        .count()
        != 1
    {
        return Err("contentMessage must have exactly one of text, contentInfo or richCard");
    }
    let url = |info: &serde_json::Value| {
        info["fileUrl"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://"))
    };
    if let Some(text) = fields.get("text") {
        return match text.as_str() {
            Some(t) if t.chars().count() <= 3072 => Ok(()),
            _ => Err("text must be a string of at most 3072 characters"),
        };
    }
    if let Some(info) = fields.get("contentInfo") {
        return if url(info) {
            Ok(())
        } else {
            Err("contentInfo.fileUrl must be a public https URL")
        };
    }
    let card = &content["richCard"]["standaloneCard"];
    if !matches!(
        card["cardOrientation"].as_str(),
        Some("VERTICAL" | "HORIZONTAL")
    ) {
        return Err("standaloneCard.cardOrientation is required");
    }
    let card = &card["cardContent"];
    let description = card["description"].as_str();
    if description.is_some_and(|d| d.chars().count() > 2000) {
        return Err("cardContent.description must be at most 2000 characters");
    }
    let media = &card["media"];
    let media_ok = media.is_null()
        || (matches!(media["height"].as_str(), Some("SHORT" | "MEDIUM" | "TALL"))
            && url(&media["contentInfo"]));
    if !media_ok {
        return Err("cardContent.media needs a height and contentInfo.fileUrl");
    }
    if card["title"].is_null() && description.is_none() && media.is_null() {
        return Err("cardContent needs a title, a description or media");
    }
    Ok(())
}

async fn fcm_send(
    State((inner, base)): State<(Shared, String)>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match fcm_take(State((inner, base)), Path(project), headers, body) {
        Some(response) => response,
        None => std::future::pending().await,
    }
}

/// FCM's answer to a push, or none when it takes the push and never answers.
fn fcm_take(
    State((inner, _)): State<(Shared, String)>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Option<Response> {
    let mut inner = inner.lock().expect("emulator state");
    if !authorized(&inner, &headers, FCM_SCOPE) {
        return Some(refuse(StatusCode::UNAUTHORIZED, UNAUTHENTICATED));
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "Invalid JSON payload received.",
        ));
    };
    let Some(token) = body["message"]["token"].as_str() else {
        return Some(refuse(StatusCode::BAD_REQUEST, "message.token is required"));
    };
    let data_are_strings = body["message"]["data"]
        .as_object()
        .is_none_or(|d| d.values().all(serde_json::Value::is_string));
    if !data_are_strings || !body["message"]["notification"]["body"].is_string() {
        return Some(refuse(
            StatusCode::BAD_REQUEST,
            "Invalid value at 'message'",
        ));
    }
    if inner.dead_fcm_tokens.contains(token) {
        return Some(google_error(
            StatusCode::NOT_FOUND,
            "Requested entity was not found.",
            serde_json::json!([{ "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED" }]),
        ));
    }
    inner.counter += 1;
    let name = format!("projects/{project}/messages/0:{:016}", inner.counter);
    inner.fcm.push(SentFcm {
        project_id: project,
        name: name.clone(),
        body,
    });
    if std::mem::take(&mut inner.stall_next_fcm) {
        // FCM has the push; its answer never comes.
        return None;
    }
    Some(Json(serde_json::json!({ "name": name })).into_response())
}

/// `X-Goog-Signature`: base64 of HMAC-SHA512 under the client token over the decoded data.
pub fn goog_signature(client_token: &str, data: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA512, client_token.as_bytes());
    STANDARD.encode(hmac::sign(&key, data))
}

impl GoogleEmulator {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let inner: Shared = Arc::default();
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/phones/{phone}/capabilities", get(capabilities))
            .route("/v1/phones/{phone}/agentMessages", post(agent_messages))
            .route("/v1/projects/{project}/messages:send", post(fcm_send))
            .with_state((inner.clone(), base_url.clone()));
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

    /// The base for RBM and FCM (`channel_gateway.rbm_api_base`, `fcm_api_base`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The token endpoint (`channel_gateway.google_token_url`).
    pub fn token_url(&self) -> String {
        format!("{}/token", self.base_url)
    }

    /// A service-account key file for `client_email`, whose assertions the emulator accepts.
    pub fn service_account(&self, client_email: &str) -> String {
        let pair = RsaKeyPair::from_pkcs8(&pkcs8(TEST_SERVICE_ACCOUNT_KEY)).expect("the test key");
        self.inner
            .lock()
            .expect("emulator state")
            .accounts
            .insert(client_email.into(), pair.public_key().as_ref().to_vec());
        serde_json::json!({
            "type": "service_account",
            "project_id": "c2m-test",
            "private_key_id": "0123456789abcdef0123456789abcdef01234567",
            "private_key": TEST_SERVICE_ACCOUNT_KEY,
            "client_email": client_email,
            "client_id": "100000000000000000001",
            "token_uri": self.token_url(),
        })
        .to_string()
    }

    /// Numbers that can receive RCS; every other number answers 404.
    pub fn add_rcs_phone(&self, phone: &str) {
        self.inner
            .lock()
            .expect("emulator state")
            .rcs_phones
            .insert(phone.into());
    }

    /// FCM answers 404 UNREGISTERED for this device token.
    pub fn unregister_fcm_token(&self, token: &str) {
        self.inner
            .lock()
            .expect("emulator state")
            .dead_fcm_tokens
            .insert(token.into());
    }

    pub fn rcs_sent(&self) -> Vec<SentRcs> {
        self.inner.lock().expect("emulator state").rcs.clone()
    }

    /// Takes the next push but never answers it: the answer lost on its way back.
    pub fn stall_next_fcm(&self) {
        self.inner.lock().expect("emulator state").stall_next_fcm = true;
    }

    pub fn fcm_sent(&self) -> Vec<SentFcm> {
        self.inner.lock().expect("emulator state").fcm.clone()
    }

    pub fn capability_checks(&self) -> Vec<String> {
        self.inner
            .lock()
            .expect("emulator state")
            .capability_checks
            .clone()
    }

    /// How many tokens were asked for (a cached token asks for none).
    pub fn token_requests(&self) -> usize {
        self.inner.lock().expect("emulator state").token_requests
    }

    /// Posts an RBM event (`data` as Google would put it in `message.data`); `signature`
    /// overrides the right one, `None` sends none.
    pub async fn post_rbm(
        &self,
        url: &str,
        data: &serde_json::Value,
        signature: Option<Option<String>>,
        client_token: &str,
    ) -> (u16, String) {
        let raw = serde_json::to_vec(data).expect("json");
        let envelope = serde_json::json!({
            "message": {
                "data": STANDARD.encode(&raw),
                "messageId": "2070443601311540",
                "publishTime": "2026-11-26T12:00:01.000Z",
            },
            "subscription": "projects/rbm-agent/subscriptions/rbm-agent-sub",
        });
        let mut request = self.http.post(url).json(&envelope);
        match signature {
            None => {
                request = request.header("X-Goog-Signature", goog_signature(client_token, &raw))
            }
            Some(Some(forged)) => request = request.header("X-Goog-Signature", forged),
            Some(None) => {}
        }
        let response = request.send().await.expect("webhook delivered");
        (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        )
    }

    /// The webhook set-up handshake as Google sends it.
    pub async fn post_handshake(
        &self,
        url: &str,
        client_token: &str,
        secret: &str,
    ) -> (u16, String) {
        let response = self
            .http
            .post(url)
            .json(&serde_json::json!({ "clientToken": client_token, "secret": secret }))
            .send()
            .await
            .expect("webhook delivered");
        (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        )
    }
}

impl Drop for GoogleEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}
