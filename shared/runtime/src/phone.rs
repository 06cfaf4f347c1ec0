//! Phone numbers: E.164 validation and masking for logs.

use std::{fmt, ops::Deref};

/// A phone number in E.164 form (`+14155550123`): it can only hold one that passed
/// [`is_e164`]. Derefs to the number as text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct E164(String);

impl E164 {
    /// What an E.164 field must hold, for an error that names it.
    pub const EXPECTED: &str =
        "an E.164 number: +, country code and number, 8 to 15 digits (e.g. +14155550123)";

    pub fn parse(phone: &str) -> Result<Self, &'static str> {
        if is_e164(phone) {
            Ok(Self(phone.to_owned()))
        } else {
            Err(Self::EXPECTED)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number fit for logs (see [`mask_phone`]).
    pub fn masked(&self) -> String {
        mask_phone(&self.0)
    }
}

impl Deref for E164 {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for E164 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<E164> for String {
    fn from(phone: E164) -> Self {
        phone.0
    }
}

impl PartialEq<str> for E164 {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for E164 {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

/// `+`, a country code and subscriber number: 8 to 15 digits in all, not starting with 0.
pub fn is_e164(phone: &str) -> bool {
    phone.strip_prefix('+').is_some_and(|digits| {
        (8..=15).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0')
    })
}

/// A phone number fit for logs: the first five and last two characters kept, the rest starred
/// (`+14155550123` → `+1415*****23`). Short or odd input is starred whole.
pub fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    if chars.len() < 9 {
        return "*".repeat(chars.len());
    }
    let (head, rest) = chars.split_at(5);
    let (middle, tail) = rest.split_at(rest.len() - 2);
    format!(
        "{}{}{}",
        head.iter().collect::<String>(),
        "*".repeat(middle.len()),
        tail.iter().collect::<String>()
    )
}

#[cfg(test)]
mod tests {
    use super::{is_e164, mask_phone};

    #[test]
    fn an_e164_holds_only_a_valid_number() {
        assert_eq!(
            super::E164::parse("+14155550123").unwrap().as_str(),
            "+14155550123"
        );
        assert!(super::E164::parse("4155550123").is_err());
        assert_eq!(
            super::E164::parse("+14155550123").unwrap().masked(),
            "+1415*****23"
        );
    }

    #[test]
    fn e164() {
        assert!(is_e164("+14155550123"));
        assert!(is_e164("+447700900123"));
        assert!(!is_e164("14155550123"));
        assert!(!is_e164("+04155550123"));
        assert!(!is_e164("+1415555012a"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
    }

    #[test]
    fn keeps_the_country_and_the_last_two_digits() {
        assert_eq!(mask_phone("+14155550123"), "+1415*****23");
        assert_eq!(mask_phone("+447700900123"), "+4477******23");
        assert_eq!(mask_phone("12345"), "*****");
    }
}
