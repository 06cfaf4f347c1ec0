//! Keeping the hot path's configuration caches fresh: Config streams what changes (WatchConfig)
//! and the matching entries are dropped at once. While the stream is down the caches' TTL bounds
//! staleness instead, and everything cached is dropped whenever the stream (re)starts, since
//! changes may have been missed.

use c2m_proto::v1::{self as pb, ConfigResource};
use c2m_runtime::{
    CancellationToken,
    config_changes::{self, Notice},
};

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

    /// Follows WatchConfig until `shutdown`, dropping what each notice names.
    pub(crate) async fn follow_config(self, shutdown: CancellationToken) {
        let peers = self.peers.clone();
        config_changes::follow(peers, shutdown, "handoff", |notice| match notice {
            Notice::Everything => self.drop_cached_config(),
            Notice::Changed(change) => self.forget(change),
        })
        .await;
    }
}
