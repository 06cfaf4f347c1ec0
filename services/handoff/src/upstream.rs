//! Everything Handoff reads from other services, behind one trait: Config (accounts,
//! configurations, templates, cached), Routing (the consumer) and the channel gateway
//! (reachability, line type). [`Peered`] reads through `Peers`, which reaches a peer over the
//! network or, when roles share a process, in it. Wire answers become domain types here.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use c2m_proto::v1::{self as pb, Channel, ConfigResource, WhatsAppTemplateStatus};
use c2m_runtime::peers::Peers;
use moka::future::Cache;

use crate::{
    error::Error,
    model::{Account, AppleInvite, Consumer, HandoffConfig, Reach, Template},
};

/// What the hot path reads from other services.
#[async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// The account's settings.
    async fn account(&self, account_id: &str) -> Result<Arc<Account>, Error>;
    async fn handoff_config(&self, account_id: &str, id: &str)
    -> Result<Arc<HandoffConfig>, Error>;
    async fn template(&self, account_id: &str, id: &str) -> Result<Arc<Template>, Error>;
    /// What Routing knows of the consumer; `pending_invite_hours` > 0 asks for a pending Apple
    /// Messages invite younger than that.
    async fn consumer(
        &self,
        account_id: &str,
        phone: &str,
        pending_invite_hours: u32,
    ) -> Result<Consumer, Error>;
    /// What the gateway knows of reaching the consumer on `channel`.
    async fn reach(
        &self,
        account_id: &str,
        channel: Channel,
        phone: &str,
        consumer_id: &str,
    ) -> Result<Reach, Error>;
    /// Whether the number is a landline (the numbering plan, a cache, or a paid lookup).
    async fn is_landline(&self, account_id: &str, phone: &str) -> Result<bool, Error>;
    /// Forgets what a Config change notice names; everything, for `None` (the notice stream
    /// restarted, and changes may have been missed).
    async fn forget(&self, change: Option<&pb::WatchConfigResponse>);
}

/// How long configuration read from Config is trusted when no change notice arrives (while
/// the WatchConfig stream is down); with it, changes show within milliseconds.
pub const CONFIG_TTL: Duration = Duration::from_secs(5);
/// The most entries each cache holds; the least used go first.
const CAPACITY: u64 = 100_000;

/// [`Upstream`] over `Peers`, with Config's answers cached: at most one read per key is in
/// flight, however many handoffs wait for it.
pub struct Peered {
    peers: Peers,
    accounts: Cache<String, Arc<Account>>,
    configs: Cache<(String, String), Arc<HandoffConfig>>,
    templates: Cache<(String, String), Arc<Template>>,
}

impl Peered {
    pub fn new(peers: Peers) -> Self {
        Self {
            peers,
            accounts: cache(),
            configs: cache(),
            templates: cache(),
        }
    }
}

fn cache<K, V>() -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder()
        .max_capacity(CAPACITY)
        .time_to_live(CONFIG_TTL)
        .build()
}

/// `load`'s answer for `key`, kept in `cache`: at most one load per key is in flight, and the
/// requests waiting on it share its answer.
async fn cached<K, V>(
    cache: &Cache<K, Arc<V>>,
    key: K,
    load: impl std::future::Future<Output = Result<V, Error>>,
) -> Result<Arc<V>, Error>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    cache
        .try_get_with(key, async { load.await.map(Arc::new) })
        .await
        .map_err(shared)
}

/// What Config answered a read with: the resource `pick` takes out of it (`what`, if it is
/// missing).
fn answered<R, T>(
    answer: Result<tonic::Response<R>, tonic::Status>,
    pick: impl FnOnce(R) -> Option<T>,
    what: &str,
) -> Result<T, Error> {
    let answer = answer.map_err(|s| Error::upstream("config", s))?;
    pick(answer.into_inner())
        .ok_or_else(|| Error::Internal(format!("config answered without {what}")))
}

/// A cache load's error, shared among the requests that waited on it.
fn shared(error: Arc<Error>) -> Error {
    match &*error {
        Error::Refused { code, message } => Error::Refused {
            code: *code,
            message: message.clone(),
        },
        Error::Unavailable(peer) => Error::Unavailable(peer),
        other => Error::Internal(other.to_string()),
    }
}

#[async_trait]
impl Upstream for Peered {
    async fn account(&self, account_id: &str) -> Result<Arc<Account>, Error> {
        cached(&self.accounts, account_id.to_owned(), async {
            let request = pb::GetAccountRequest {
                account_id: account_id.to_owned(),
            };
            let answer = self.peers.config().get_account(request).await;
            answered(answer, |r| r.account, "an account").map(account_from)
        })
        .await
    }

    async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<Arc<HandoffConfig>, Error> {
        cached(
            &self.configs,
            (account_id.to_owned(), id.to_owned()),
            async {
                let request = pb::GetHandoffConfigRequest {
                    account_id: account_id.to_owned(),
                    handoff_config_id: id.to_owned(),
                };
                let answer = self.peers.config().get_handoff_config(request).await;
                answered(answer, |r| r.config, "a configuration").map(config_from)
            },
        )
        .await
    }

