//! Keeping the hot path's configuration caches fresh: Config streams what changes (WatchConfig)
//! and the matching entries are dropped at once. While the stream is down the caches' TTL bounds
//! staleness instead, and everything cached is dropped whenever the stream (re)starts, since
//! changes may have been missed.

use std::time::Duration;

use c2m_proto::v1::{self as pb, ConfigResource};
use c2m_runtime::CancellationToken;

use crate::Service;

impl Service {
    fn drop_cached_config(&self) {
        self.accounts.clear();
        self.configs.clear();
        self.api_keys.clear();
        self.templates.clear();
    }

    fn forget(&self, change: &pb::WatchConfigResponse) {
        match ConfigResource::try_from(change.resource).unwrap_or_default() {
            ConfigResource::Account => self.accounts.remove(&change.account_id),
            ConfigResource::HandoffConfig => self
                .configs
                .remove(&(change.account_id.clone(), change.resource_id.clone())),
            // Keys are cached by the digest of the key, which a notice does not carry.
            ConfigResource::ApiKey => self.api_keys.clear(),
            ConfigResource::WhatsappTemplate => self
                .templates
                .remove(&(change.account_id.clone(), change.resource_id.clone())),
            ConfigResource::Unspecified => {}
        }
    }

    /// Follows WatchConfig until `shutdown`, resubscribing after a second when the stream ends.
    pub(crate) async fn follow_config(self, shutdown: CancellationToken) {
        let mut healthy = false;
        loop {
            let mut config = self.peers.config();
            let subscribed = tokio::select! {
                _ = shutdown.cancelled() => return,
                subscribed = config.watch_config(pb::WatchConfigRequest::default()) => subscribed,
            };
            match subscribed {
                Ok(response) => {
                    if !healthy {
                        tracing::info!("following configuration changes");
                        healthy = true;
                    }
                    self.drop_cached_config();
                    let mut changes = response.into_inner();
                    loop {
                        let change = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            change = changes.message() => change,
                        };
                        match change {
                            Ok(Some(change)) => self.forget(&change),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    self.drop_cached_config();
                }
                Err(status) => {
                    if healthy {
                        tracing::warn!(%status, "configuration changes unavailable: caches fall back to their ttl");
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
}
