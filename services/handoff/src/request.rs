//! A deflection request, validated at the boundary: what `CreateHandoff` and `CheckEligibility`
//! share.

use std::collections::BTreeMap;

use c2m_proto::v1::{self as pb, Channel};
use c2m_runtime::{E164, is_e164, status::FieldViolations};
use ring::digest;

use crate::error::Error;

/// The most characters an override message may have (SMS only).
pub const MAX_OVERRIDE: usize = 1600;

#[derive(Debug, Clone, PartialEq)]
pub struct Deflection {
    pub account_id: String,
    pub handoff_config_id: String,
    pub consumer_phone: E164,
    pub engagement_attributes: pb::EngagementAttributes,
    pub template_variables: BTreeMap<String, String>,
    pub override_channel: Option<Channel>,
    pub override_message: Option<String>,
    pub override_skill_id: Option<String>,
    pub ivr_call_id: String,
    pub ivr_number: String,
    pub consumer_id: String,
    /// The `CreateHandoffRequest` as it came, encoded (empty for `CheckEligibility`): kept with a
    /// handoff in progress, so that c2m can finish it if its IVR never retries.
    pub request: Vec<u8>,
}

/// The longest account and configuration ids (Config's own limit).
pub const MAX_ID: usize = 64;
/// The longest skill id an IVR may route replies to.
pub const MAX_SKILL: usize = 128;
/// The longest brand consumer id.
pub const MAX_CONSUMER_ID: usize = 256;
/// The longest value of any `customer_info` or `personal_info` field.
pub const MAX_ATTRIBUTE: usize = 256;
/// The most contacts in `personal_info`.
pub const MAX_CONTACTS: usize = 10;
/// The most `custom` engagement attributes, and the longest value of one.
pub const MAX_CUSTOM: usize = 50;
pub const MAX_CUSTOM_VALUE: usize = 1024;
/// The largest engagement attributes, encoded: they travel with the handoff to Routing, the
/// conversation and every agent's view of it.
pub const MAX_ATTRIBUTES_BYTES: usize = 16 * 1024;

/// Adds a violation when `value` has more than `max` characters.
fn at_most(violations: &mut FieldViolations, field: &str, value: &str, max: usize) {
    // Bytes first: a value of fewer bytes than `max` has fewer characters too.
    if value.len() > max && value.chars().count() > max {
        violations.add(field, format!("at most {max} characters"));
    }
}

fn attribute_limits(violations: &mut FieldViolations, attributes: &pb::EngagementAttributes) {
    use prost::Message;

    if let Some(c) = &attributes.customer_info {
        for (name, value) in [
            ("customer_id", &c.customer_id),
            ("customer_status", &c.customer_status),
            ("customer_type", &c.customer_type),
            ("balance", &c.balance),
            ("currency", &c.currency),
            ("social_id", &c.social_id),
            ("imei", &c.imei),
            ("user_name", &c.user_name),
            ("account_name", &c.account_name),
            ("role", &c.role),
            ("company_branch", &c.company_branch),
        ] {
            at_most(
                violations,
                &format!("engagement_attributes.customer_info.{name}"),
                value,
                MAX_ATTRIBUTE,
            );
        }
    }
    if let Some(p) = &attributes.personal_info {
        for (name, value) in [
            ("first_name", &p.first_name),
            ("last_name", &p.last_name),
            ("gender", &p.gender),
            ("company", &p.company),
            ("language", &p.language),
        ] {
            at_most(
                violations,
                &format!("engagement_attributes.personal_info.{name}"),
                value,
                MAX_ATTRIBUTE,
            );
        }
        if p.contacts.len() > MAX_CONTACTS {
            violations.add(
                "engagement_attributes.personal_info.contacts",
                format!("at most {MAX_CONTACTS} contacts"),
            );
        }
        for (i, contact) in p.contacts.iter().take(MAX_CONTACTS).enumerate() {
            for (name, value) in [
                ("email", &contact.email),
                ("phone", &contact.phone),
                ("country", &contact.country),
                ("region", &contact.region),
            ] {
                at_most(
                    violations,
                    &format!("engagement_attributes.personal_info.contacts[{i}].{name}"),
                    value,
                    MAX_ATTRIBUTE,
                );
            }
        }
    }
    if attributes.custom.len() > MAX_CUSTOM {
        violations.add(
            "engagement_attributes.custom",
            format!("at most {MAX_CUSTOM} attributes"),
        );
    }
    for (name, value) in &attributes.custom {
        let field = format!(
            "engagement_attributes.custom[{}]",
            name.chars().take(64).collect::<String>()
        );
        if name.is_empty() || name.len() > 64 {
            violations.add(field.clone(), "names are 1 to 64 characters");
        }
        at_most(violations, &field, value, MAX_CUSTOM_VALUE);
    }
    let size = attributes.encoded_len();
    if size > MAX_ATTRIBUTES_BYTES {
        violations.add(
            "engagement_attributes",
            format!("{size} bytes encoded; at most {MAX_ATTRIBUTES_BYTES}"),
        );
    }
}

