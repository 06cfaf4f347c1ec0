//! The decision both RPCs share: which channels can carry this deflection now, in which order,
//! with which text, and if none, why. No side effects.

use c2m_proto::v1::{self as pb, Channel, HandoffStatus, IneligibilityReason};
use c2m_runtime::status::invalid_field;
use tonic::{Code, Status};

use crate::{Service, render::render, request::Deflection};

/// One channel to try and what to send on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub channel: Channel,
    /// The text the consumer reads (for WhatsApp, the template's body filled in).
    pub text: String,
    /// WhatsApp: the approved template and its body parameters.
    pub template: Option<(String, String, Vec<String>)>,
    /// Apple Messages: where the invite link leads.
    pub apple: Option<pb::AppleMessagesInvite>,
    /// App messaging: the consumer id whose devices get the push, and the notification's title.
    pub push: Option<(String, String)>,
}

impl Step {
    /// Text alone on `channel`.
    pub fn text(channel: Channel, text: String) -> Self {
        Self {
            channel,
            text,
            template: None,
            apple: None,
            push: None,
        }
    }

    pub fn whatsapp_template(&self) -> Option<pb::WhatsAppTemplateMessage> {
        self.template
            .as_ref()
            .map(|(name, language, parameters)| pb::WhatsAppTemplateMessage {
                name: name.clone(),
                language: language.clone(),
                body_parameters: parameters.clone(),
            })
    }
}

/// What would happen.
#[derive(Debug, Clone)]
pub struct Decision {
    pub skill_id: String,
    /// Every channel considered, with whether it can be used and why not.
    pub channels: Vec<pb::ChannelEligibility>,
    /// The channels to try, in order, each with its rendered message.
    pub plan: Vec<Step>,
    /// Why nothing can be sent, when `plan` is empty.
    pub blocked: Option<HandoffStatus>,
    /// How long a sent message may stay undelivered before the next channel is tried.
    pub delivery_deadline: Option<std::time::Duration>,
    /// The handoff whose Apple Messages invite is still pending, when Apple Messages is the
    /// channel this deflection would use: that invite is reused, not sent again.
    pub pending_invite: Option<String>,
}

impl Decision {
    /// The channel the funnel counts this deflection under: the first it would use or considered.
    pub fn funnel_channel(&self) -> Channel {
        self.plan
            .first()
            .map(|step| step.channel)
            .or_else(|| {
                self.channels
                    .first()
                    .and_then(|c| Channel::try_from(c.channel).ok())
            })
            .unwrap_or_default()
    }
}

fn eligible(channel: Channel) -> pb::ChannelEligibility {
    pb::ChannelEligibility {
        channel: channel as i32,
        eligible: true,
        reason: IneligibilityReason::Unspecified as i32,
        detail: String::new(),
    }
}

fn ineligible(
    channel: Channel,
    reason: IneligibilityReason,
    detail: impl Into<String>,
) -> pb::ChannelEligibility {
    pb::ChannelEligibility {
        channel: channel as i32,
        eligible: false,
        reason: reason as i32,
        detail: detail.into(),
    }
}

/// Errors from Config keep their code (NOT_FOUND for an unknown configuration) and name what
/// was missing; transport failures become UNAVAILABLE.
fn upstream(what: &str, status: Status) -> Status {
    match status.code() {
        Code::NotFound
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::PermissionDenied => Status::new(status.code(), status.message().to_owned()),
        _ => {
            tracing::warn!(%status, "{what} unavailable");
            Status::unavailable(format!("{what} unavailable, retry"))
        }
    }
}

impl Service {
    /// The account, cached briefly: the hot path does not wait on Config for it.
    pub(crate) async fn decide_account(&self, account_id: &str) -> Result<pb::Account, Status> {
        if let Some(account) = self.accounts.get(&account_id.to_owned()) {
            return Ok(account);
        }
        let account = self
            .peers
            .config()
            .get_account(pb::GetAccountRequest {
                account_id: account_id.to_owned(),
            })
            .await
            .map_err(|s| upstream("config", s))?
            .into_inner()
            .account
            .ok_or_else(|| Status::internal("config answered without an account"))?;
        self.accounts.insert(account_id.to_owned(), account.clone());
        Ok(account)
    }

