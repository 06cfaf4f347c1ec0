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
    use super::mask_phone;

    #[test]
    fn keeps_the_country_and_the_last_two_digits() {
        assert_eq!(mask_phone("+14155550123"), "+1415*****23");
        assert_eq!(mask_phone("+447700900123"), "+4477******23");
        assert_eq!(mask_phone("12345"), "*****");
    }
}