fn nonempty(s: &str) -> Option<String> {
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

#[allow(clippy::too_many_arguments)]
fn validate(
    mut violations: FieldViolations,
    account_id: &str,
    handoff_config_id: &str,
    consumer_phone: &str,
    engagement_attributes: Option<&pb::EngagementAttributes>,
    template_variables: &std::collections::HashMap<String, String>,
    override_channel: i32,
    override_message: &str,
    override_skill_id: &str,
    ivr_call_id: &str,
    ivr_number: &str,
    consumer_id: &str,
) -> Result<Deflection, FieldViolations> {
    let violations = &mut violations;
    if account_id.is_empty() {
        violations.add("account_id", "required");
    }
    if handoff_config_id.is_empty() {
        violations.add("handoff_config_id", "required");
    }
    let phone = E164::parse(consumer_phone)
        .map_err(|expected| violations.add("consumer_phone", expected))
        .ok();
    if !ivr_number.is_empty() && !is_e164(ivr_number) {
        violations.add("ivr_number", "an E.164 number when given");
    }
    if template_variables.len() > 50 {
        violations.add("template_variables", "at most 50 variables");
    }
    for (name, value) in template_variables {
        // A name too long to be one is not repeated whole in the answer.
        let field = format!(
            "template_variables[{}]",
            name.chars().take(64).collect::<String>()
        );
        if name.is_empty() || name.len() > 64 {
            violations.add(field.clone(), "names are 1 to 64 characters");
        }
        if value.len() > 1024 && value.chars().count() > 1024 {
            violations.add(field, "values are at most 1024 characters");
        }
    }
    let attributes = engagement_attributes.cloned().unwrap_or_default();
    attribute_limits(violations, &attributes);
    for (field, value, max) in [
        ("account_id", account_id, MAX_ID),
        ("handoff_config_id", handoff_config_id, MAX_ID),
        ("override_skill_id", override_skill_id, MAX_SKILL),
        ("consumer_id", consumer_id, MAX_CONSUMER_ID),
    ] {
        at_most(violations, field, value, max);
    }
    let channel = match Channel::try_from(override_channel) {
        Ok(Channel::Unspecified) => None,
        Ok(channel) => Some(channel),
        Err(_) => {
            violations.add(
                "override_channel",
                format!("{override_channel} is not a channel"),
            );
            None
        }
    };
    let message = nonempty(override_message);
    if let Some(message) = &message {
        let length = message.chars().count();
        if length > MAX_OVERRIDE {
            violations.add(
                "override_message",
                format!("{length} characters; at most {MAX_OVERRIDE}"),
            );
        }
        if channel.is_some_and(|c| c != Channel::Sms) {
            violations.add("override_message", "only SMS messages can be overridden");
        }
    }
    if ivr_call_id.len() > 128 {
        violations.add("ivr_call_id", "at most 128 characters");
    }
    let phone = match phone {
        Some(phone) if violations.is_empty() => phone,
        _ => return Err(std::mem::take(violations)),
    };
    Ok(Deflection {
        account_id: account_id.to_owned(),
        handoff_config_id: handoff_config_id.to_owned(),
        consumer_phone: phone,
        engagement_attributes: attributes,
        template_variables: template_variables
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        override_channel: channel,
        override_message: message,
        override_skill_id: nonempty(override_skill_id),
        ivr_call_id: ivr_call_id.to_owned(),
        ivr_number: ivr_number.to_owned(),
        consumer_id: consumer_id.to_owned(),
        request: Vec::new(),
    })
}

impl Deflection {
    /// The request and its idempotency key.
    pub fn from_create(r: &pb::CreateHandoffRequest) -> Result<(Self, String), Error> {
        let mut violations = FieldViolations::new();
        if r.idempotency_key.is_empty() || r.idempotency_key.len() > 128 {
            violations.add("idempotency_key", "required, at most 128 characters");
        }
        let deflection = validate(
            violations,
            &r.account_id,
            &r.handoff_config_id,
            &r.consumer_phone,
            r.engagement_attributes.as_ref(),
            &r.template_variables,
            r.override_channel,
            &r.override_message,
            &r.override_skill_id,
            &r.ivr_call_id,
            &r.ivr_number,
            &r.consumer_id,
        )?;
        let deflection = Deflection {
            request: prost::Message::encode_to_vec(r),
            ..deflection
        };
        Ok((deflection, r.idempotency_key.clone()))
    }

    pub fn from_check(r: &pb::CheckEligibilityRequest) -> Result<Self, Error> {
        let violations = FieldViolations::new();
        let deflection = validate(
            violations,
            &r.account_id,
            &r.handoff_config_id,
            &r.consumer_phone,
            r.engagement_attributes.as_ref(),
            &r.template_variables,
            r.override_channel,
            &r.override_message,
            &r.override_skill_id,
            "",
            &r.ivr_number,
            &r.consumer_id,
        )?;
        Ok(deflection)
    }

    /// A digest of everything that shapes the handoff, to tell a retry from a different request
    /// that reuses its idempotency key.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut hash = digest::Context::new(&digest::SHA256);
        let mut field = |s: &str| {
            hash.update(&(s.len() as u64).to_le_bytes());
            hash.update(s.as_bytes());
        };
        field(&self.account_id);
        field(&self.handoff_config_id);
        field(&self.consumer_phone);
        for (k, v) in &self.template_variables {
            field(k);
            field(v);
        }
        field(self.override_channel.map_or("", |c| c.as_str_name()));
        field(self.override_message.as_deref().unwrap_or(""));
        field(self.override_skill_id.as_deref().unwrap_or(""));
        field(&self.consumer_id);
        hash.finish().as_ref().to_vec()
    }

    /// The value of a `{{name}}` placeholder: a template variable, else a well-known engagement
    /// attribute.
    pub fn variable(&self, name: &str) -> Option<String> {
        if let Some(value) = self.template_variables.get(name) {
            return Some(value.clone());
        }
        let personal = self.engagement_attributes.personal_info.as_ref();
        let customer = self.engagement_attributes.customer_info.as_ref();
        let value = match name {
            "first_name" => personal.map(|p| p.first_name.clone()),
            "last_name" => personal.map(|p| p.last_name.clone()),
            "company" => personal.map(|p| p.company.clone()),
            "customer_id" => customer.map(|c| c.customer_id.clone()),
            "account_name" => customer.map(|c| c.account_name.clone()),
            other => self.engagement_attributes.custom.get(other).cloned(),
        };
        value.filter(|v| !v.is_empty())
    }
}
