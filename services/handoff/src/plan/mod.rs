//! The channel policy, as a pure function: a deflection and what is known of its world (a
//! [`Context`]) make a [`Decision`]: which channels can carry it, in which order, with which
//! text, and if none, why. Everything it reads was gathered before (`context.rs`); it asks no
//! one and changes nothing, so its tests need no server.

use c2m_proto::v1::{Channel, IneligibilityReason};

use crate::{
    error::Error,
    model::{
        AppleInvite, Blocked, Context, Decision, Eligibility, HandoffConfig, Push, Step,
        TemplateMessage,
    },
    render::render,
    request::Deflection,
};

/// The channels a deflection may use, in order: its override (which must be one of the
/// configuration's), else the configuration's priority.
pub fn candidates(d: &Deflection, config: &HandoffConfig) -> Result<Vec<Channel>, Error> {
    match d.override_channel {
        Some(channel) if !config.channel_priority.contains(&channel) => Err(Error::invalid(
            "override_channel",
            format!(
                "{} is not a channel of configuration {}",
                channel.as_str_name(),
                config.id
            ),
        )),
        Some(channel) => Ok(vec![channel]),
        None => Ok(config.channel_priority.clone()),
    }
}

/// Why `channel` is out before anything about the channel itself is asked, if it is: not
/// enabled, a conversation open, a landline, an opt-out. `context.rs` asks the gateway about
/// the channels this leaves in.
pub fn ruled_out(ctx: &Context, channel: Channel) -> Option<Eligibility> {
    let refuse = |reason, detail: String| Some(Eligibility::ineligible(channel, reason, detail));
    if !ctx.account.enabled_channels.contains(&channel) {
        refuse(
            IneligibilityReason::NotEnabled,
            "not enabled on the account".into(),
        )
    } else if let Some(conversation) = &ctx.consumer.open_conversation {
        refuse(
            IneligibilityReason::ConversationOpen,
            format!("conversation {conversation} is open"),
        )
    } else if ctx.landline && channel != Channel::AppMessaging {
        refuse(
            IneligibilityReason::Landline,
            "the number is a landline".into(),
        )
    } else if ctx.consumer.opted_out.contains(&channel) {
        refuse(
            IneligibilityReason::OptedOut,
            "the consumer opted out".into(),
        )
    } else {
        None
    }
}

/// Whether a WhatsApp step may need the configuration's template: there is no free-form text
/// for WhatsApp, or the customer-service window is closed.
pub fn needs_template(ctx: &Context) -> bool {
    let window_open = ctx
        .reach
        .get(&Channel::Whatsapp)
        .is_some_and(|r| r.reachable);
    !(ctx.config.messages.contains_key(&Channel::Whatsapp) && window_open)
}

/// What this deflection would do, given `ctx`. Fails only on the request itself: an override
/// channel outside the configuration, or a variable a message needs and the request lacks.
pub fn plan(d: &Deflection, ctx: &Context) -> Result<Decision, Error> {
    let candidates = candidates(d, &ctx.config)?;
    let mut channels = Vec::with_capacity(candidates.len());
    let mut plan = Vec::new();
    for channel in candidates {
        let step = match ruled_out(ctx, channel) {
            Some(refused) => Err(refused),
            None if channel == Channel::Whatsapp => whatsapp_step(d, ctx)?,
            None => channel_step(d, ctx, channel)?,
        };
        channels.push(match step {
            Ok(step) => {
                plan.push(step);
                Eligibility::eligible(channel)
            }
            Err(refused) => refused,
        });
    }
    let blocked = if !plan.is_empty() {
        None
    } else if ctx.consumer.open_conversation.is_some() {
        Some(Blocked::OpenConversation)
    } else if ctx.landline {
        Some(Blocked::Landline)
    } else if !channels.is_empty()
        && channels.iter().all(|c| {
            c.refused
                .as_ref()
                .is_some_and(|r| r.reason == IneligibilityReason::OptedOut)
        })
    {
        Some(Blocked::OptedOut)
    } else {
        Some(Blocked::NoEligibleChannel)
    };
    let pending_invite = plan
        .first()
        .filter(|step| step.channel == Channel::AppleMessages)
        .and_then(|_| ctx.consumer.pending_invite.clone());
    Ok(Decision {
        // The override or the configuration's: Routing's ResolveSkill (for callers without the
        // configuration) is not needed on the hot path.
        skill_id: d
            .override_skill_id
            .clone()
            .unwrap_or_else(|| ctx.config.skill_id.clone()),
        channels,
        plan,
        blocked,
        delivery_deadline: ctx.config.delivery_deadline,
        pending_invite,
    })
}