    async fn template(&self, account_id: &str, id: &str) -> Result<Arc<Template>, Error> {
        cached(
            &self.templates,
            (account_id.to_owned(), id.to_owned()),
            async {
                let request = pb::GetWhatsAppTemplateRequest {
                    account_id: account_id.to_owned(),
                    template_id: id.to_owned(),
                };
                let answer = self.peers.config().get_whats_app_template(request).await;
                let t = answered(answer, |r| r.template, "a template")?;
                Ok(Template {
                    approved: t.status() == WhatsAppTemplateStatus::Approved,
                    id: t.template_id,
                    name: t.name,
                    language: t.language,
                    body: t.body,
                })
            },
        )
        .await
    }

    async fn consumer(
        &self,
        account_id: &str,
        phone: &str,
        pending_invite_hours: u32,
    ) -> Result<Consumer, Error> {
        let answer = self
            .peers
            .routing()
            .check_consumer(pb::CheckConsumerRequest {
                account_id: account_id.to_owned(),
                consumer_phone: phone.to_owned(),
                pending_invite_hours,
            })
            .await
            .map_err(|s| Error::upstream("routing", s))?
            .into_inner();
        Ok(Consumer {
            opted_out: answer.opted_out_channels().collect(),
            open_conversation: Some(answer.conversation_id).filter(|_| answer.conversation_open),
            pending_invite: Some(answer.pending_invite_handoff_id).filter(|id| !id.is_empty()),
        })
    }

    async fn reach(
        &self,
        account_id: &str,
        channel: Channel,
        phone: &str,
        consumer_id: &str,
    ) -> Result<Reach, Error> {
        let answer = self
            .peers
            .channel_gateway()
            .check_reachability(pb::CheckReachabilityRequest {
                account_id: account_id.to_owned(),
                channel: channel.into(),
                phone: phone.to_owned(),
                consumer_id: consumer_id.to_owned(),
            })
            .await
            .map_err(|s| Error::upstream("channel gateway", s))?
            .into_inner();
        Ok(Reach {
            reachable: answer.reachable,
            no_credentials: answer.no_credentials,
            detail: answer.detail,
        })
    }

    async fn is_landline(&self, account_id: &str, phone: &str) -> Result<bool, Error> {
        let answer = self
            .peers
            .channel_gateway()
            .lookup_number(pb::LookupNumberRequest {
                account_id: account_id.to_owned(),
                phone: phone.to_owned(),
            })
            .await
            .map_err(|s| Error::upstream("channel gateway", s))?
            .into_inner();
        Ok(answer.line_type() == pb::LineType::Landline)
    }

    async fn forget(&self, change: Option<&pb::WatchConfigResponse>) {
        let Some(change) = change else {
            self.accounts.invalidate_all();
            self.configs.invalidate_all();
            self.templates.invalidate_all();
            return;
        };
        let key = || (change.account_id.clone(), change.resource_id.clone());
        match change.resource() {
            ConfigResource::Account => self.accounts.invalidate(&change.account_id).await,
            ConfigResource::HandoffConfig => self.configs.invalidate(&key()).await,
            ConfigResource::WhatsappTemplate => self.templates.invalidate(&key()).await,
            ConfigResource::ApiKey | ConfigResource::Unspecified => {}
        }
    }
}

fn account_from(account: pb::Account) -> Account {
    // Config always answers with settings; without them, its defaults.
    let Some(settings) = account.settings else {
        return Account {
            rate_limit: 30,
            display_name: account.display_name,
            ..Account::default()
        };
    };
    Account {
        deflection_enabled: settings.deflection_enabled,
        enabled_channels: settings.enabled_channels().collect(),
        landline_check: settings.landline_check_enabled,
        rate_limit: settings.rate_limit_per_second.max(1),
        reply_lookback_hours: settings.reply_lookback_hours,
        display_name: account.display_name,
    }
}

fn config_from(c: pb::HandoffConfig) -> HandoffConfig {
    HandoffConfig {
        channel_priority: c.channel_priority().collect(),
        // The first text given for a channel is its text.
        messages: c.messages.iter().rev().fold(BTreeMap::new(), |mut all, m| {
            if let Ok(channel) = Channel::try_from(m.channel) {
                all.insert(channel, m.text.clone());
            }
            all
        }),
        whatsapp_template_id: Some(c.whatsapp_template_id).filter(|id| !id.is_empty()),
        apple: (!c.apple_business_id.is_empty()).then_some(AppleInvite {
            business_id: c.apple_business_id,
            intent_id: c.apple_intent_id,
            group_id: c.apple_group_id,
            body: c.apple_body,
        }),
        delivery_deadline: Some(c.delivery_deadline_seconds)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(u64::from(s))),
        skill_id: c.skill_id,
        id: c.handoff_config_id,
    }
}
