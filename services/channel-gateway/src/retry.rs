//! Retrying a provider that says "too many requests": only then (a refused request was not
//! accepted, so sending it again cannot duplicate a message), a bounded number of times, after the
//! wait it asks for (`Retry-After`) or an exponential backoff with jitter, and never for longer than
//! a caller on the line can wait.
//!
//! A send's calls to its provider, retries included, share one deadline ([`within`]): past it
//! no retry starts and no request waits, so the gateway answers before Handoff stops waiting for
//! it. Handoff taking a late answer for a failure would try the next channel, and a consumer whose
//! first message went after all would get two.

use std::{
    future::Future,
    time::{Duration, Instant},
};

tokio::task_local! {
    /// When the send being made must have its answer.
    static DEADLINE: Instant;
    /// Whether the send has put a message on its way to a provider (see [`handing_over`]).
    static HANDED_OVER: std::cell::Cell<bool>;
}

/// Runs `send` with `budget` for every provider call it makes through this module; with whether
/// it handed a message to a provider (whatever came of it).
pub async fn within<F: Future>(budget: Duration, send: F) -> (F::Output, bool) {
    HANDED_OVER
        .scope(std::cell::Cell::new(false), async {
            let output = DEADLINE.scope(Instant::now() + budget, send).await;
            (output, HANDED_OVER.with(std::cell::Cell::get))
        })
        .await
}

/// Says that the send is about to hand its message to a provider: from here on, whatever goes
/// wrong, the provider may have it. Called just before a message's request leaves.
pub fn handing_over() {
    let _ = HANDED_OVER.try_with(|handed| handed.set(true));
}

/// Whether a wait of `wait` still leaves time before the send's deadline (always, outside
/// [`within`]).
pub fn time_for(wait: Duration) -> bool {
    DEADLINE
        .try_with(|deadline| Instant::now() + wait < *deadline)
        .unwrap_or(true)
}

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

/// Sends one request to a provider in a client span of its own, which the request carries
/// (`traceparent`): the provider call is part of the handoff's trace.
pub async fn call(request: reqwest::RequestBuilder) -> reqwest::Result<reqwest::Response> {
    use tracing::Instrument;
    let (client, request) = request.build_split();
    let mut request = request?;
    let host = request.url().host_str().unwrap_or_default().to_owned();
    let span = tracing::info_span!(
        "provider",
        otel.name = %format!("{} {host}", request.method()),
        otel.kind = "client",
        http.request.method = %request.method(),
        server.address = %host,
        http.response.status_code = tracing::field::Empty,
    );
    c2m_runtime::trace_layer::inject(&span, request.headers_mut());
    let response = client.execute(request).instrument(span.clone()).await?;
    span.record("http.response.status_code", response.status().as_u16());
    Ok(response)
}

/// Like [`send`], for a provider that also says when another status is safe to retry (FCM's
/// 500 and 503; RBM's 5xx, where the `messageId` makes a repeat harmless).
pub async fn send_while(
    build: impl Fn() -> reqwest::RequestBuilder,
    retryable: impl Fn(reqwest::StatusCode) -> bool,
) -> reqwest::Result<reqwest::Response> {
    let deadline = DEADLINE.try_with(|deadline| *deadline).ok();
    let mut attempt = 0;
    loop {
        let mut request = build();
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            request = request.timeout(left.max(Duration::from_millis(1)));
        }
        let response = call(request).await?;
        if !retryable(response.status()) || attempt == RETRIES {
            return Ok(response);
        }
        let wait = retry_after(&response)
            .unwrap_or_else(|| backoff(attempt))
            .min(MAX_WAIT);
        if !time_for(wait) {
            tracing::info!(
                attempt,
                status = response.status().as_u16(),
                "provider asked for a retry, no time left for one"
            );
            return Ok(response);
        }
        tracing::info!(
            attempt,
            wait_ms = wait.as_millis() as u64,
            status = response.status().as_u16(),
            "provider asked for a retry, retrying"
        );
        tokio::time::sleep(wait).await;
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
    c2m_runtime::backoff::Backoff::new(Duration::from_millis(100), Duration::from_millis(3_200))
        .jittered(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    /// A provider that answers every request 429 with `Retry-After: <retry_after>`; its URL and
    /// how many requests it got.
    async fn always_busy(retry_after: &'static str) -> (String, Arc<AtomicUsize>) {
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let app = axum::Router::new().route(
            "/send",
            axum::routing::post(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    (
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", retry_after)],
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let url = format!("http://{}/send", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, requests)
    }

    #[tokio::test]
    async fn retries_stop_at_the_sends_deadline() {
        let http = reqwest::Client::new();

        // Outside a send's deadline: the first request and both retries.
        let (url, requests) = always_busy("0.1").await;
        let response = send(|| http.post(&url)).await.expect("answered");
        assert_eq!(response.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(requests.load(Ordering::SeqCst), 3);

        // Within 1.5 s, a provider asking for 1 s: after the first retry (at 1 s at the
        // earliest) another wait would end past the deadline, so the refusal stands.
        let (url, requests) = always_busy("1").await;
        let (response, handed_over) =
            within(Duration::from_millis(1_500), send(|| http.post(&url))).await;
        let response = response.expect("answered");
        assert!(!handed_over, "a bare request is not a message handed over");
        assert_eq!(response.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
        assert!(
            requests.load(Ordering::SeqCst) < 3,
            "{} requests",
            requests.load(Ordering::SeqCst)
        );
    }

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
