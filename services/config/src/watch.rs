//! Change notification for readers' caches: every change commits a PostgreSQL `NOTIFY` beside its
//! audit record; each Config replica listens and fans the notices out to its `WatchConfig`
//! streams, so a reader hears of a change made on any replica within milliseconds. The embedded
//! store (one process, no `NOTIFY`) publishes each change itself once it has committed.

use std::{pin::Pin, time::Duration};

use c2m_proto::v1::{ConfigResource, WatchConfigResponse};
use futures::Stream;
use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// The PostgreSQL notification channel.
pub const CHANNEL: &str = "c2m_config";

/// One change: the account and the resource path (`handoff_configs/billing`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub account_id: String,
    pub resource: String,
}

impl Change {
    fn parse(payload: &str) -> Option<Self> {
        let (account_id, resource) = payload.split_once('\n')?;
        Some(Self {
            account_id: account_id.to_owned(),
            resource: resource.to_owned(),
        })
    }

    fn to_wire(&self, sequence: i64) -> WatchConfigResponse {
        let (kind, id) = self
            .resource
            .split_once('/')
            .unwrap_or((&self.resource, ""));
        let resource = match kind {
            "accounts" => ConfigResource::Account,
            "handoff_configs" => ConfigResource::HandoffConfig,
            "whatsapp_templates" => ConfigResource::WhatsappTemplate,
            "api_keys" => ConfigResource::ApiKey,
            _ => ConfigResource::Unspecified,
        };
        WatchConfigResponse {
            sequence,
            account_id: self.account_id.clone(),
            resource: resource as i32,
            resource_id: if resource == ConfigResource::Account {
                String::new()
            } else {
                id.to_owned()
            },
        }
    }
}

/// Fans PostgreSQL notices out to watchers.
#[derive(Debug, Clone)]
pub struct Watch {
    sender: broadcast::Sender<Change>,
}

pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<WatchConfigResponse, Status>> + Send>>;

impl Watch {
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(4096).0,
        }
    }

    /// Listens until `shutdown`, reconnecting after failures. Watchers hear nothing meanwhile and
    /// keep their caches' time bounds as the fallback.
    pub async fn listen(self, pool: PgPool, shutdown: CancellationToken) {
        loop {
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::debug!(%error, "config watch: cannot listen yet");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            if let Err(error) = listener.listen(CHANNEL).await {
                tracing::warn!(%error, "config watch: LISTEN failed");
                continue;
            }
            loop {
                let notice = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    notice = listener.recv() => notice,
                };
                match notice {
                    Ok(notice) => {
                        if let Some(change) = Change::parse(notice.payload()) {
                            // No receivers is fine: nobody is watching.
                            let _ = self.sender.send(change);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "config watch: listener lost, reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// Tells this replica's watchers of a committed change. The embedded store calls it after each
    /// commit: one process, so no notice has to cross a database.
    pub fn publish(&self, account_id: &str, resource: &str) {
        // No receivers is fine: nobody is watching.
        let _ = self.sender.send(Change {
            account_id: account_id.to_owned(),
            resource: resource.to_owned(),
        });
    }

    /// The changes from now on, of one account or (empty) all. A watcher that falls behind gets
    /// DATA_LOSS and should drop its caches and subscribe again.
    pub fn subscribe(&self, account_id: String) -> ChangeStream {
        let mut receiver = self.sender.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut sequence = 0;
            loop {
                let item = match receiver.recv().await {
                    Ok(change) if account_id.is_empty() || change.account_id == account_id => {
                        sequence += 1;
                        Ok(change.to_wire(sequence))
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Err(Status::data_loss(format!(
                            "missed {missed} changes: drop cached configuration and watch again"
                        )))
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = item.is_err();
                // The watcher hung up.
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

impl Default for Watch {
    fn default() -> Self {
        Self::new()
    }
}
