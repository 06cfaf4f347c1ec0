//! A deflection request, validated at the boundary: what `CreateHandoff` and `CheckEligibility`
//! share.

use std::collections::BTreeMap;

use c2m_proto::v1::{self as pb, Channel};
use c2m_runtime::{is_e164, status::FieldViolations};
use sha2::{Digest, Sha256};
use tonic::Status;

/// The most characters an override message may have (SMS only).
pub const MAX_OVERRIDE: usize = 1600;

#[derive(Debug, Clone, PartialEq)]
pub struct Deflection {
    pub account_id: String,
    pub handoff_config_id: String,
    pub consumer_phone: String,
    pub engagement_attributes: pb::EngagementAttributes,
    pub template_variables: BTreeMap<String, String>,
    pub override_channel: Option<Channel>,
    pub override_message: Option<String>,
    pub override_skill_id: Option<String>,
    pub ivr_call_id: String,
    pub ivr_number: String,
    pub consumer_id: String,
}

fn nonempty(s: &str) -> Option<String> {
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}

#[allow(clippy::too_many_arguments)]
fn validate(
    violations: &mut FieldViolations,
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
) -> Deflection {
    if account_id.is_empty() {
        violations.add("account_id", "required");
    }
    if handoff_config_id.is_empty() {
        violations.add("handoff_config_id", "required");
    }
    if !is_e164(consumer_phone) {
        violations.add(
            "consumer_phone",
            "an E.164 number: +, country code and number, 8 to 15 digits (e.g. +14155550123)",
        );
    }
    if !ivr_number.is_empty() && !is_e164(ivr_number) {
        violations.add("ivr_number", "an E.164 number when given");
    }
    if template_variables.len() > 50 {
        violations.add("template_variables", "at most 50 variables");
    }
    for (name, value) in template_variables {
        if name.is_empty() || name.len() > 64 {
            violations.add(
                format!("template_variables[{name}]"),
                "names are 1 to 64 characters",
            );
        }
        if value.chars().count() > 1024 {
            violations.add(
                format!("template_variables[{name}]"),
                "values are at most 1024 characters",
            );
        }
    }
    let attributes = engagement_attributes.cloned().unwrap_or_default();
    for name in attributes.custom.keys() {
        if name.is_empty() || name.len() > 64 {
            violations.add(
                format!("engagement_attributes.custom[{name}]"),
                "names are 1 to 64 characters",
            );
        }
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
    Deflection {
        account_id: account_id.to_owned(),
        handoff_config_id: handoff_config_id.to_owned(),
        consumer_phone: consumer_phone.to_owned(),
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
    }
}

impl Deflection {
    /// The request and its idempotency key.
    pub fn from_create(r: &pb::CreateHandoffRequest) -> Result<(Self, String), Status> {
        let mut violations = FieldViolations::new();
        if r.idempotency_key.is_empty() || r.idempotency_key.len() > 128 {
            violations.add("idempotency_key", "required, at most 128 characters");
        }
        let deflection = validate(
            &mut violations,
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
        );
        violations.into_result()?;
        Ok((deflection, r.idempotency_key.clone()))
    }

    pub fn from_check(r: &pb::CheckEligibilityRequest) -> Result<Self, Status> {
        let mut violations = FieldViolations::new();
        let deflection = validate(
            &mut violations,
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
        );
        violations.into_result()?;
        Ok(deflection)
    }

    /// A digest of everything that shapes the handoff, to tell a retry from a different request
    /// that reuses its idempotency key.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut hash = Sha256::new();
        let mut field = |s: &str| {
            hash.update((s.len() as u64).to_le_bytes());
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
        hash.finalize().to_vec()
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
