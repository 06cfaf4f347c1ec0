//! One webhook delivery as the Standard Webhooks specification has it: `webhook-id` (the same on
//! every retry of one event), `webhook-timestamp` (Unix seconds), and `webhook-signature`, a
//! `v1,<base64>` entry per valid secret, each the HMAC-SHA256 of `{id}.{timestamp}.{body}`.

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::STANDARD};
use chrono::Utc;
use ring::hmac;

use crate::model::WebhookDelivery;

/// The prefix of a secret as admins see it.
const SECRET_PREFIX: &str = "whsec_";

/// 32 random bytes, and how the admin is shown them (`whsec_` and base64).
pub(crate) fn new_secret() -> Result<(Vec<u8>, String), getrandom::Error> {
    let mut bytes = vec![0u8; 32];
    getrandom::fill(&mut bytes)?;
    let shown = format!("{SECRET_PREFIX}{}", STANDARD.encode(&bytes));
    Ok((bytes, shown))
}

/// The `webhook-signature` header: one `v1,` entry per secret.
pub(crate) fn signature(secrets: &[&[u8]], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| {
            let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, secret));
            mac.update(format!("{id}.{timestamp}.").as_bytes());
            mac.update(body);
            format!("v1,{}", STANDARD.encode(mac.sign()))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What to post.
pub(crate) struct Message<'a> {
    pub endpoint_id: &'a str,
    pub url: &'a str,
    pub secrets: Vec<&'a [u8]>,
    pub webhook_id: &'a str,
    pub event_type: &'a str,
    pub body: &'a [u8],
    pub attempt: u32,
}

/// Posts `m` once; the delivery as it went. A 2xx is success; anything else, or no answer
/// within the client's timeout, is a failure to retry.
pub(crate) async fn post(http: &reqwest::Client, m: &Message<'_>) -> WebhookDelivery {
    let at = Utc::now();
    let timestamp = at.timestamp();
    let started = Instant::now();
    let answer = http
        .post(m.url)
        .header("content-type", "application/json")
        .header("user-agent", "c2m-webhooks/1")
        .header("webhook-id", m.webhook_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header(
            "webhook-signature",
            signature(&m.secrets, m.webhook_id, timestamp, m.body),
        )
        .body(m.body.to_vec())
        .send()
        .await;
    let (http_status, error) = match answer {
        Ok(response) if response.status().is_success() => (response.status().as_u16(), None),
        Ok(response) => (
            response.status().as_u16(),
            Some(format!("answered {}", response.status())),
        ),
        Err(error) if error.is_timeout() => (0, Some("no answer in time".to_owned())),
        Err(error) if error.is_connect() => (0, Some("connection refused".to_owned())),
        Err(error) => (0, Some(format!("failed: {error}"))),
    };
    WebhookDelivery {
        endpoint_id: m.endpoint_id.to_owned(),
        webhook_id: m.webhook_id.to_owned(),
        event_type: m.event_type.to_owned(),
        attempt: m.attempt,
        http_status,
        succeeded: error.is_none(),
        error: error.unwrap_or_default(),
        duration_ms: u32::try_from(started.elapsed().as_millis()).unwrap_or(u32::MAX),
        at,
    }
}

/// How long to wait before attempt `attempt + 1`: doubling from `base` up to `max`, with up to
/// half again at random, so endpoints failing together do not retry together.
pub(crate) fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    c2m_runtime::backoff::Backoff::new(base, max).jittered(attempt.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's own example: this secret, id, timestamp and body sign to this.
    #[test]
    fn signs_the_specifications_test_vector() {
        let secret = STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .expect("base64");
        assert_eq!(
            signature(
                &[&secret],
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_valid_secret_signs() {
        let header = signature(&[b"old", b"new"], "msg_1", 1, b"{}");
        assert_eq!(header.split(' ').count(), 2);
        assert!(header.split(' ').all(|entry| entry.starts_with("v1,")));
    }

    #[test]
    fn backoff_doubles_within_its_bounds() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for attempt in 1..30 {
            let wait = backoff(attempt, base, max);
            let floor = base.saturating_mul(1u32 << (attempt - 1).min(20)).min(max);
            assert!(
                wait >= floor && wait <= floor.mul_f64(1.5).min(max),
                "{attempt}: {wait:?}"
            );
        }
    }
}
