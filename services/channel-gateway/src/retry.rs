//! Retrying a provider that says "too many requests": only then (a refused request was not
//! accepted, so sending it again cannot duplicate a message), a bounded number of times, after the
//! wait it asks for (`Retry-After`) or an exponential backoff with jitter, and never for longer than
//! a caller on the line can wait.

use std::time::Duration;

/// Tries after the first.
const RETRIES: u32 = 2;
/// The longest single wait, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(2);

/// Sends the request `build` makes until it is not a 429, or the retries are spent.
pub async fn send(
    build: impl Fn() -> reqwest::RequestBuilder,
) -> reqwest::Result<reqwest::Response> {
    send_while(build, |status| {
        status == reqwest::StatusCode::TOO_MANY_REQUESTS
    })
    .await
}

/// Like [`send`], for a provider that also says when another status is safe to retry (FCM's
/// 500 and 503; RBM's 5xx, where the `messageId` makes a repeat harmless).
pub async fn send_while(
    build: impl Fn() -> reqwest::RequestBuilder,
    retryable: impl Fn(reqwest::StatusCode) -> bool,
) -> reqwest::Result<reqwest::Response> {
    let mut attempt = 0;
    loop {
        let response = build().send().await?;
        if !retryable(response.status()) || attempt == RETRIES {
            return Ok(response);
        }
        let wait = retry_after(&response).unwrap_or_else(|| backoff(attempt));
        tracing::info!(
            attempt,
            wait_ms = wait.as_millis() as u64,
            status = response.status().as_u16(),
            "provider asked for a retry, retrying"
        );
        tokio::time::sleep(wait.min(MAX_WAIT)).await;
        attempt += 1;
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: f64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// 100 ms, 200 ms, 400 ms, … with up to half again of jitter, so replicas do not retry in step.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100 * (1 << attempt.min(5)));
    let mut byte = [0u8; 1];
    let jitter = getrandom::fill(&mut byte).map_or(0, |()| u64::from(byte[0]));
    base + base.mul_f64(jitter as f64 / 510.0)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_and_stays_jittered_within_half() {
        for attempt in 0..3 {
            let base = Duration::from_millis(100 * (1 << attempt));
            let wait = backoff(attempt);
            assert!(
                wait >= base && wait <= base.mul_f64(1.5),
                "{attempt}: {wait:?}"
            );
        }
    }
}