    pub(crate) async fn handoff_config(
        &self,
        account_id: &str,
        id: &str,
    ) -> Result<pb::HandoffConfig, Status> {
        let key = (account_id.to_owned(), id.to_owned());
        if let Some(config) = self.configs.get(&key) {
            return Ok(config);
        }
        let config = self
            .peers
            .config()
            .get_handoff_config(pb::GetHandoffConfigRequest {
                account_id: account_id.to_owned(),
                handoff_config_id: id.to_owned(),
            })
            .await
            .map_err(|s| upstream("config", s))?
            .into_inner()
            .config
            .ok_or_else(|| Status::internal("config answered without a configuration"))?;
        self.configs.insert(key, config.clone());
        Ok(config)
    }

    async fn template(&self, account_id: &str, id: &str) -> Result<pb::WhatsAppTemplate, Status> {
        let key = (account_id.to_owned(), id.to_owned());
        if let Some(template) = self.templates.get(&key) {
            return Ok(template);
        }
        let template = self
            .peers
            .config()
            .get_whats_app_template(pb::GetWhatsAppTemplateRequest {
                account_id: account_id.to_owned(),
                template_id: id.to_owned(),
            })
            .await
            .map_err(|s| upstream("config", s))?
            .into_inner()
            .template
            .ok_or_else(|| Status::internal("config answered without a template"))?;
        self.templates.insert(key, template.clone());
        Ok(template)
    }

    /// WhatsApp starts a conversation only with a template Meta approved; its numbered
    /// placeholders take the template variables "1", "2", ….
    async fn whatsapp_step(
        &self,
        d: &Deflection,
        config: &pb::HandoffConfig,
    ) -> Result<Result<Step, pb::ChannelEligibility>, Status> {
        // Inside the customer-service window the configured text goes as it is; outside, only an
        // approved template may start the conversation.
        if config
            .messages
            .iter()
            .any(|m| m.channel == Channel::Whatsapp as i32)
            && self.reachability(d, Channel::Whatsapp).await?.reachable
            && let Some(step) = text_step(d, config, Channel::Whatsapp)?
        {
            return Ok(Ok(step));
        }
        if config.whatsapp_template_id.is_empty() {
            return Ok(Err(ineligible(
                Channel::Whatsapp,
                IneligibilityReason::TemplateNotApproved,
                "no template configured: WhatsApp needs an approved one to start a conversation",
            )));
        }
        let template = self
            .template(&d.account_id, &config.whatsapp_template_id)
            .await?;
        if template.status != pb::WhatsAppTemplateStatus::Approved as i32 {
            return Ok(Err(ineligible(
                Channel::Whatsapp,
                IneligibilityReason::TemplateNotApproved,
                format!("template {} is not approved", template.template_id),
            )));
        }
        let count = placeholders(&template.body);
        let mut parameters = Vec::with_capacity(count);
        for n in 1..=count {
            let value = d
                .template_variables
                .get(&n.to_string())
                .cloned()
                .ok_or_else(|| {
                    invalid_field(
                        format!("template_variables[{n}]"),
                        format!("WhatsApp template {} needs {{{{{n}}}}}", template.name),
                    )
                })?;
            parameters.push(value);
        }
        let text = render(&template.body, |name| {
            name.parse::<usize>()
                .ok()
                .and_then(|n| parameters.get(n.checked_sub(1)?).cloned())
        })
        .unwrap_or_else(|_| template.body.clone());
        Ok(Ok(Step {
            template: Some((template.name, template.language, parameters)),
            ..Step::text(Channel::Whatsapp, text)
        }))
    }

    /// What the gateway knows of reaching this consumer on `channel`.
    async fn reachability(
        &self,
        d: &Deflection,
        channel: Channel,
    ) -> Result<pb::CheckReachabilityResponse, Status> {
        Ok(self
            .peers
            .channel_gateway()
            .check_reachability(pb::CheckReachabilityRequest {
                account_id: d.account_id.clone(),
                channel: channel as i32,
                phone: d.consumer_phone.clone(),
                consumer_id: d.consumer_id.clone(),
            })
            .await
            .map_err(|s| upstream("channel gateway", s))?
            .into_inner())
    }

