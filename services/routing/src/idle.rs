//! Keeps conversations and their log tidy. Closes conversations in which nothing has been said
//! for the account's `idle_close_minutes`
//! (Config's account settings; 0: never), with reason `idle`, so that the consumer's lease is
//! released and their next call can be deflected again. Every replica sweeps; closing is
//! idempotent and skips a conversation that moved since it was picked. Forgets log events older
//! than `routing.log_retention_days`.

use c2m_proto::v1 as pb;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::{Service, desk::Closing};

/// Conversations closed per account in one sweep; the rest wait for the next.
const PER_SWEEP: i64 = 500;

impl Service {
    pub(crate) async fn close_idle(self, shutdown: CancellationToken) {
        if !self.store.until_ready(&shutdown).await {
            return;
        }
        let mut every = tokio::time::interval(self.idle_sweep);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            if let Err(error) = self.sweep().await {
                tracing::warn!(%error, "idle conversations: sweep failed, trying again later");
            }
            let cutoff = Utc::now()
                - chrono::Duration::from_std(self.log_retention).unwrap_or(chrono::Duration::MAX);
            match self.store.prune_log(cutoff).await {
                Ok(0) => {}
                Ok(forgotten) => {
                    tracing::info!(forgotten, "conversation log: old events forgotten")
                }
                Err(error) => tracing::warn!(%error, "conversation log: old events not pruned"),
            }
        }
    }

    async fn sweep(&self) -> Result<(), sqlx::Error> {
        let accounts = self.store.accounts_with_open_conversations().await?;
        for account_id in accounts {
            let minutes = match self
                .peers
                .config()
                .get_account(pb::GetAccountRequest {
                    account_id: account_id.clone(),
                })
                .await
            {
                Ok(answer) => answer
                    .into_inner()
                    .account
                    .and_then(|a| a.settings)
                    .map_or(0, |s| s.idle_close_minutes),
                Err(status) => {
                    tracing::debug!(%status, account_id, "idle conversations: no settings");
                    continue;
                }
            };
            if minutes == 0 {
                continue;
            }
            let since = Utc::now() - chrono::Duration::minutes(i64::from(minutes));
            let idle = self.store.idle(&account_id, since, PER_SWEEP).await?;
            for conversation_id in idle {
                let closed = self
                    .close(Closing {
                        account_id: &account_id,
                        conversation_id: &conversation_id,
                        reason: "idle",
                        by: "c2m",
                        skills: None,
                        idle_since: Some(since),
                    })
                    .await;
                if let Err(error) = closed {
                    tracing::warn!(%error, account_id, conversation_id, "idle conversation not closed");
                }
            }
        }
        Ok(())
    }
}
