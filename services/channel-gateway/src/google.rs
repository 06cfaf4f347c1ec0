//! Google's OAuth 2.0 for service accounts (RBM and FCM): an RS256 assertion signed with the
//! account's key is exchanged at the token endpoint for an access token, which is kept until a
//! minute before it expires, so a send does not cost a token round trip.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::json;

use crate::{jwt::Rs256, outcome::Refusal};

/// The scopes c2m asks for.
pub const RBM_SCOPE: &str = "https://www.googleapis.com/auth/rcsbusinessmessaging";
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The fields of a service-account key file that c2m uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key: String,
    #[serde(default)]
    pub private_key_id: String,
}

impl ServiceAccount {
    /// Parses a key file and its key; the message says what is wrong, never what the key is.
    pub fn parse(json: &str) -> Result<(Self, Rs256), String> {
        let account: Self = serde_json::from_str(json)
            .map_err(|e| format!("a service-account key file (client_email, private_key): {e}"))?;
        if !account.client_email.contains('@') {
            return Err("client_email is not an email address".into());
        }
        let key = Rs256::from_pem(&account.private_key).map_err(|e| format!("private_key: {e}"))?;
        Ok((account, key))
    }
}

/// A service account (its email and key id) and a scope.
type TokenKey = (String, String, &'static str);

/// Access tokens per service account and scope, each with when to stop using it.
#[derive(Debug)]
pub struct Tokens {
    token_url: String,
    cached: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

impl Tokens {
    pub fn new(token_url: &str) -> Self {
        Self {
            token_url: token_url.to_owned(),
            cached: Mutex::new(HashMap::new()),
        }
    }

    /// Drops a token the provider refused (revoked, or the key was rotated): the next send asks
    /// for a new one.
    pub fn forget(&self, json_key: &str, scope: &'static str) {
        if let Ok((account, _)) = ServiceAccount::parse(json_key) {
            self.cached.lock().expect("token cache").remove(&(
                account.client_email,
                account.private_key_id,
                scope,
            ));
        }
    }

    /// An access token for `scope`, from the cache or the token endpoint.
    pub async fn token(
        &self,
        http: &reqwest::Client,
        json_key: &str,
        scope: &'static str,
    ) -> Result<(ServiceAccount, String), Refusal> {
        let failed = Refusal::new;
        let (account, key) =
            ServiceAccount::parse(json_key).map_err(|e| failed("bad-credentials", e))?;
        let cache_key = (
            account.client_email.clone(),
            account.private_key_id.clone(),
            scope,
        );
        if let Some((token, until)) = self.cached.lock().expect("token cache").get(&cache_key)
            && Instant::now() < *until
        {
            return Ok((account, token.clone()));
        }
        let now = chrono::Utc::now().timestamp();
        let assertion = key.sign(
            &json!({ "alg": "RS256", "typ": "JWT", "kid": account.private_key_id }),
            &json!({
                "iss": account.client_email,
                "scope": scope,
                "aud": self.token_url,
                "iat": now,
                "exp": now + 3600,
            }),
        );
        let response = crate::retry::call(http.post(&self.token_url).form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
            ("assertion", assertion.as_str()),
        ]))
        .await
        .map_err(|e| failed("unreachable", format!("google oauth unreachable: {e}")))?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            return Err(failed(
                &format!(
                    "oauth:{}",
                    value["error"].as_str().unwrap_or(status.as_str())
                ),
                value["error_description"]
                    .as_str()
                    .unwrap_or("the token endpoint refused the service account")
                    .to_owned(),
            ));
        }
        let answer: TokenResponse = serde_json::from_str(&body).map_err(|e| {
            failed(
                "oauth:bad-answer",
                format!("the token endpoint answered without a token: {e}"),
            )
        })?;
        let lifetime = Duration::from_secs(answer.expires_in.clamp(60, 3600) - 60);
        self.cached.lock().expect("token cache").insert(
            cache_key,
            (answer.access_token.clone(), Instant::now() + lifetime),
        );
        Ok((account, answer.access_token))
    }
}

/// Google's error body: `{"error": {"code": 404, "message": …, "status": "NOT_FOUND"}}`.
pub fn error_of(status: reqwest::StatusCode, body: &serde_json::Value) -> (String, String) {
    let code = body["error"]["status"]
        .as_str()
        .map_or_else(|| status.as_u16().to_string(), str::to_owned);
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("the provider refused the request")
        .to_owned();
    (code, message)
}
