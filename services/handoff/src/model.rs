//! Handoff's domain types: what the planner reads (a [`Context`]) and what it decides (a
//! [`Decision`] of [`Step`]s). Wire types are converted at the edges (`request.rs` for what an
//! IVR sends, `upstream.rs` for what peers answer); nothing here is a prost message.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, HandoffStatus, IneligibilityReason};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Proto enums stored by their names (`CHANNEL_SMS`, `ATTEMPT_OUTCOME_SENT`): readable in the
/// database, and stable when values are renumbered. A name this version does not know reads as
/// the enum's unspecified value.
pub(crate) mod by_name {
    use c2m_proto::v1::{AttemptOutcome, Channel};
    use serde::{Deserialize, Deserializer, Serializer};

    pub trait Named: Sized + Default {
        fn name(&self) -> &'static str;
        fn from_name(name: &str) -> Option<Self>;
    }

    macro_rules! named {
        ($($t:ty),*) => {$(
            impl Named for $t {
                fn name(&self) -> &'static str {
                    self.as_str_name()
                }
                fn from_name(name: &str) -> Option<Self> {
                    Self::from_str_name(name)
                }
            }
        )*};
    }
    named!(Channel, AttemptOutcome);

    pub fn serialize<T: Named, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(value.name())
    }

    pub fn deserialize<'de, T: Named, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(T::from_name(&name).unwrap_or_default())
    }
}

/// An approved WhatsApp template and its body parameters (`{{1}}`, `{{2}}`, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMessage {
    pub name: String,
    pub language: String,
    pub parameters: Vec<String>,
}

/// Where an Apple Messages for Business invite link leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppleInvite {
    pub business_id: String,
    pub intent_id: String,
    pub group_id: String,
    /// The message the chat opens with, for the consumer to send.
    pub body: String,
}

/// An in-app push: whose devices get it, and the notification's title.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Push {
    pub consumer_id: String,
    pub title: String,
}

/// One channel to try and what to send on it. Stored as it is (JSON) with a pending fallback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    #[serde(with = "by_name")]
    pub channel: Channel,
    /// The text the consumer reads (for WhatsApp, the template's body filled in).
    pub text: String,
    pub template: Option<TemplateMessage>,
    pub apple: Option<AppleInvite>,
    pub push: Option<Push>,
}

impl Step {
    /// Steps as stored with a pending fallback (`fallbacks.remaining`).
    pub fn encode_all(steps: &[Step]) -> serde_json::Value {
        serde_json::to_value(steps).unwrap_or_default()
    }

    /// The steps `encode_all` stored; none when they cannot be read.
    pub fn decode_all(value: &serde_json::Value) -> Vec<Step> {
        serde_json::from_value(value.clone()).unwrap_or_else(|error| {
            tracing::error!(%error, "a pending fallback's steps cannot be read");
            Vec::new()
        })
    }

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
}

/// Why a channel cannot carry this deflection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ineligible {
    pub reason: IneligibilityReason,
    pub detail: String,
}

/// One channel considered, and whether it can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eligibility {
    pub channel: Channel,
    pub refused: Option<Ineligible>,
}

impl Eligibility {
    pub fn eligible(channel: Channel) -> Self {
        Self {
            channel,
            refused: None,
        }
    }

    pub fn ineligible(
        channel: Channel,
        reason: IneligibilityReason,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            channel,
            refused: Some(Ineligible {
                reason,
                detail: detail.into(),
            }),
        }
    }

    pub fn to_wire(&self) -> pb::ChannelEligibility {
        let (reason, detail) = self
            .refused
            .as_ref()
            .map_or((IneligibilityReason::Unspecified, ""), |r| {
                (r.reason, r.detail.as_str())
            });
        pb::ChannelEligibility {
            channel: self.channel.into(),
            eligible: self.refused.is_none(),
            reason: reason.into(),
            detail: detail.to_owned(),
        }
    }
}

/// Why nothing can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    OpenConversation,
    Landline,
    OptedOut,
    NoEligibleChannel,
}

impl Blocked {
    pub fn status(self) -> HandoffStatus {
        match self {
            Self::OpenConversation => HandoffStatus::SkippedOpenConversation,
            Self::Landline => HandoffStatus::RejectedLandline,
            Self::OptedOut => HandoffStatus::RejectedOptedOut,
            Self::NoEligibleChannel => HandoffStatus::NoEligibleChannel,
        }
    }
}

/// What a deflection would do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub skill_id: String,
    /// Every channel considered, with whether it can be used and why not.
    pub channels: Vec<Eligibility>,
    /// The channels to try, in order, each with its rendered message.
    pub plan: Vec<Step>,
    /// Why nothing can be sent, when `plan` is empty.
    pub blocked: Option<Blocked>,
    /// How long a sent message may stay undelivered before the next channel is tried.
    pub delivery_deadline: Option<Duration>,
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
            .or_else(|| self.channels.first().map(|c| c.channel))
            .unwrap_or_default()
    }
}

/// The account settings the hot path reads.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Account {
    pub display_name: String,
    pub deflection_enabled: bool,
    pub enabled_channels: Vec<Channel>,
    pub landline_check: bool,
    /// Handoffs per second (at least 1).
    pub rate_limit: u32,
    /// How long a reply is routed to its deflection; an Apple invite is pending as long.
    pub reply_lookback_hours: u32,
}

/// A handoff configuration as the planner reads it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HandoffConfig {
    pub id: String,
    pub channel_priority: Vec<Channel>,
    /// The message text per channel, with `{{variables}}`.
    pub messages: BTreeMap<Channel, String>,
    pub skill_id: String,
    pub whatsapp_template_id: Option<String>,
    /// The Apple Messages for Business id; the invite's other fields are `apple`.
    pub apple: Option<AppleInvite>,
    pub delivery_deadline: Option<Duration>,
}

/// A WhatsApp template as Config has it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Template {
    pub id: String,
    pub name: String,
    pub language: String,
    pub body: String,
    pub approved: bool,
}

/// What Routing knows of the consumer.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Consumer {
    pub open_conversation: Option<String>,
    pub opted_out: Vec<Channel>,
    pub pending_invite: Option<String>,
}

/// What the gateway knows of reaching the consumer on one channel: RCS capable, a registered
/// device, WhatsApp's customer-service window open.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Reach {
    pub reachable: bool,
    pub no_credentials: bool,
    pub detail: String,
}

/// Everything the planner needs to know about a deflection's world, gathered beforehand.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Context {
    pub account: Arc<Account>,
    pub config: Arc<HandoffConfig>,
    pub consumer: Consumer,
    /// The number is a landline (asked only when the account checks).
    pub landline: bool,
    /// Per channel that needs it.
    pub reach: BTreeMap<Channel, Reach>,
    /// The configuration's WhatsApp template, when a step may need it.
    pub template: Option<Arc<Template>>,
}

/// One channel tried for a handoff. Stored as JSON in the handoff's `attempts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    #[serde(with = "by_name")]
    pub channel: Channel,
    #[serde(with = "by_name")]
    pub outcome: AttemptOutcome,
    /// The handoff's own id for the message (`<handoff>-<n>`).
    #[serde(default)]
    pub message_id: String,
    #[serde(default)]
    pub provider_message_id: String,
    #[serde(default)]
    pub error_code: String,
    #[serde(default)]
    pub error_message: String,
    pub at: DateTime<Utc>,
}

impl Attempt {
    /// The message went, or may have (its provider did not answer the send).
    pub fn went(&self) -> bool {
        matches!(
            self.outcome,
            AttemptOutcome::Sent | AttemptOutcome::Unconfirmed
        )
    }
}
