//! The built-in sandbox: plays Twilio and the consumer for accounts without Twilio credentials. It
//! accepts a message, then posts the webhooks Twilio would — `sent`, `delivered` (or `undelivered`)
//! and, when configured, the consumer's reply — to this gateway's own public webhook URL, signed
//! the way Twilio signs, so they take exactly the path real webhooks take.

use std::time::Duration;

use c2m_proto::v1::SandboxCredentials;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::twilio;

/// The number the sandbox sends from (Twilio's own magic test number).
pub const FROM: &str = "+15005550006";

/// The auth token sandbox webhooks are signed with: derived from the credentials key, so every
/// gateway replica verifies what any replica's sandbox posted.
pub fn auth_token(credentials_key: &str, account_id: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(credentials_key.as_bytes())
        .expect("hmac accepts any key length");
    mac.update(b"c2m-sandbox\0");
    mac.update(account_id.as_bytes());
    hex::encode(mac.finalize().into_bytes())
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

/// Plays the provider and the consumer for one accepted message, in the background.
pub fn simulate(http: reqwest::Client, sim: Simulation) {
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
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"reply").expect("any key length");
    mac.update(message_sid.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

async fn post(http: &reqwest::Client, url: &str, auth_token: &str, params: &[(&str, String)]) {
    let owned: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let signature = twilio::signature(auth_token, url, &owned);
    let result = http
        .post(url)
        .header("X-Twilio-Signature", signature)
        .form(&owned)
        .send()
        .await;
    match result {
        Ok(response) if response.status().is_success() => {}
        Ok(response) => tracing::warn!(url, status = %response.status(), "sandbox webhook refused"),
        Err(error) => {
            tracing::warn!(url, %error, "sandbox webhook not delivered (is channel_gateway.public_url reachable?)")
        }
    }
}
