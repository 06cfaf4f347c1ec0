//! What both backends share: the column lists (the same names in both schemas), how enums and
//! lists become text, and the audit records' JSON.

use c2m_proto::v1::Channel;

use super::StoreError;
use crate::model::{Account, HandoffConfig, Template, WebhookEndpoint};

pub(super) const ACCOUNT_COLUMNS: &str = "account_id, display_name, deflection_enabled, landline_check_enabled, \
    rate_limit_per_second, enabled_channels, reply_lookback_hours, created_at, idle_close_minutes, \
    help_text, time_zone";

pub(super) const CONFIG_COLUMNS: &str = "handoff_config_id, account_id, name, skill_id, channel_priority, messages, \
    whatsapp_template_id, apple_business_id, apple_intent_id, apple_group_id, apple_body, \
    delivery_deadline_seconds, version, updated_at";

pub(super) const KEY_COLUMNS: &str =
    "api_key_id, account_id, name, prefix, created_at, last_used_at, revoked_at, scopes";

pub(super) fn sql(text: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(text)
}

pub(super) const TEMPLATE_COLUMNS: &str =
    "template_id, account_id, name, language, category, body, status";

pub(super) fn names(channels: &[Channel]) -> Vec<&'static str> {
    channels.iter().map(|c| c.as_str_name()).collect()
}

pub(super) fn channels(names: Vec<String>) -> Vec<Channel> {
    names
        .iter()
        .filter_map(|n| Channel::from_str_name(n))
        .collect()
}

pub(super) fn conflict(what: &'static str) -> impl Fn(sqlx::Error) -> StoreError {
    move |e| match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what),
        _ => StoreError::Db(e),
    }
}

pub(super) fn account_json(a: &Account) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.Account", &a.to_wire())
}

pub(super) fn config_json(c: &HandoffConfig) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.HandoffConfig", &c.to_wire())
}

pub(super) fn template_json(t: &Template) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.WhatsAppTemplate", &t.to_wire())
}

pub(super) fn messages_json(c: &HandoffConfig) -> serde_json::Value {
    serde_json::Value::Object(
        c.messages
            .iter()
            .map(|(channel, text)| (channel.as_str_name().to_owned(), text.clone().into()))
            .collect(),
    )
}

/// A configuration's messages from their JSON object (channel name to text).
pub(super) fn messages(value: &serde_json::Value) -> Vec<(Channel, String)> {
    value
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((Channel::from_str_name(k)?, v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) const ENDPOINT_COLUMNS: &str = "webhook_endpoint_id, account_id, url, description, event_types, enabled, \
    disabled_reason, failing_since, created_at, updated_at";

pub(super) fn endpoint_json(e: &WebhookEndpoint) -> serde_json::Value {
    c2m_proto::to_json("c2m.v1.WebhookEndpoint", &e.to_wire())
}
