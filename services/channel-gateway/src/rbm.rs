//! Google RCS Business Messaging: the capability check and `agentMessages.create`, on the wire as
//! Google documents them, and the signature on RBM's webhooks.

use base64::{Engine, engine::general_purpose::STANDARD};
use ring::hmac;
use serde_json::json;

use crate::{google, outcome::SendOutcome};

/// Whether the number can receive RCS from this agent: 200 with its features, or 404.
pub async fn capable(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    agent_id: &str,
    phone: &str,
) -> Result<bool, String> {
    let url = format!(
        "{}/v1/phones/{phone}/capabilities",
        base.trim_end_matches('/')
    );
    let request_id = uuid::Uuid::new_v4().to_string();
    let response = crate::retry::send(|| {
        http.get(&url)
            .bearer_auth(token)
            .query(&[("requestId", request_id.as_str()), ("agentId", agent_id)])
    })
    .await
    .map_err(|e| format!("rbm unreachable: {e}"))?;
    match response.status() {
        s if s.is_success() => Ok(true),
        reqwest::StatusCode::NOT_FOUND => Ok(false),
        s => {
            let body = response.json().await.unwrap_or_default();
            let (code, message) = google::error_of(s, &body);
            Err(format!("capability check refused: {code} {message}"))
        }
    }
}

/// A message's `contentMessage`: the text; or one file by URL; or, for a file with text, a
/// standalone rich card with the file above the text (RBM's content is one of these, not both).
pub fn content(text: &str, media_urls: &[String]) -> serde_json::Value {
    match media_urls.first() {
        None => json!({ "text": text }),
        Some(url) if text.trim().is_empty() => json!({ "contentInfo": { "fileUrl": url } }),
        Some(url) => json!({
            "richCard": {
                "standaloneCard": {
                    "cardOrientation": "VERTICAL",
                    "cardContent": {
                        "description": text,
                        "media": { "height": "MEDIUM", "contentInfo": { "fileUrl": url } },
                    },
                },
            },
        }),
    }
}

/// `POST {base}/v1/phones/{E.164}/agentMessages?messageId=…&agentId=…`. Our message id is the
/// RBM `messageId`, so a retry after a lost answer cannot send twice; it is also the id RBM's
/// events carry back. A 404 means the number is not RCS-reachable.
pub async fn send(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    agent_id: &str,
    phone: &str,
    message_id: &str,
    content: &serde_json::Value,
) -> SendOutcome {
    let url = format!(
        "{}/v1/phones/{phone}/agentMessages",
        base.trim_end_matches('/')
    );
    let body = json!({ "contentMessage": content });
    crate::retry::handing_over();
    let response = crate::retry::send_while(
        || {
            http.post(&url)
                .bearer_auth(token)
                .query(&[("messageId", message_id), ("agentId", agent_id)])
                .json(&body)
        },
        |s| s == reqwest::StatusCode::TOO_MANY_REQUESTS || s.is_server_error(),
    )
    .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return SendOutcome::unanswered("rbm", &error),
    };
    let status = response.status();
    if status.is_success() {
        return SendOutcome::Accepted {
            sid: message_id.to_owned(),
        };
    }
    let value = response.json().await.unwrap_or_default();
    let (code, message) = google::error_of(status, &value);
    if status == reqwest::StatusCode::NOT_FOUND {
        return SendOutcome::Failed {
            code: "not-rcs-reachable".into(),
            message: format!("the number is not RCS-reachable ({message})"),
        };
    }
    SendOutcome::Failed { code, message }
}

/// `X-Goog-Signature` for `data`: what the sandbox signs with, as RBM does.
pub fn signature(client_token: &str, data: &[u8]) -> String {
    STANDARD.encode(hmac::sign(&key(client_token), data))
}

/// `X-Goog-Signature`: base64 of HMAC-SHA512 under the client token over the decoded `data`.
pub fn verify(client_token: &str, data: &[u8], signature: &str) -> bool {
    let Ok(expected) = STANDARD.decode(signature.trim()) else {
        return false;
    };
    hmac::verify(&key(client_token), data, &expected).is_ok()
}

fn key(client_token: &str) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA512, client_token.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::verify;

    /// A vector computed apart from this code (Python's `hmac` with SHA-512, base64), as Google's
    /// webhook guide describes the signature.
    const DATA: &[u8] = br#"{"senderPhoneNumber":"+12223334444","eventType":"DELIVERED","eventId":"MxZfN6a1b2","messageId":"msg-1","agentId":"acme-agent"}"#;
    const SIGNATURE: &str =
        "KigwPtuaIdbfqKgHS24nRh98HCr59QmW2k7Cpo0sPT3N45Y12NXRtfPAcuII7jxXiTEOt7s0xF1CJEef2sIaXQ==";

    #[test]
    fn the_signature_is_hmac_sha512_of_the_decoded_data_under_the_client_token() {
        assert!(verify("SJENCPGJESMGUFPY", DATA, SIGNATURE));
        assert!(
            !verify("SJENCPGJESMGUFPZ", DATA, SIGNATURE),
            "another token"
        );
        assert!(
            !verify("SJENCPGJESMGUFPY", &DATA[1..], SIGNATURE),
            "other bytes"
        );
        assert!(!verify("SJENCPGJESMGUFPY", DATA, "not base64!"));
    }
}
