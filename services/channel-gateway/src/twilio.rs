//! Twilio's Messages API and its webhook signatures, on the wire as Twilio documents them.

use base64::{Engine, engine::general_purpose::STANDARD};
use c2m_proto::v1::{FunnelStage, TwilioCredentials};
use ring::hmac;
use serde::Deserialize;

use crate::outcome::SendOutcome;

#[derive(Debug, Deserialize)]
struct MessageResource {
    sid: Option<String>,
    error_code: Option<serde_json::Value>,
    error_message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorResource {
    code: Option<serde_json::Value>,
    message: Option<String>,
}

fn code_text(value: Option<serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// `POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded, HTTP Basic.
pub async fn send_sms(
    http: &reqwest::Client,
    base: &str,
    credentials: &TwilioCredentials,
    to: &str,
    body: &str,
    media_urls: &[String],
    status_callback: &str,
) -> SendOutcome {
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        base.trim_end_matches('/'),
        credentials.account_sid
    );
    let mut form = vec![
        ("To", to),
        ("Body", body),
        ("StatusCallback", status_callback),
    ];
    for url in media_urls {
        form.push(("MediaUrl", url));
    }
    if credentials.messaging_service_sid.is_empty() {
        form.push(("From", credentials.from_number.as_str()));
    } else {
        form.push((
            "MessagingServiceSid",
            credentials.messaging_service_sid.as_str(),
        ));
    }
    crate::retry::handing_over();
    let response = match crate::retry::send(|| {
        http.post(&url)
            .basic_auth(&credentials.account_sid, Some(&credentials.auth_token))
            .form(&form)
    })
    .await
    {
        Ok(response) => response,
        Err(error) => return SendOutcome::unanswered("twilio", &error),
    };
    let status = response.status();
    let text = match response.text().await {
        Ok(text) => text,
        // Twilio answered, but its answer broke off: a 2xx means it has the message.
        Err(error) if status.is_success() => return SendOutcome::unanswered("twilio", &error),
        Err(_) => String::new(),
    };
    if status.is_success() {
        match serde_json::from_str::<MessageResource>(&text) {
            Ok(MessageResource {
                sid: Some(sid),
                error_code,
                error_message,
            }) => match code_text(error_code) {
                Some(code) => SendOutcome::Failed {
                    code,
                    message: error_message.unwrap_or_default(),
                },
                None => SendOutcome::Accepted { sid },
            },
            _ => SendOutcome::Failed {
                code: "bad-response".into(),
                message: format!("twilio answered {status} without a message sid"),
            },
        }
    } else if status.is_server_error() {
        // A 5xx may come after Twilio took the message, and its Messages API has no idempotency
        // key to ask again with: the message may be on its way, and its status callbacks (whose
        // URL carries our id) tell.
        SendOutcome::Unconfirmed {
            why: format!(
                "twilio answered {status}: {}",
                text.chars().take(200).collect::<String>()
            ),
        }
    } else {
        let error: Option<ErrorResource> = serde_json::from_str(&text).ok();
        SendOutcome::Failed {
            code: error
                .as_ref()
                .and_then(|e| code_text(e.code.clone()))
                .unwrap_or_else(|| status.as_u16().to_string()),
            message: error
                .and_then(|e| e.message)
                .unwrap_or_else(|| format!("twilio answered {status}")),
        }
    }
}

/// HMAC-SHA1 keyed with the auth token over the URL and every POST parameter's name and value,
/// sorted by name: what `X-Twilio-Signature` carries, base64-encoded.
fn signed_data(url: &str, params: &[(String, String)]) -> Vec<u8> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = url.as_bytes().to_vec();
    for (name, value) in sorted {
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(value.as_bytes());
    }
    data
}

fn key(auth_token: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes())
}

/// The `X-Twilio-Signature` Twilio sends for a request to `url` with `params`.
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    STANDARD.encode(hmac::sign(&key(auth_token), &signed_data(url, params)))
}

/// Checks a presented `X-Twilio-Signature` in constant time.
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], presented: &str) -> bool {
    let Ok(presented) = STANDARD.decode(presented.trim()) else {
        return false;
    };
    hmac::verify(&key(auth_token), &signed_data(url, params), &presented).is_ok()
}

/// The funnel stage a Twilio `MessageStatus` reports, if it reports one.
pub fn stage(message_status: &str) -> Option<FunnelStage> {
    match message_status {
        "accepted" | "scheduled" | "queued" | "sending" | "sent" => Some(FunnelStage::Sent),
        "delivered" => Some(FunnelStage::Delivered),
        "read" => Some(FunnelStage::Read),
        "undelivered" | "failed" => Some(FunnelStage::Failed),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection refused reached no provider: a failure, and the next channel may go. A
    /// provider that took the request and never answered may have the message: unconfirmed.
    #[tokio::test]
    async fn a_send_without_an_answer_is_unconfirmed_unless_it_never_connected() {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_millis(200))
            .build()
            .expect("client");

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let refused_at = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let refused = http.post(&refused_at).send().await.expect_err("refused");
        assert!(matches!(
            SendOutcome::unanswered("twilio", &refused),
            SendOutcome::Failed { code, .. } if code == "unreachable"
        ));

        // Accepts the connection, reads the request, never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let silent_at = format!("http://{}", silent.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let (socket, _) = silent.accept().await.expect("accepts");
            std::future::pending::<()>().await;
            drop(socket);
        });
        let timed_out = http
            .post(&silent_at)
            .body("To=%2B14155550123")
            .send()
            .await
            .expect_err("times out");
        assert!(matches!(
            SendOutcome::unanswered("twilio", &timed_out),
            SendOutcome::Unconfirmed { .. }
        ));
        server.abort();
    }

    fn pairs(raw: &[(&str, &str)]) -> Vec<(String, String)> {
        raw.iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    /// Twilio's own published example (auth token `12345`).
    #[test]
    fn matches_twilios_published_example() {
        let params = pairs(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]);
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            signature("12345", url, &params),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
        assert!(verify(
            "12345",
            url,
            &params,
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        ));
        assert!(!verify(
            "12346",
            url,
            &params,
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        ));
        let mut tampered = params.clone();
        tampered[2].1 = "9999".into();
        assert!(!verify(
            "12345",
            url,
            &tampered,
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        ));
        assert!(!verify("12345", url, &params, "not base64!"));
    }
}
