//! Config's domain types, validated from their wire form at the boundary.

use c2m_proto::v1::{self as pb, Channel};
use c2m_runtime::{ids, status::FieldViolations};
use chrono::{DateTime, Utc};

pub const DEFAULT_RATE_LIMIT: u32 = 30;
pub const DEFAULT_LOOKBACK_HOURS: u32 = 24;
pub const MAX_LOOKBACK_HOURS: u32 = 30 * 24;
pub const MAX_IDLE_CLOSE_MINUTES: u32 = 7 * 24 * 60;
pub const MAX_HELP_TEXT: usize = 320;
pub const ALL_CHANNELS: [Channel; 5] = [
    Channel::Sms,
    Channel::Whatsapp,
    Channel::Rcs,
    Channel::AppleMessages,
    Channel::AppMessaging,
];

/// The most characters a channel carries in one message.
pub fn message_limit(channel: Channel) -> usize {
    match channel {
        Channel::Sms | Channel::AppleMessages => 1600,
        Channel::Whatsapp => 4096,
        Channel::Rcs => 3072,
        Channel::AppMessaging | Channel::Unspecified => 1024,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub id: String,
    pub display_name: String,
    pub settings: Settings,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub deflection_enabled: bool,
    pub landline_check_enabled: bool,
    pub rate_limit_per_second: u32,
    pub enabled_channels: Vec<Channel>,
    pub reply_lookback_hours: u32,
    /// Minutes without a message after which a conversation is closed; 0: never.
    pub idle_close_minutes: u32,
    pub help_text: String,
    /// An IANA name; empty: UTC.
    pub time_zone: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            deflection_enabled: false,
            landline_check_enabled: false,
            rate_limit_per_second: DEFAULT_RATE_LIMIT,
            enabled_channels: ALL_CHANNELS.to_vec(),
            reply_lookback_hours: DEFAULT_LOOKBACK_HOURS,
            idle_close_minutes: 0,
            help_text: String::new(),
            time_zone: String::new(),
        }
    }
}

impl Settings {
    /// Validates wire settings; `field` is where they sit in the request (e.g. `settings`).
    pub fn from_wire(
        wire: &pb::AccountSettings,
        field: &str,
        violations: &mut FieldViolations,
    ) -> Self {
        let mut channels = Vec::new();
        for (i, raw) in wire.enabled_channels.iter().enumerate() {
            match Channel::try_from(*raw) {
                Ok(Channel::Unspecified) | Err(_) => violations.add(
                    format!("{field}.enabled_channels[{i}]"),
                    format!("{raw} is not a channel"),
                ),
                Ok(channel) if channels.contains(&channel) => violations.add(
                    format!("{field}.enabled_channels[{i}]"),
                    format!("{} is listed twice", channel.as_str_name()),
                ),
                Ok(channel) => channels.push(channel),
            }
        }
        if channels.is_empty() {
            channels = ALL_CHANNELS.to_vec();
        }
        let lookback = match wire.reply_lookback_hours {
            0 => DEFAULT_LOOKBACK_HOURS,
            h if h > MAX_LOOKBACK_HOURS => {
                violations.add(
                    format!("{field}.reply_lookback_hours"),
                    format!("at most {MAX_LOOKBACK_HOURS} (30 days)"),
                );
                h
            }
            h => h,
        };
        if wire.rate_limit_per_second > 100_000 {
            violations.add(format!("{field}.rate_limit_per_second"), "at most 100000");
        }
        if wire.idle_close_minutes > MAX_IDLE_CLOSE_MINUTES {
            violations.add(
                format!("{field}.idle_close_minutes"),
                format!("at most {MAX_IDLE_CLOSE_MINUTES} (a week)"),
            );
        }
        if wire.help_text.chars().count() > MAX_HELP_TEXT {
            violations.add(
                format!("{field}.help_text"),
                format!("at most {MAX_HELP_TEXT} characters"),
            );
        }
        let time_zone = wire.time_zone.trim();
        if time_zone.len() > 64
            || (!time_zone.is_empty() && time_zone.parse::<chrono_tz::Tz>().is_err())
        {
            violations.add(
                format!("{field}.time_zone"),
                format!("{time_zone:?} is not an IANA time zone (e.g. America/New_York, Europe/Paris, UTC)"),
            );
        }
        Self {
            deflection_enabled: wire.deflection_enabled,
            landline_check_enabled: wire.landline_check_enabled,
            rate_limit_per_second: match wire.rate_limit_per_second {
                0 => DEFAULT_RATE_LIMIT,
                n => n,
            },
            enabled_channels: channels,
            reply_lookback_hours: lookback,
            idle_close_minutes: wire.idle_close_minutes,
            help_text: wire.help_text.trim().to_owned(),
            time_zone: time_zone.to_owned(),
        }
    }

