//! Following Config's change notices (`WatchConfig`), for services that cache what Config says:
//! each notice names what changed, so the matching entries can be dropped at once. While the
//! stream is down the caches' TTL bounds staleness instead; whenever it (re)starts or ends,
//! everything cached should be dropped, since changes may have been missed.

use std::time::Duration;

use c2m_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::peers::Peers;

/// What a follower hears.
#[derive(Debug, Clone, Copy)]
pub enum Notice<'a> {
    /// Changes may have been missed: drop everything cached.
    Everything,
    /// This changed.
    Changed(&'a pb::WatchConfigResponse),
}

/// Follows WatchConfig until `shutdown`, resubscribing after a second when the stream ends, and
/// tells `heard` of every notice.
pub async fn follow(
    peers: Peers,
    shutdown: CancellationToken,
    service: &'static str,
    heard: impl Fn(Notice<'_>),
) {
    let mut healthy = false;
    loop {
        let mut config = peers.config();
        let subscribed = tokio::select! {
            _ = shutdown.cancelled() => return,
            subscribed = config.watch_config(pb::WatchConfigRequest::default()) => subscribed,
        };
        match subscribed {
            Ok(response) => {
                if !healthy {
                    tracing::info!(service, "following configuration changes");
                    healthy = true;
                }
                heard(Notice::Everything);
                let mut changes = response.into_inner();
                loop {
                    let change = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        change = changes.message() => change,
                    };
                    match change {
                        Ok(Some(change)) => heard(Notice::Changed(&change)),
                        Ok(None) | Err(_) => break,
                    }
                }
                heard(Notice::Everything);
            }
            Err(status) => {
                if healthy {
                    tracing::warn!(service, %status, "configuration changes unavailable: caches fall back to their ttl");
                    healthy = false;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
