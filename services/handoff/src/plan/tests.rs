//! The channel policy on hand-made contexts: no server, no peers, no database.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use c2m_proto::v1::{Channel, IneligibilityReason as Why};

use super::plan;
use crate::{
    error::Error,
    model::{
        Account, AppleInvite, Blocked, Consumer, Context, Decision, HandoffConfig, Reach, Template,
    },
    request::Deflection,
};

fn deflection() -> Deflection {
    Deflection {
        account_id: "acme".into(),
        handoff_config_id: "billing".into(),
        consumer_phone: c2m_runtime::E164::parse("+14155550123").unwrap(),
        engagement_attributes: Default::default(),
        template_variables: BTreeMap::from([("first_name".to_owned(), "Ada".to_owned())]),
        override_channel: None,
        override_message: None,
        override_skill_id: None,
        ivr_call_id: String::new(),
        ivr_number: String::new(),
        consumer_id: String::new(),
        request: Vec::new(),
    }
}

/// An account with every channel on, and a configuration trying `priority` in order, each with a
/// text of its own.
fn context(priority: &[Channel]) -> Context {
    Context {
        account: Arc::new(Account {
            display_name: "Acme".into(),
            deflection_enabled: true,
            enabled_channels: vec![
                Channel::Sms,
                Channel::Whatsapp,
                Channel::Rcs,
                Channel::AppleMessages,
                Channel::AppMessaging,
            ],
            landline_check: true,
            rate_limit: 30,
            reply_lookback_hours: 24,
        }),
        config: Arc::new(HandoffConfig {
            id: "billing".into(),
            channel_priority: priority.to_vec(),
            messages: priority
                .iter()
                .map(|c| {
                    (
                        *c,
                        format!("Hi {{{{first_name}}}}, {} here", c.as_str_name()),
                    )
                })
                .collect(),
            skill_id: "billing-skill".into(),
            whatsapp_template_id: None,
            apple: None,
            delivery_deadline: Some(Duration::from_secs(120)),
        }),
        ..Context::default()
    }
}

fn config(ctx: &mut Context) -> &mut HandoffConfig {
    Arc::make_mut(&mut ctx.config)
}

fn reach(ctx: &mut Context, channel: Channel, reachable: bool) {
    ctx.reach.insert(
        channel,
        Reach {
            reachable,
            no_credentials: false,
            detail: format!("reachable: {reachable}"),
        },
    );
}

fn channels(decision: &Decision) -> Vec<Channel> {
    decision.plan.iter().map(|s| s.channel).collect()
}

fn why(decision: &Decision, channel: Channel) -> Option<Why> {
    decision
        .channels
        .iter()
        .find(|c| c.channel == channel)
        .and_then(|c| c.refused.as_ref())
        .map(|r| r.reason)
}

#[test]
fn plans_the_configured_channels_in_order_with_their_texts_rendered() {
    let decision = plan(&deflection(), &context(&[Channel::Sms, Channel::Rcs])).unwrap();
    // RCS was not found reachable (nothing said it was): only SMS goes.
    assert_eq!(channels(&decision), [Channel::Sms]);
    assert_eq!(decision.plan[0].text, "Hi Ada, CHANNEL_SMS here");
    assert_eq!(why(&decision, Channel::Rcs), Some(Why::NotRcsReachable));
    assert_eq!(decision.skill_id, "billing-skill");
    assert_eq!(decision.blocked, None);
    assert_eq!(decision.delivery_deadline, Some(Duration::from_secs(120)));
}

#[test]
fn a_landline_leaves_only_app_messaging() {
    let mut ctx = context(&[Channel::Sms, Channel::AppMessaging]);
    ctx.landline = true;
    reach(&mut ctx, Channel::AppMessaging, true);
    let mut d = deflection();
    d.consumer_id = "user-7".into();
    let decision = plan(&d, &ctx).unwrap();
    assert_eq!(why(&decision, Channel::Sms), Some(Why::Landline));
    assert_eq!(channels(&decision), [Channel::AppMessaging]);
    let push = decision.plan[0].push.as_ref().unwrap();
    assert_eq!(
        (push.consumer_id.as_str(), push.title.as_str()),
        ("user-7", "Acme")
    );

    let ctx = {
        let mut ctx = context(&[Channel::Sms, Channel::Whatsapp]);
        ctx.landline = true;
        ctx
    };
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(decision.blocked, Some(Blocked::Landline));
    assert!(decision.plan.is_empty());
}