    pub fn to_wire(&self) -> pb::AccountSettings {
        pb::AccountSettings {
            deflection_enabled: self.deflection_enabled,
            landline_check_enabled: self.landline_check_enabled,
            rate_limit_per_second: self.rate_limit_per_second,
            enabled_channels: self.enabled_channels.iter().map(|c| *c as i32).collect(),
            reply_lookback_hours: self.reply_lookback_hours,
            idle_close_minutes: self.idle_close_minutes,
            help_text: self.help_text.clone(),
            time_zone: self.time_zone.clone(),
        }
    }
}

impl Account {
    pub fn to_wire(&self) -> pb::Account {
        pb::Account {
            account_id: self.id.clone(),
            display_name: self.display_name.clone(),
            settings: Some(self.settings.to_wire()),
            created_at: Some(c2m_proto::timestamp(self.created_at)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HandoffConfig {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub skill_id: String,
    pub channel_priority: Vec<Channel>,
    pub messages: Vec<(Channel, String)>,
    pub whatsapp_template_id: Option<String>,
    pub apple_business_id: String,
    pub apple_intent_id: String,
    pub apple_group_id: String,
    pub apple_body: String,
    pub delivery_deadline_seconds: u32,
    pub version: i64,
    pub updated_at: DateTime<Utc>,
}

impl HandoffConfig {
    /// Validates a configuration against the account it belongs to.
    pub fn from_wire(
        account: &Account,
        wire: &pb::HandoffConfig,
        violations: &mut FieldViolations,
    ) -> Self {
        let id = if wire.handoff_config_id.is_empty() {
            ids::generate("hc")
        } else {
            if !ids::is_slug(&wire.handoff_config_id) {
                violations.add(
                    "config.handoff_config_id",
                    "3 to 64 lowercase letters, digits or dashes",
                );
            }
            wire.handoff_config_id.clone()
        };
        let name = wire.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 100 {
            violations.add("config.name", "required, at most 100 characters");
        }
        if wire.skill_id.trim().is_empty() || wire.skill_id.len() > 128 {
            violations.add("config.skill_id", "required, at most 128 characters");
        }
        let mut priority = Vec::new();
        if wire.channel_priority.is_empty() {
            violations.add("config.channel_priority", "at least one channel");
        }
        for (i, raw) in wire.channel_priority.iter().enumerate() {
            let field = format!("config.channel_priority[{i}]");
            match Channel::try_from(*raw) {
                Ok(Channel::Unspecified) | Err(_) => {
                    violations.add(field, format!("{raw} is not a channel"))
                }
                Ok(channel) if priority.contains(&channel) => {
                    violations.add(field, format!("{} is listed twice", channel.as_str_name()))
                }
                Ok(channel) if !account.settings.enabled_channels.contains(&channel) => violations
                    .add(
                        field,
                        format!(
                            "{} is not enabled on account {}",
                            channel.as_str_name(),
                            account.id
                        ),
                    ),
                Ok(channel) => priority.push(channel),
            }
        }
        let mut messages: Vec<(Channel, String)> = Vec::new();
        for (i, message) in wire.messages.iter().enumerate() {
            let field = format!("config.messages[{i}]");
            match Channel::try_from(message.channel) {
                Ok(channel) if priority.contains(&channel) => {
                    if messages.iter().any(|(c, _)| *c == channel) {
                        violations.add(format!("{field}.channel"), "one message per channel");
                    }
                    let limit = message_limit(channel);
                    let length = message.text.chars().count();
                    if message.text.trim().is_empty() {
                        violations.add(format!("{field}.text"), "required");
                    } else if length > limit {
                        violations.add(
                            format!("{field}.text"),
                            format!(
                                "{length} characters; {} allows {limit}",
                                channel.as_str_name()
                            ),
                        );
                    }
                    messages.push((channel, message.text.clone()));
                }
                _ => violations.add(
                    format!("{field}.channel"),
                    "must be one of the configuration's channels",
                ),
            }
        }
        for channel in &priority {
            let needs_text =
                !matches!(channel, Channel::Whatsapp) || wire.whatsapp_template_id.is_empty();
            if needs_text && !messages.iter().any(|(c, _)| c == channel) {
                violations.add(
                    "config.messages",
                    format!("no message for {}", channel.as_str_name()),
                );
            }
        }
        if priority.contains(&Channel::AppleMessages) && wire.apple_business_id.trim().is_empty() {
            violations.add(
                "config.apple_business_id",
                "required when CHANNEL_APPLE_MESSAGES is a channel: the invite links to it",
            );
        }
        if wire.apple_body.chars().count() > 500 {
            violations.add("config.apple_body", "at most 500 characters");
        }
        Self {
            id,
            account_id: account.id.clone(),
            name,
            skill_id: wire.skill_id.trim().to_owned(),
            channel_priority: priority,
            messages,
            whatsapp_template_id: Some(wire.whatsapp_template_id.clone()).filter(|t| !t.is_empty()),
            apple_business_id: wire.apple_business_id.clone(),
            apple_intent_id: wire.apple_intent_id.clone(),
            apple_group_id: wire.apple_group_id.clone(),
            apple_body: wire.apple_body.clone(),
            delivery_deadline_seconds: wire.delivery_deadline_seconds,
            version: 1,
            updated_at: Utc::now(),
        }
    }

    pub fn to_wire(&self) -> pb::HandoffConfig {
        pb::HandoffConfig {
            handoff_config_id: self.id.clone(),
            account_id: self.account_id.clone(),
            name: self.name.clone(),
            skill_id: self.skill_id.clone(),
            channel_priority: self.channel_priority.iter().map(|c| *c as i32).collect(),
            messages: self
                .messages
                .iter()
                .map(|(channel, text)| pb::ChannelMessage {
                    channel: *channel as i32,
                    text: text.clone(),
                })
                .collect(),
            whatsapp_template_id: self.whatsapp_template_id.clone().unwrap_or_default(),
            apple_business_id: self.apple_business_id.clone(),
            apple_intent_id: self.apple_intent_id.clone(),
            apple_group_id: self.apple_group_id.clone(),
            apple_body: self.apple_body.clone(),
            delivery_deadline_seconds: self.delivery_deadline_seconds,
            version: self.version,
            updated_at: Some(c2m_proto::timestamp(self.updated_at)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<pb::ApiKeyScope>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    pub fn to_wire(&self) -> pb::ApiKey {
        pb::ApiKey {
            api_key_id: self.id.clone(),
            account_id: self.account_id.clone(),
            name: self.name.clone(),
            prefix: self.prefix.clone(),
            created_at: Some(c2m_proto::timestamp(self.created_at)),
            last_used_at: self.last_used_at.map(c2m_proto::timestamp),
            revoked_at: self.revoked_at.map(c2m_proto::timestamp),
            scopes: self.scopes.iter().map(|s| *s as i32).collect(),
        }
    }

    /// Validates requested scopes: known, each once; none means handoffs (an IVR's key).
    pub fn scopes_from_wire(
        wire: &[i32],
        violations: &mut FieldViolations,
    ) -> Vec<pb::ApiKeyScope> {
        let mut scopes = Vec::new();
        for (i, raw) in wire.iter().enumerate() {
            match pb::ApiKeyScope::try_from(*raw) {
                Ok(pb::ApiKeyScope::Unspecified) | Err(_) => violations.add(
                    format!("scopes[{i}]"),
                    format!("{raw} is not a scope: API_KEY_SCOPE_HANDOFFS or API_KEY_SCOPE_CONVERSATIONS"),
                ),
                Ok(scope) if scopes.contains(&scope) => {
                    violations.add(format!("scopes[{i}]"), "listed twice")
                }
                Ok(scope) => scopes.push(scope),
            }
        }
        if scopes.is_empty() {
            scopes.push(pb::ApiKeyScope::Handoffs);
        }
        scopes
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub id: String,
    pub account_id: String,
    pub name: String,
    pub language: String,
    pub category: pb::WhatsAppTemplateCategory,
    pub body: String,
    pub status: pb::WhatsAppTemplateStatus,
}

impl Template {
    /// Validates a new template as Meta would take it: lowercase name, a language code, a
    /// category, a body of at most 1024 characters with numbered placeholders.
    pub fn from_wire(
        account_id: &str,
        wire: &pb::WhatsAppTemplate,
        violations: &mut FieldViolations,
    ) -> Self {
        let id = if wire.template_id.is_empty() {
            ids::generate("tpl")
        } else {
            if !ids::is_slug(&wire.template_id) {
                violations.add(
                    "template.template_id",
                    "3 to 64 lowercase letters, digits or dashes",
                );
            }
            wire.template_id.clone()
        };
        let name_ok = !wire.name.is_empty()
            && wire.name.len() <= 512
            && wire
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            violations.add(
                "template.name",
                "lowercase letters, digits and underscores, at most 512",
            );
        }
        let language_ok = matches!(wire.language.len(), 2 | 5)
            && wire
                .language
                .chars()
                .take(2)
                .all(|c| c.is_ascii_lowercase())
            && (wire.language.len() == 2
                || (wire.language.as_bytes()[2] == b'_'
                    && wire.language[3..].chars().all(|c| c.is_ascii_uppercase())));
        if !language_ok {
            violations.add("template.language", "a language code such as en or en_US");
        }
        let category = match pb::WhatsAppTemplateCategory::try_from(wire.category) {
            Ok(pb::WhatsAppTemplateCategory::Unspecified) | Err(_) => {
                violations.add("template.category", "marketing, utility or authentication");
                pb::WhatsAppTemplateCategory::Unspecified
            }
            Ok(category) => category,
        };
        let length = wire.body.chars().count();
        if wire.body.trim().is_empty() || length > 1024 {
            violations.add(
                "template.body",
                format!("required, at most 1024 characters (has {length})"),
            );
        }
        Self {
            id,
            account_id: account_id.to_owned(),
            name: wire.name.clone(),
            language: wire.language.clone(),
            category,
            body: wire.body.clone(),
            status: pb::WhatsAppTemplateStatus::Pending,
        }
    }

    pub fn to_wire(&self) -> pb::WhatsAppTemplate {
        pb::WhatsAppTemplate {
            template_id: self.id.clone(),
            account_id: self.account_id.clone(),
            name: self.name.clone(),
            language: self.language.clone(),
            category: self.category as i32,
            body: self.body.clone(),
            status: self.status as i32,
        }
    }
}

/// The events an endpoint can subscribe to, as the `type` of their payloads: a handoff's stages
/// (from Reporting's event log) and conversation events (from Routing's stream).
pub const WEBHOOK_EVENT_TYPES: [&str; 18] = [
    "handoff.attempted",
    "handoff.sent",
    "handoff.delivered",
    "handoff.read",
    "handoff.failed",
    "handoff.responded",
    "handoff.skipped_open_conversation",
    "handoff.skipped_recent_handoff",
    "handoff.rejected_landline",
    "handoff.rejected_opted_out",
    "handoff.no_eligible_channel",
    "conversation.opened",
    "conversation.message",
    "conversation.message_stage",
    "conversation.assigned",
    "conversation.released",
    "conversation.transferred",
    "conversation.closed",
];
const MAX_WEBHOOK_URL: usize = 2048;
const MAX_WEBHOOK_DESCRIPTION: usize = 256;
const MAX_WEBHOOK_EVENT_TYPES: usize = WEBHOOK_EVENT_TYPES.len();

/// Where an account's events are posted.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookEndpoint {
    pub id: String,
    pub account_id: String,
    pub url: String,
    pub description: String,
    /// Empty: every type.
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub disabled_reason: String,
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// Validates what an admin may set (URL, description, event types, state); `field` is where
    /// the endpoint sits in the request.
    pub fn from_wire(
        wire: &pb::WebhookEndpoint,
        account_id: &str,
        field: &str,
        violations: &mut FieldViolations,
    ) -> Self {
        let url = wire.url.trim();
        if url.is_empty() || url.len() > MAX_WEBHOOK_URL {
            violations.add(
                format!("{field}.url"),
                format!("required, at most {MAX_WEBHOOK_URL} characters"),
            );
        } else if let Err(why) = webhook_url(url) {
            violations.add(format!("{field}.url"), why);
        }
        if wire.description.chars().count() > MAX_WEBHOOK_DESCRIPTION {
            violations.add(
                format!("{field}.description"),
                format!("at most {MAX_WEBHOOK_DESCRIPTION} characters"),
            );
        }
        if wire.event_types.len() > MAX_WEBHOOK_EVENT_TYPES {
            violations.add(
                format!("{field}.event_types"),
                format!("at most {MAX_WEBHOOK_EVENT_TYPES}"),
            );
        }
        let mut event_types: Vec<String> = Vec::new();
        for (i, t) in wire.event_types.iter().enumerate() {
            if !WEBHOOK_EVENT_TYPES.contains(&t.as_str()) {
                violations.add(
                    format!("{field}.event_types[{i}]"),
                    format!(
                        "{t:?} is not an event type: {}",
                        WEBHOOK_EVENT_TYPES.join(", ")
                    ),
                );
            } else if !event_types.contains(t) {
                event_types.push(t.clone());
            }
        }
        let enabled = match pb::WebhookEndpointState::try_from(wire.state) {
            Ok(pb::WebhookEndpointState::Disabled) => false,
            Ok(_) => true,
            Err(_) => {
                violations.add(
                    format!("{field}.state"),
                    format!("{} is not a state", wire.state),
                );
                true
            }
        };
        let now = Utc::now();
        Self {
            id: if wire.webhook_endpoint_id.is_empty() {
                ids::generate("whep")
            } else {
                wire.webhook_endpoint_id.clone()
            },
            account_id: account_id.to_owned(),
            url: url.to_owned(),
            description: wire.description.clone(),
            event_types,
            enabled,
            disabled_reason: if enabled {
                String::new()
            } else {
                "disabled by an admin".to_owned()
            },
            failing_since: None,
            created_at: now,
            updated_at: now,
        }
    }

    /// Whether events of `event_type` go to this endpoint.
    pub fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }

    pub fn to_wire(&self) -> pb::WebhookEndpoint {
        pb::WebhookEndpoint {
            webhook_endpoint_id: self.id.clone(),
            account_id: self.account_id.clone(),
            url: self.url.clone(),
            description: self.description.clone(),
            event_types: self.event_types.clone(),
            state: if self.enabled {
                pb::WebhookEndpointState::Enabled
            } else {
                pb::WebhookEndpointState::Disabled
            } as i32,
            disabled_reason: self.disabled_reason.clone(),
            created_at: Some(c2m_proto::timestamp(self.created_at)),
            updated_at: Some(c2m_proto::timestamp(self.updated_at)),
            failing_since: self.failing_since.map(c2m_proto::timestamp),
        }
    }
}

/// An https URL, or http to a loopback address (for trying it out on one machine).
fn webhook_url(raw: &str) -> Result<(), &'static str> {
    let url = url::Url::parse(raw).map_err(|_| "not a URL")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials do not belong in the URL: the signature authenticates c2m");
    }
    let loopback = match url.host() {
        Some(url::Host::Domain(name)) => name == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => return Err("a URL with a host"),
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err("https (http only to a loopback address)"),
    }
}

/// One attempt to post one event to an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    pub endpoint_id: String,
    pub webhook_id: String,
    pub event_type: String,
    pub attempt: u32,
    /// 0 when no answer came.
    pub http_status: u16,
    pub error: String,
    pub duration_ms: u32,
    pub succeeded: bool,
    pub at: DateTime<Utc>,
}

impl WebhookDelivery {
    pub fn to_wire(&self) -> pb::WebhookDelivery {
        pb::WebhookDelivery {
            webhook_id: self.webhook_id.clone(),
            event_type: self.event_type.clone(),
            attempt: self.attempt,
            http_status: u32::from(self.http_status),
            error: self.error.clone(),
            duration_ms: self.duration_ms,
            at: Some(c2m_proto::timestamp(self.at)),
            succeeded: self.succeeded,
        }
    }
}