    /// RCS, Apple Messages and app messaging: what each needs beyond a configured text.
    async fn channel_step(
        &self,
        d: &Deflection,
        config: &pb::HandoffConfig,
        account: &pb::Account,
        channel: Channel,
    ) -> Result<Result<Step, pb::ChannelEligibility>, Status> {
        match channel {
            Channel::Rcs => {
                let reach = self.reachability(d, channel).await?;
                if reach.no_credentials {
                    return Ok(Err(ineligible(
                        channel,
                        IneligibilityReason::NoCredentials,
                        reach.detail,
                    )));
                }
                if !reach.reachable {
                    return Ok(Err(ineligible(
                        channel,
                        IneligibilityReason::NotRcsReachable,
                        reach.detail,
                    )));
                }
            }
            Channel::AppMessaging => {
                if d.consumer_id.is_empty() {
                    return Ok(Err(ineligible(
                        channel,
                        IneligibilityReason::NoRegisteredDevice,
                        "no consumer_id: app messaging reaches a consumer logged in to the app",
                    )));
                }
                let reach = self.reachability(d, channel).await?;
                if !reach.reachable {
                    return Ok(Err(ineligible(
                        channel,
                        IneligibilityReason::NoRegisteredDevice,
                        format!("consumer {} has no registered device", d.consumer_id),
                    )));
                }
            }
            Channel::AppleMessages if config.apple_business_id.is_empty() => {
                return Ok(Err(ineligible(
                    channel,
                    IneligibilityReason::NotEnabled,
                    "no Apple Messages for Business id in the configuration",
                )));
            }
            _ => {}
        }
        let Some(mut step) = text_step(d, config, channel)? else {
            return Ok(Err(ineligible(
                channel,
                IneligibilityReason::NotEnabled,
                "no message configured",
            )));
        };
        match channel {
            Channel::AppleMessages => {
                let body = rendered(d, &config.apple_body, || "the Apple Messages body".into())?;
                step.apple = Some(pb::AppleMessagesInvite {
                    business_id: config.apple_business_id.clone(),
                    intent_id: config.apple_intent_id.clone(),
                    group_id: config.apple_group_id.clone(),
                    body,
                });
            }
            Channel::AppMessaging => {
                step.push = Some((d.consumer_id.clone(), account.display_name.clone()));
            }
            _ => {}
        }
        Ok(Ok(step))
    }

    async fn is_landline(&self, account_id: &str, phone: &str) -> Result<bool, Status> {
        let answer = self
            .peers
            .channel_gateway()
            .lookup_number(pb::LookupNumberRequest {
                account_id: account_id.to_owned(),
                phone: phone.to_owned(),
            })
            .await
            .map_err(|s| upstream("channel gateway", s))?
            .into_inner();
        Ok(answer.line_type == pb::LineType::Landline as i32)
    }

