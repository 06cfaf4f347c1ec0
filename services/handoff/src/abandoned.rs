//! Handoffs their IVR never came back for. A handoff is written in progress before it sends; if
//! its sender died (a crash) or the gateway did not answer it, the IVR's retry with the same key
//! finishes it. When no retry comes (the call ended with the crash), c2m finishes it itself, from
//! the request kept on the row: the same message ids, so nothing already sent goes again.
//!
//! A handoff left for less than [`SEND_WITHIN`] is finished as a retry would (the caller asked
//! for a text moments ago, and gets it). One left longer (c2m was down a while) sends nothing new:
//! what its messages came to is looked up, and it is recorded as sent or failed accordingly.

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::CreateHandoffRequest;
use c2m_runtime::CancellationToken;
use chrono::Utc;
use prost::Message;

use crate::{
    engine::{Engine, TAKEOVER_MARGIN},
    request::Deflection,
    send::Sends,
};

/// How often handoffs left in progress are looked for.
const SWEEP: Duration = Duration::from_secs(5);
/// How many one sweep finishes at most.
const PER_SWEEP: i64 = 20;
/// Until how long after it was written an unfinished handoff may still send its first message.
pub const SEND_WITHIN: Duration = Duration::from_secs(600);

impl Engine {
    /// Finishes handoffs left in progress every [`SWEEP`] until `shutdown`.
    pub(crate) async fn run_abandoned(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            if self.store.is_ready()
                && let Err(error) = self.finish_abandoned().await
            {
                tracing::warn!(%error, "unfinished handoffs not looked at; will retry");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SWEEP) => {}
            }
        }
    }

    /// One sweep: the handoffs in progress for longer than a sender could still be at work on
    /// them, oldest first. Another replica may finish the same one at once: only one outcome is
    /// written, and the gateway sends each message id once.
    async fn finish_abandoned(&self) -> Result<usize, sqlx::Error> {
        let grace = self.peers.timeout() + TAKEOVER_MARGIN;
        let left = self.store.abandoned(grace, PER_SWEEP).await?;
        let found = left.len();
        for (handoff_id, created_at, request) in left {
            let request = match CreateHandoffRequest::decode(request.as_slice()) {
                Ok(request) => request,
                Err(error) => {
                    tracing::error!(%handoff_id, %error, "unfinished handoff's request cannot be read");
                    continue;
                }
            };
            let Ok((deflection, key)) = Deflection::from_create(&request) else {
                tracing::error!(%handoff_id, "unfinished handoff's request no longer validates");
                continue;
            };
            let Some(earlier) = self.store.load(&deflection.account_id, &handoff_id).await? else {
                continue;
            };
            let age = (Utc::now() - created_at).to_std().unwrap_or_default();
            let sends = if age < SEND_WITHIN {
                Sends::Allowed
            } else {
                Sends::KnownOnly
            };
            let fingerprint = deflection.fingerprint();
            match self
                .resume(&deflection, earlier, (&key, &fingerprint), sends)
                .await
            {
                Ok(finished) => tracing::info!(
                    %handoff_id,
                    status = finished.status.as_str_name(),
                    left_for = ?age,
                    "finished a handoff its ivr never came back for"
                ),
                Err(status) => {
                    tracing::warn!(%handoff_id, %status, "unfinished handoff not finished yet")
                }
            }
        }
        Ok(found)
    }
}
