//! Gathering what the planner needs to know about a deflection: the account and configuration
//! (cached), the consumer as Routing knows them, whether the number is a landline, and what the
//! gateway knows of reaching them on each channel still in play. Only what the plan can use is
//! asked: no landline lookup (which may be paid) with a conversation open, no reachability for a
//! channel already ruled out; the reachability questions go out together.

use c2m_proto::v1::Channel;

use crate::{
    engine::Engine,
    error::Error,
    model::{Context, Decision},
    plan::{self, candidates, needs_template, ruled_out},
    request::Deflection,
};

/// Channels whose eligibility depends on what the gateway knows.
fn asks_gateway(d: &Deflection, channel: Channel, ctx: &Context) -> bool {
    match channel {
        Channel::Rcs => true,
        Channel::AppMessaging => !d.consumer_id.is_empty(),
        // Whether the customer-service window is open matters only for a free-form text.
        Channel::Whatsapp => ctx.config.messages.contains_key(&Channel::Whatsapp),
        _ => false,
    }
}

impl Engine {
    /// Decides what `d` would do. `open_conversation` is what the gate's lease said, when it
    /// named one: then Routing need not be asked.
    pub(crate) async fn decide(
        &self,
        d: &Deflection,
        open_conversation: Option<String>,
    ) -> Result<Decision, Error> {
        let ctx = self.context(d, open_conversation).await?;
        plan::plan(d, &ctx)
    }

    /// What is known of `d`'s world, as far as its plan needs.
    pub(crate) async fn context(
        &self,
        d: &Deflection,
        open_conversation: Option<String>,
    ) -> Result<Context, Error> {
        let account = self.upstream.account(&d.account_id).await?;
        if !account.deflection_enabled {
            return Err(Error::DeflectionDisabled {
                account_id: d.account_id.clone(),
            });
        }
        let config = self
            .upstream
            .handoff_config(&d.account_id, &d.handoff_config_id)
            .await?;
        let candidates = candidates(d, &config)?;
        let apple = candidates.contains(&Channel::AppleMessages);
        let consumer = match open_conversation {
            Some(conversation) => crate::model::Consumer {
                open_conversation: Some(conversation),
                ..Default::default()
            },
            None => {
                if apple {
                    // Routing finds a pending invite among the deflections it has: ours go
                    // first, so that one sent a moment ago counts.
                    self.deflections.flush().await?;
                }
                // An invite is pending as long as a reply to it would still be routed.
                let hours = if apple {
                    account.reply_lookback_hours
                } else {
                    0
                };
                self.upstream
                    .consumer(&d.account_id, &d.consumer_phone, hours)
                    .await?
            }
        };
        let mut ctx = Context {
            account: account.clone(),
            config,
            consumer,
            ..Context::default()
        };
        // Only looked up when the account asks: a paid lookup unless the numbering plan decides.
        ctx.landline = account.landline_check
            && ctx.consumer.open_conversation.is_none()
            && self
                .upstream
                .is_landline(&d.account_id, &d.consumer_phone)
                .await?;
        let asked: Vec<Channel> = candidates
            .iter()
            .copied()
            .filter(|c| ruled_out(&ctx, *c).is_none() && asks_gateway(d, *c, &ctx))
            .collect();
        let answers = futures::future::join_all(asked.iter().map(|channel| {
            self.upstream
                .reach(&d.account_id, *channel, &d.consumer_phone, &d.consumer_id)
        }))
        .await;
        for (channel, reach) in asked.into_iter().zip(answers) {
            ctx.reach.insert(channel, reach?);
        }
        if candidates.contains(&Channel::Whatsapp)
            && ruled_out(&ctx, Channel::Whatsapp).is_none()
            && needs_template(&ctx)
            && let Some(id) = &ctx.config.whatsapp_template_id
        {
            ctx.template = Some(self.upstream.template(&d.account_id, id).await?);
        }
        Ok(ctx)
    }
}