    /// Decides what a deflection would do. `open_conversation` is what the Redis lease said, when
    /// it named one: then Routing need not be asked.
    pub(crate) async fn decide(
        &self,
        d: &Deflection,
        open_conversation: Option<String>,
    ) -> Result<Decision, Status> {
        let account = self.decide_account(&d.account_id).await?;
        let settings = account.settings.clone().unwrap_or_default();
        if !settings.deflection_enabled {
            return Err(Status::failed_precondition(format!(
                "deflection is disabled for account {}",
                d.account_id
            )));
        }
        let config = self
            .handoff_config(&d.account_id, &d.handoff_config_id)
            .await?;
        let priority: Vec<Channel> = config
            .channel_priority
            .iter()
            .filter_map(|c| Channel::try_from(*c).ok())
            .collect();
        let candidates = match d.override_channel {
            Some(channel) if !priority.contains(&channel) => {
                return Err(invalid_field(
                    "override_channel",
                    format!(
                        "{} is not a channel of configuration {}",
                        channel.as_str_name(),
                        config.handoff_config_id
                    ),
                ));
            }
            Some(channel) => vec![channel],
            None => priority,
        };

        let apple = candidates.contains(&Channel::AppleMessages);
        if apple && open_conversation.is_none() {
            // Routing finds a pending invite among the deflections it has: ship ours first, so
            // that one sent a moment ago counts.
            self.deflections
                .flush()
                .await
                .map_err(crate::deflections::relay_status)?;
        }
        let consumer = match open_conversation {
            Some(conversation_id) => pb::CheckConsumerResponse {
                conversation_open: true,
                conversation_id,
                ..Default::default()
            },
            None => self
                .peers
                .routing()
                .check_consumer(pb::CheckConsumerRequest {
                    account_id: d.account_id.clone(),
                    consumer_phone: d.consumer_phone.clone(),
                    // An invite is pending as long as a reply to it would still be routed
                    // (Config stores the account's lookback, its default included).
                    pending_invite_hours: if apple {
                        settings.reply_lookback_hours
                    } else {
                        0
                    },
                })
                .await
                .map_err(|s| upstream("routing", s))?
                .into_inner(),
        };
        // The skill is the override or the configuration's: the configuration is already here,
        // so Routing's ResolveSkill (for callers without it) is not asked on the hot path.
        let skill_id = d
            .override_skill_id
            .clone()
            .unwrap_or_else(|| config.skill_id.clone());

        // Only looked up when the account asks: a paid lookup unless the numbering plan decides.
        let landline = settings.landline_check_enabled
            && !consumer.conversation_open
            && self.is_landline(&d.account_id, &d.consumer_phone).await?;
        let mut channels = Vec::with_capacity(candidates.len());
        let mut plan = Vec::new();
        for channel in &candidates {
            let channel = *channel;
            let eligibility = if !settings.enabled_channels.contains(&(channel as i32)) {
                ineligible(
                    channel,
                    IneligibilityReason::NotEnabled,
                    "not enabled on the account",
                )
            } else if consumer.conversation_open {
                ineligible(
                    channel,
                    IneligibilityReason::ConversationOpen,
                    format!("conversation {} is open", consumer.conversation_id),
                )
            } else if landline && channel != Channel::AppMessaging {
                ineligible(
                    channel,
                    IneligibilityReason::Landline,
                    "the number is a landline",
                )
            } else if consumer.opted_out_channels.contains(&(channel as i32)) {
                ineligible(
                    channel,
                    IneligibilityReason::OptedOut,
                    "the consumer opted out",
                )
            } else if channel == Channel::Whatsapp {
                match self.whatsapp_step(d, &config).await? {
                    Ok(step) => {
                        plan.push(step);
                        eligible(channel)
                    }
                    Err(refusal) => refusal,
                }
            } else {
                match self.channel_step(d, &config, &account, channel).await? {
                    Ok(step) => {
                        plan.push(step);
                        eligible(channel)
                    }
                    Err(refusal) => refusal,
                }
            };
            channels.push(eligibility);
        }
        let blocked = if !plan.is_empty() {
            None
        } else if consumer.conversation_open {
            Some(HandoffStatus::SkippedOpenConversation)
        } else if landline {
            Some(HandoffStatus::RejectedLandline)
        } else if !channels.is_empty()
            && channels
                .iter()
                .all(|c| c.reason == IneligibilityReason::OptedOut as i32)
        {
            Some(HandoffStatus::RejectedOptedOut)
        } else {
            Some(HandoffStatus::NoEligibleChannel)
        };
        let pending_invite = plan
            .first()
            .filter(|step| step.channel == Channel::AppleMessages)
            .and_then(|_| Some(consumer.pending_invite_handoff_id).filter(|id| !id.is_empty()));
        Ok(Decision {
            pending_invite,
            skill_id,
            channels,
            plan,
            blocked,
            delivery_deadline: Some(config.delivery_deadline_seconds)
                .filter(|s| *s > 0)
                .map(|s| std::time::Duration::from_secs(u64::from(s))),
        })
    }
}

/// The configured text for `channel` (or the SMS override), rendered; `None` when the
/// configuration has no text for it.
fn text_step(
    d: &Deflection,
    config: &pb::HandoffConfig,
    channel: Channel,
) -> Result<Option<Step>, Status> {
    let template = match (&d.override_message, channel) {
        (Some(message), Channel::Sms) => Some(message.clone()),
        _ => config
            .messages
            .iter()
            .find(|m| m.channel == channel as i32)
            .map(|m| m.text.clone()),
    };
    let Some(template) = template else {
        return Ok(None);
    };
    let text = rendered(d, &template, || {
        format!("the {} message", channel.as_str_name())
    })?;
    Ok(Some(Step::text(channel, text)))
}

/// `template` with its `{{variables}}` filled from the request; `what` names it when one is
/// missing (and is only made then), so no text with a literal placeholder ever leaves.
fn rendered(
    d: &Deflection,
    template: &str,
    what: impl FnOnce() -> String,
) -> Result<String, Status> {
    render(template, |name| d.variable(name)).map_err(|name| {
        invalid_field(
            format!("template_variables[{name}]"),
            format!("{} needs {{{{{name}}}}} and no value was given", what()),
        )
    })
}

/// The highest `{{N}}` in a WhatsApp template body.
fn placeholders(body: &str) -> usize {
    let mut highest = 0;
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        if let Ok(n) = rest[start + 2..start + 2 + len].trim().parse::<usize>() {
            highest = highest.max(n);
        }
        rest = &rest[start + 2 + len + 2..];
    }
    highest
}
