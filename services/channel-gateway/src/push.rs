//! App messaging: a push to the consumer's registered devices, through FCM's HTTP v1 API
//! (Android) and APNs over HTTP/2 with token authentication (iOS), as each documents it.
//!
//! Neither reports delivery to a server: "sent" is the last stage c2m can know for a push, and the
//! consumer's reply in the app is what moves the funnel on.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use c2m_proto::v1::ApnsCredentials;
use serde_json::json;

use crate::{
    google,
    jwt::Es256,
    outcome::{Refusal, SendOutcome},
};

/// What one device's push came to.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    /// The provider's id for the push (FCM's message name, APNs' `apns-id`).
    Accepted(String),
    /// The token is no longer valid (FCM UNREGISTERED, APNs 410 or BadDeviceToken): drop it.
    Unregistered,
    Failed {
        code: String,
        message: String,
    },
    /// No answer: the push may have gone (what went wrong, for the log).
    Unconfirmed {
        why: String,
    },
}

impl PushOutcome {
    /// A push that got no answer, by the rule every provider follows.
    fn unanswered(provider: &str, error: &reqwest::Error) -> Self {
        match SendOutcome::unanswered(provider, error) {
            SendOutcome::Failed { code, message } => Self::Failed { code, message },
            SendOutcome::Unconfirmed { why } => Self::Unconfirmed { why },
            SendOutcome::Accepted { sid } => Self::Accepted(sid),
        }
    }
}

impl From<Refusal> for PushOutcome {
    fn from(r: Refusal) -> Self {
        PushOutcome::Failed {
            code: r.code,
            message: r.message,
        }
    }
}

/// What the notification says, and the ids the app gets to open the right conversation.
#[derive(Debug, Clone)]
pub struct Notification<'a> {
    pub title: &'a str,
    pub body: &'a str,
    pub message_id: &'a str,
    pub handoff_id: &'a str,
}

/// `POST {base}/v1/projects/{project}/messages:send`.
pub async fn fcm(
    http: &reqwest::Client,
    base: &str,
    project_id: &str,
    access_token: &str,
    device_token: &str,
    n: &Notification<'_>,
) -> PushOutcome {
    let url = format!(
        "{}/v1/projects/{project_id}/messages:send",
        base.trim_end_matches('/')
    );
    let mut notification = json!({ "body": n.body });
    if !n.title.is_empty() {
        notification["title"] = n.title.into();
    }
    let body = json!({ "message": {
        "token": device_token,
        "notification": notification,
        "data": { "c2m_message_id": n.message_id, "c2m_handoff_id": n.handoff_id },
    }});
    crate::retry::handing_over();
    let response = crate::retry::send_while(
        || http.post(&url).bearer_auth(access_token).json(&body),
        |s| matches!(s.as_u16(), 429 | 500 | 503),
    )
    .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return PushOutcome::unanswered("fcm", &error),
    };
    let status = response.status();
    let value: serde_json::Value = response.json().await.unwrap_or_default();
    if status.is_success()
        && let Some(name) = value["name"].as_str()
    {
        return PushOutcome::Accepted(name.to_owned());
    }
    // FCM's detail carries the FCM error code beside the Google status.
    let fcm_code = value["error"]["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|d| d["errorCode"].as_str());
    if fcm_code == Some("UNREGISTERED") {
        return PushOutcome::Unregistered;
    }
    let (code, message) = google::error_of(status, &value);
    PushOutcome::Failed {
        code: fcm_code.map_or(code, str::to_owned),
        message,
    }
}

/// APNs provider tokens per key: Apple refuses one older than an hour and throttles one renewed
/// more often than every 20 minutes, so each lives 50 minutes.
#[derive(Debug, Default)]
pub struct ApnsTokens {
    cached: Mutex<HashMap<(String, String), (String, Instant)>>,
}

const APNS_TOKEN_LIFETIME: Duration = Duration::from_secs(50 * 60);

impl ApnsTokens {
    pub fn token(&self, credentials: &ApnsCredentials) -> Result<String, String> {
        let key = (credentials.team_id.clone(), credentials.key_id.clone());
        let mut cached = self.cached.lock().expect("token cache");
        if let Some((token, until)) = cached.get(&key)
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let signer =
            Es256::from_pem(&credentials.private_key_pem).map_err(|e| format!("apns key: {e}"))?;
        let token = signer.sign(
            &json!({ "alg": "ES256", "kid": credentials.key_id }),
            &json!({ "iss": credentials.team_id, "iat": chrono::Utc::now().timestamp() }),
        );
        cached.insert(key, (token.clone(), Instant::now() + APNS_TOKEN_LIFETIME));
        Ok(token)
    }
}

/// `POST {base}/3/device/{token}` over HTTP/2 (`client` must speak it).
pub async fn apns(
    client: &reqwest::Client,
    base: &str,
    credentials: &ApnsCredentials,
    provider_token: &str,
    device_token: &str,
    n: &Notification<'_>,
) -> PushOutcome {
    let url = format!("{}/3/device/{device_token}", base.trim_end_matches('/'));
    let mut alert = json!({ "body": n.body });
    if !n.title.is_empty() {
        alert["title"] = n.title.into();
    }
    let body = json!({
        "aps": { "alert": alert, "sound": "default" },
        "c2m_message_id": n.message_id,
        "c2m_handoff_id": n.handoff_id,
    });
    crate::retry::handing_over();
    let response = crate::retry::send_while(
        || {
            client
                .post(&url)
                .bearer_auth(provider_token)
                .header("apns-topic", &credentials.topic)
                .header("apns-push-type", "alert")
                .header("apns-priority", "10")
                .json(&body)
        },
        |s| matches!(s.as_u16(), 429 | 500 | 503),
    )
    .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return PushOutcome::unanswered("apns", &error),
    };
    let status = response.status();
    let apns_id = response
        .headers()
        .get("apns-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if status.is_success() {
        return PushOutcome::Accepted(apns_id.unwrap_or_default());
    }
    let value: serde_json::Value = response.json().await.unwrap_or_default();
    let reason = value["reason"].as_str().unwrap_or_default().to_owned();
    if status == reqwest::StatusCode::GONE || reason == "BadDeviceToken" || reason == "Unregistered"
    {
        return PushOutcome::Unregistered;
    }
    PushOutcome::Failed {
        code: if reason.is_empty() {
            status.as_u16().to_string()
        } else {
            reason
        },
        message: format!("apns refused the push ({})", status.as_u16()),
    }
}