#[test]
fn opted_out_of_every_channel_is_rejected_and_of_one_falls_to_the_next() {
    let mut ctx = context(&[Channel::Sms, Channel::Whatsapp]);
    reach(&mut ctx, Channel::Whatsapp, true);
    ctx.consumer.opted_out = vec![Channel::Sms];
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(why(&decision, Channel::Sms), Some(Why::OptedOut));
    assert_eq!(channels(&decision), [Channel::Whatsapp]);

    ctx.consumer.opted_out = vec![Channel::Sms, Channel::Whatsapp];
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(decision.blocked, Some(Blocked::OptedOut));
}

#[test]
fn an_open_conversation_skips_every_channel() {
    let mut ctx = context(&[Channel::Sms, Channel::Rcs]);
    ctx.consumer = Consumer {
        open_conversation: Some("conv-1".into()),
        ..Consumer::default()
    };
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(decision.blocked, Some(Blocked::OpenConversation));
    assert_eq!(why(&decision, Channel::Sms), Some(Why::ConversationOpen));
    assert_eq!(why(&decision, Channel::Rcs), Some(Why::ConversationOpen));
    assert!(
        decision.channels[0]
            .refused
            .as_ref()
            .unwrap()
            .detail
            .contains("conv-1")
    );
}

#[test]
fn app_messaging_needs_a_consumer_id_and_a_registered_device() {
    let mut ctx = context(&[Channel::AppMessaging]);
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(
        why(&decision, Channel::AppMessaging),
        Some(Why::NoRegisteredDevice)
    );
    assert_eq!(decision.blocked, Some(Blocked::NoEligibleChannel));

    let mut d = deflection();
    d.consumer_id = "user-7".into();
    reach(&mut ctx, Channel::AppMessaging, false);
    let decision = plan(&d, &ctx).unwrap();
    let refused = decision.channels[0].refused.as_ref().unwrap();
    assert_eq!(refused.reason, Why::NoRegisteredDevice);
    assert!(refused.detail.contains("user-7"), "{}", refused.detail);
}

#[test]
fn rcs_goes_only_where_reachable_and_credentialed() {
    let mut ctx = context(&[Channel::Rcs, Channel::Sms]);
    reach(&mut ctx, Channel::Rcs, true);
    assert_eq!(
        channels(&plan(&deflection(), &ctx).unwrap()),
        [Channel::Rcs, Channel::Sms]
    );
    reach(&mut ctx, Channel::Rcs, false);
    assert_eq!(
        channels(&plan(&deflection(), &ctx).unwrap()),
        [Channel::Sms]
    );
    ctx.reach.insert(
        Channel::Rcs,
        Reach {
            reachable: false,
            no_credentials: true,
            detail: "no RBM agent".into(),
        },
    );
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(why(&decision, Channel::Rcs), Some(Why::NoCredentials));
}

fn whatsapp_with_template(approved: bool) -> Context {
    let mut ctx = context(&[Channel::Whatsapp, Channel::Sms]);
    config(&mut ctx).whatsapp_template_id = Some("tpl-1".into());
    ctx.template = Some(Arc::new(Template {
        id: "tpl-1".into(),
        name: "callback".into(),
        language: "en_US".into(),
        body: "Your order {{1}} ships {{2}}".into(),
        approved,
    }));
    ctx
}

