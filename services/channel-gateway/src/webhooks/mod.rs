//! Provider webhooks on an HTTP listener of their own (the one port to expose publicly). Every
//! request is verified against the provider's signature before anything else is done with it,
//! stored in the inbox before it is acknowledged, and processed once however often it is retried.

mod from_google;
mod from_meta;
mod from_twilio;

use axum::{
    Router,
    body::Bytes,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tonic::Code;

use crate::{
    Service,
    messages::{self, StatusReport},
};

pub fn router(service: Service) -> Router {
    Router::new()
        .route(
            "/webhooks/twilio/{account_id}/status",
            post(from_twilio::status),
        )
        .route(
            "/webhooks/twilio/{account_id}/inbound",
            post(from_twilio::inbound),
        )
        .route("/webhooks/google/{account_id}", post(from_google::events))
        .route(
            "/webhooks/meta/{account_id}",
            get(from_meta::verify).post(from_meta::events),
        )
        .with_state(service)
}

/// Stores a verified status report in the inbox and, the first time it arrives, moves the message
/// forward; returns how many events (funnel events, or a conversation message's stages for
/// Routing) that wrote, and has them shipped.
pub(super) async fn take_status(
    service: &Service,
    dedup_key: &str,
    body: &Bytes,
    report: StatusReport<'_>,
) -> Result<usize, sqlx::Error> {
    let mut tx = service.store.begin().await?;
    let mut events = 0;
    if tx.store(dedup_key, body).await? {
        events = messages::advance(&mut *tx, &report).await?;
        tx.processed(dedup_key).await?;
    }
    tx.commit().await?;
    if events > 0 {
        service.relay.wake();
        service.stages.wake();
    }
    Ok(events)
}

/// Stores a verified inbound message in the inbox and, unless it was handled before, hands it to
/// Routing with `deliver`. `Err` is the response that makes the provider retry (storage or Routing
/// unavailable); an inbound message Routing has nothing for (FAILED_PRECONDITION) is final.
pub(super) async fn deliver_once<F, Fut>(
    service: &Service,
    dedup_key: &str,
    body: &Bytes,
    deliver: F,
) -> Result<(), Response>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let fresh = async {
        let mut tx = service.store.begin().await?;
        let fresh = tx.store(dedup_key, body).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(fresh)
    }
    .await
    .map_err(unavailable)?;
    if !fresh {
        return Ok(());
    }
    match deliver().await {
        Ok(()) => {}
        Err(status) if status.code() == Code::FailedPrecondition => {
            tracing::info!(
                dedup_key,
                reason = status.message(),
                "inbound message not routed"
            );
        }
        Err(status) => {
            tracing::warn!(dedup_key, %status, "inbound message: routing unavailable, the provider will retry");
            count_unavailable();
            return Err(StatusCode::SERVICE_UNAVAILABLE.into_response());
        }
    }
    let marked = async {
        let mut tx = service.store.begin().await?;
        tx.processed(dedup_key).await?;
        tx.commit().await
    }
    .await;
    if let Err(error) = marked {
        // Routing de-duplicates by message id, so a retry after this is harmless.
        tracing::warn!(%error, "inbound message routed but not marked processed");
    }
    Ok(())
}

pub(super) fn unavailable(error: sqlx::Error) -> Response {
    tracing::warn!(%error, "webhook: storage unavailable");
    count_unavailable();
    StatusCode::SERVICE_UNAVAILABLE.into_response()
}

/// A webhook answered 503: the provider (or the sandbox) posts it again.
fn count_unavailable() {
    c2m_runtime::metrics::metrics().webhooks_unavailable.inc();
}
