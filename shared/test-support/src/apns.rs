//! An APNs emulator on loopback: `POST /3/device/{token}` over HTTP/2 only (as Apple serves it;
//! HTTP/1.1 is refused), the provider token verified as an ES256 JWT against the key's public half
//! (its `kid`, issuer team and age), `apns-topic` and `apns-push-type` checked, an `apns-id`
//! answered, and 410 Unregistered for dead device tokens.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Version},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use ring::{
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    },
};

pub const APNS_TEAM_ID: &str = "C2MTEAM123";
pub const APNS_KEY_ID: &str = "C2MKEY4567";
pub const APNS_TOPIC: &str = "com.example.brand";

/// One push the emulator accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct SentApns {
    pub device_token: String,
    pub apns_id: String,
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Inner {
    public_key: Vec<u8>,
    dead_tokens: HashSet<String>,
    sent: Vec<SentApns>,
    refused: Vec<String>,
    counter: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// The emulator. Dropping it stops the server.
pub struct ApnsEmulator {
    base_url: String,
    private_key_pem: String,
    inner: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApnsEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsEmulator")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

fn reason(status: StatusCode, reason: &str) -> Response {
    (status, Json(serde_json::json!({ "reason": reason }))).into_response()
}

fn check_token(public_key: &[u8], headers: &HeaderMap) -> Result<(), &'static str> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("bearer ")
                .or_else(|| v.strip_prefix("Bearer "))
        })
        .ok_or("MissingProviderToken")?;
    let (signed, signature) = token.rsplit_once('.').ok_or("InvalidProviderToken")?;
    let (header, claims) = signed.split_once('.').ok_or("InvalidProviderToken")?;
    let decode = |part: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    let (header, claims) = (
        decode(header).ok_or("InvalidProviderToken")?,
        decode(claims).ok_or("InvalidProviderToken")?,
    );
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
        .verify(
            signed.as_bytes(),
            &URL_SAFE_NO_PAD
                .decode(signature)
                .map_err(|_| "InvalidProviderToken")?,
        )
        .map_err(|_| "InvalidProviderToken")?;
    if header["alg"] != "ES256" || header["kid"] != APNS_KEY_ID || claims["iss"] != APNS_TEAM_ID {
        return Err("InvalidProviderToken");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    if now - claims["iat"].as_i64().unwrap_or(0) > 3600 {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

async fn push(
    State(inner): State<Shared>,
    Path(device_token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = inner.lock().expect("emulator state");
    if version != Version::HTTP_2 {
        inner.refused.push("not HTTP/2".into());
        return reason(StatusCode::BAD_REQUEST, "BadRequest: HTTP/2 only");
    }
    if let Err(why) = check_token(&inner.public_key, &headers) {
        inner.refused.push(why.into());
        return reason(StatusCode::FORBIDDEN, why);
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if header("apns-topic") != Some(APNS_TOPIC) {
        return reason(StatusCode::BAD_REQUEST, "DeviceTokenNotForTopic");
    }
    if header("apns-push-type") != Some("alert") {
        return reason(StatusCode::BAD_REQUEST, "InvalidPushType");
    }
    if device_token.is_empty() || !device_token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reason(StatusCode::BAD_REQUEST, "BadDeviceToken");
    }
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return reason(StatusCode::BAD_REQUEST, "PayloadEmpty");
    };
    if !body["aps"]["alert"]["body"].is_string() {
        return reason(StatusCode::BAD_REQUEST, "BadPayload");
    }
    if inner.dead_tokens.contains(&device_token) {
        return (
            StatusCode::GONE,
            Json(
                serde_json::json!({ "reason": "Unregistered", "timestamp": 1_764_158_400_000_i64 }),
            ),
        )
            .into_response();
    }
    inner.counter += 1;
    let apns_id = format!("EC1BF194-B3B2-424A-89A9-{:012X}", inner.counter);
    inner.sent.push(SentApns {
        device_token,
        apns_id: apns_id.clone(),
        headers: headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("apns-"))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect(),
        body,
    });
    ([("apns-id", apns_id)], StatusCode::OK).into_response()
}

impl ApnsEmulator {
    /// Starts the emulator with a fresh signing key ([`Self::private_key_pem`]).
    pub async fn start() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("a P-256 key");
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("parses");
        let b64 = STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        let private_key_pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        let inner: Shared = Arc::new(Mutex::new(Inner {
            public_key: pair.public_key().as_ref().to_vec(),
            ..Inner::default()
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/3/device/{token}", post(push))
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("emulator serves");
        });
        Self {
            base_url,
            private_key_pem,
            inner,
            server,
        }
    }

    /// The base to configure (`channel_gateway.apns_api_base`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The `.p8` key provider tokens must be signed with.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// APNs answers 410 Unregistered for this device token.
    pub fn unregister(&self, device_token: &str) {
        self.inner
            .lock()
            .expect("emulator state")
            .dead_tokens
            .insert(device_token.into());
    }

    pub fn sent(&self) -> Vec<SentApns> {
        self.inner.lock().expect("emulator state").sent.clone()
    }

    /// Why requests were refused (not HTTP/2, bad provider token, …).
    pub fn refused(&self) -> Vec<String> {
        self.inner.lock().expect("emulator state").refused.clone()
    }
}

impl Drop for ApnsEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}