type StepOrRefusal = Result<Step, Eligibility>;

/// WhatsApp starts a conversation only with a template Meta approved; inside the
/// customer-service window the configured text goes as it is.
fn whatsapp_step(d: &Deflection, ctx: &Context) -> Result<StepOrRefusal, Error> {
    let channel = Channel::Whatsapp;
    if !needs_template(ctx)
        && let Some(step) = text_step(d, &ctx.config, channel)?
    {
        return Ok(Ok(step));
    }
    let Some(template_id) = &ctx.config.whatsapp_template_id else {
        return Ok(Err(Eligibility::ineligible(
            channel,
            IneligibilityReason::TemplateNotApproved,
            "no template configured: WhatsApp needs an approved one to start a conversation",
        )));
    };
    let template = match &ctx.template {
        Some(template) if template.approved => template,
        _ => {
            return Ok(Err(Eligibility::ineligible(
                channel,
                IneligibilityReason::TemplateNotApproved,
                format!("template {template_id} is not approved"),
            )));
        }
    };
    let count = placeholders(&template.body);
    let mut parameters = Vec::with_capacity(count);
    for n in 1..=count {
        let value = d.template_variables.get(&n.to_string()).ok_or_else(|| {
            Error::invalid(
                format!("template_variables[{n}]"),
                format!("WhatsApp template {} needs {{{{{n}}}}}", template.name),
            )
        })?;
        parameters.push(value.clone());
    }
    let text = render(&template.body, |name| {
        name.parse::<usize>()
            .ok()
            .and_then(|n| parameters.get(n.checked_sub(1)?).cloned())
    })
    .unwrap_or_else(|_| template.body.clone());
    Ok(Ok(Step {
        template: Some(TemplateMessage {
            name: template.name.clone(),
            language: template.language.clone(),
            parameters,
        }),
        ..Step::text(channel, text)
    }))
}

/// SMS, RCS, Apple Messages and app messaging: a configured text, and what each needs beyond it.
fn channel_step(d: &Deflection, ctx: &Context, channel: Channel) -> Result<StepOrRefusal, Error> {
    let reach = ctx.reach.get(&channel).cloned().unwrap_or_default();
    let refuse = |reason, detail: String| Ok(Err(Eligibility::ineligible(channel, reason, detail)));
    match channel {
        Channel::Rcs if reach.no_credentials => {
            return refuse(IneligibilityReason::NoCredentials, reach.detail);
        }
        Channel::Rcs if !reach.reachable => {
            return refuse(IneligibilityReason::NotRcsReachable, reach.detail);
        }
        Channel::AppMessaging if d.consumer_id.is_empty() => {
            return refuse(
                IneligibilityReason::NoRegisteredDevice,
                "no consumer_id: app messaging reaches a consumer logged in to the app".into(),
            );
        }
        Channel::AppMessaging if !reach.reachable => {
            return refuse(
                IneligibilityReason::NoRegisteredDevice,
                format!("consumer {} has no registered device", d.consumer_id),
            );
        }
        Channel::AppleMessages if ctx.config.apple.is_none() => {
            return refuse(
                IneligibilityReason::NotEnabled,
                "no Apple Messages for Business id in the configuration".into(),
            );
        }
        _ => {}
    }
    let Some(mut step) = text_step(d, &ctx.config, channel)? else {
        return refuse(
            IneligibilityReason::NotEnabled,
            "no message configured".into(),
        );
    };
    match (channel, &ctx.config.apple) {
        (Channel::AppleMessages, Some(apple)) => {
            let body = rendered(d, &apple.body, || "the Apple Messages body".into())?;
            step.apple = Some(AppleInvite {
                body,
                ..apple.clone()
            });
        }
        (Channel::AppMessaging, _) => {
            step.push = Some(Push {
                consumer_id: d.consumer_id.clone(),
                title: ctx.account.display_name.clone(),
            });
        }
        _ => {}
    }
    Ok(Ok(step))
}

/// The configured text for `channel` (or the SMS override), rendered; `None` when the
/// configuration has no text for it.
fn text_step(
    d: &Deflection,
    config: &HandoffConfig,
    channel: Channel,
) -> Result<Option<Step>, Error> {
    let template = match (&d.override_message, channel) {
        (Some(message), Channel::Sms) => Some(message),
        _ => config.messages.get(&channel),
    };
    let Some(template) = template else {
        return Ok(None);
    };
    let text = rendered(d, template, || {
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
) -> Result<String, Error> {
    render(template, |name| d.variable(name)).map_err(|name| {
        Error::invalid(
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

#[cfg(test)]
mod tests;
