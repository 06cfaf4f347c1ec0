//! Keeping the hot path's configuration caches fresh: Config streams what changes (WatchConfig)
//! and the matching entries are dropped at once. While the stream is down the caches' TTL bounds
//! staleness instead, and everything cached is dropped whenever the stream (re)starts, since
//! changes may have been missed.

use std::sync::Arc;

use c2m_proto::v1::ConfigResource;
use c2m_runtime::{
    CancellationToken,
    api_keys::ApiKeys,
    config_changes::{self, Notice},
    peers::Peers,
};

use crate::upstream::Upstream;

/// Follows WatchConfig until `shutdown`, dropping what each notice names from `upstream`'s
/// caches and the API keys'.
pub(crate) async fn follow_config(
    peers: Peers,
    upstream: Arc<dyn Upstream>,
    api_keys: Arc<ApiKeys>,
    shutdown: CancellationToken,
) {
    // Notices arrive one at a time; forgetting is quick, and done in order.
    let (forget, mut forgotten) = tokio::sync::mpsc::unbounded_channel();
    let follower = config_changes::follow(peers, shutdown, "handoff", move |notice| {
        match &notice {
            Notice::Everything => api_keys.clear(),
            // Keys are cached by the digest of the key, which a notice does not carry.
            Notice::Changed(change) if change.resource() == ConfigResource::ApiKey => {
                api_keys.clear()
            }
            Notice::Changed(_) => {}
        }
        let _ = forget.send(match notice {
            Notice::Everything => None,
            Notice::Changed(change) => Some(change.clone()),
        });
    });
    let forgetting = async {
        while let Some(change) = forgotten.recv().await {
            upstream.forget(change.as_ref()).await;
        }
    };
    tokio::join!(follower, forgetting);
}
