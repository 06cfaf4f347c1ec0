//! Whether a number is a landline: first the numbering plan (free, offline), then Twilio Lookup
//! v2's `line_type_intelligence` (paid), cached per number.

use c2m_proto::v1::{LineType, TwilioCredentials};
use chrono::{Duration, Utc};

use crate::store::GatewayStore;

/// How long a provider's answer about a number is reused.
pub const CACHE_FOR: Duration = Duration::days(30);

/// What the numbering plan alone says, when it says enough (the US and Canada, for one, number
/// mobiles and landlines alike, so they need a lookup).
pub fn from_numbering_plan(phone: &str) -> Option<LineType> {
    let number = phonenumber::parse(None, phone).ok()?;
    match number.number_type(&phonenumber::metadata::DATABASE) {
        phonenumber::Type::Mobile => Some(LineType::Mobile),
        phonenumber::Type::FixedLine => Some(LineType::Landline),
        phonenumber::Type::TollFree => Some(LineType::TollFree),
        phonenumber::Type::Voip => Some(LineType::Voip),
        _ => None,
    }
}

/// Twilio's line types, as `line_type_intelligence.type` spells them.
fn twilio_line_type(kind: &str) -> LineType {
    match kind {
        "mobile" => LineType::Mobile,
        "landline" => LineType::Landline,
        "fixedVoip" | "nonFixedVoip" => LineType::Voip,
        "tollFree" => LineType::TollFree,
        "unknown" | "" => LineType::Unknown,
        _ => LineType::Other,
    }
}

/// `GET {base}/v2/PhoneNumbers/{E164}?Fields=line_type_intelligence`, HTTP Basic.
pub async fn twilio(
    http: &reqwest::Client,
    base: &str,
    credentials: &TwilioCredentials,
    phone: &str,
) -> Result<LineType, String> {
    let url = format!(
        "{}/v2/PhoneNumbers/{}",
        base.trim_end_matches('/'),
        phone.replace('+', "%2B")
    );
    let response = crate::retry::call(
        http.get(&url)
            .query(&[("Fields", "line_type_intelligence")])
            .basic_auth(&credentials.account_sid, Some(&credentials.auth_token)),
    )
    .await
    .map_err(|e| format!("twilio lookup unreachable: {e}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(format!(
            "twilio lookup answered {status}: {}",
            body["message"]
        ));
    }
    Ok(twilio_line_type(
        body["line_type_intelligence"]["type"]
            .as_str()
            .unwrap_or_default(),
    ))
}

/// What the number was found to be, if that is recent enough to reuse.
pub async fn cached(
    store: &dyn GatewayStore,
    phone: &str,
) -> Result<Option<LineType>, sqlx::Error> {
    Ok(store
        .line_type(phone)
        .await?
        .filter(|(_, at)| Utc::now() - *at < CACHE_FOR)
        .map(|(kind, _)| kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbering_plan_decides_where_it_can() {
        // A UK mobile and a UK (London) landline, and a US number that could be
        // either.
        assert_eq!(from_numbering_plan("+447400123456"), Some(LineType::Mobile));
        assert_eq!(
            from_numbering_plan("+442079460123"),
            Some(LineType::Landline)
        );
        assert_eq!(from_numbering_plan("+14155550123"), None);
    }
}
