//! Phone numbers: E.164 validation and masking for logs.

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