#[test]
fn whatsapp_inside_the_window_sends_the_text_and_outside_the_approved_template() {
    let mut ctx = whatsapp_with_template(true);
    reach(&mut ctx, Channel::Whatsapp, true);
    let open = plan(&deflection(), &ctx).unwrap();
    assert_eq!(open.plan[0].text, "Hi Ada, CHANNEL_WHATSAPP here");
    assert_eq!(open.plan[0].template, None);

    reach(&mut ctx, Channel::Whatsapp, false);
    let mut d = deflection();
    d.template_variables.extend([
        ("1".to_owned(), "A-7".to_owned()),
        ("2".to_owned(), "today".to_owned()),
    ]);
    let closed = plan(&d, &ctx).unwrap();
    let template = closed.plan[0].template.as_ref().unwrap();
    assert_eq!(template.name, "callback");
    assert_eq!(template.parameters, ["A-7", "today"]);
    assert_eq!(closed.plan[0].text, "Your order A-7 ships today");
}

#[test]
fn whatsapp_outside_the_window_without_an_approved_template_is_ineligible() {
    let ctx = whatsapp_with_template(false);
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(
        why(&decision, Channel::Whatsapp),
        Some(Why::TemplateNotApproved)
    );
    assert_eq!(channels(&decision), [Channel::Sms]);

    let ctx = context(&[Channel::Whatsapp]);
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(
        why(&decision, Channel::Whatsapp),
        Some(Why::TemplateNotApproved)
    );
    assert_eq!(decision.blocked, Some(Blocked::NoEligibleChannel));
}

#[test]
fn a_variable_the_message_needs_and_the_request_lacks_names_the_field() {
    let ctx = whatsapp_with_template(true);
    let Err(Error::Invalid(violations)) = plan(&deflection(), &ctx) else {
        panic!("a template needing {{{{1}}}} planned without it");
    };
    assert_eq!(violations[0].0, "template_variables[1]");

    let mut d = deflection();
    d.template_variables.clear();
    let Err(Error::Invalid(violations)) = plan(&d, &context(&[Channel::Sms])) else {
        panic!("an SMS needing {{{{first_name}}}} planned without it");
    };
    assert_eq!(violations[0].0, "template_variables[first_name]");
}

#[test]
fn an_override_must_be_one_of_the_configured_channels() {
    let mut d = deflection();
    d.override_channel = Some(Channel::Rcs);
    let Err(Error::Invalid(violations)) = plan(&d, &context(&[Channel::Sms])) else {
        panic!("an override outside the configuration was planned");
    };
    assert_eq!(violations[0].0, "override_channel");

    d.override_channel = Some(Channel::Sms);
    d.override_message = Some("Call you back, {{first_name}}".into());
    d.override_skill_id = Some("vip".into());
    let decision = plan(&d, &context(&[Channel::Whatsapp, Channel::Sms])).unwrap();
    assert_eq!(channels(&decision), [Channel::Sms]);
    assert_eq!(decision.plan[0].text, "Call you back, Ada");
    assert_eq!(decision.skill_id, "vip");
}

#[test]
fn apple_messages_needs_a_business_id_and_reuses_a_pending_invite() {
    let mut ctx = context(&[Channel::AppleMessages, Channel::Sms]);
    ctx.consumer.pending_invite = Some("ho-earlier".into());
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(
        why(&decision, Channel::AppleMessages),
        Some(Why::NotEnabled)
    );
    // SMS goes first: the pending invite is not this deflection's business.
    assert_eq!(decision.pending_invite, None);

    config(&mut ctx).apple = Some(AppleInvite {
        business_id: "biz".into(),
        intent_id: "billing".into(),
        group_id: "g".into(),
        body: "About my bill, {{first_name}}".into(),
    });
    let decision = plan(&deflection(), &ctx).unwrap();
    let invite = decision.plan[0].apple.as_ref().unwrap();
    assert_eq!(invite.body, "About my bill, Ada");
    assert_eq!(decision.pending_invite.as_deref(), Some("ho-earlier"));
}

#[test]
fn a_channel_the_account_has_not_enabled_is_not_used() {
    let mut ctx = context(&[Channel::Sms]);
    Arc::make_mut(&mut ctx.account).enabled_channels = vec![Channel::Whatsapp];
    let decision = plan(&deflection(), &ctx).unwrap();
    assert_eq!(why(&decision, Channel::Sms), Some(Why::NotEnabled));
    assert_eq!(decision.blocked, Some(Blocked::NoEligibleChannel));
    assert_eq!(decision.funnel_channel(), Channel::Sms);
}
