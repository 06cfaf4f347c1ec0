//! Identifiers: client-chosen slugs where people read them (accounts, configurations), generated
//! ones elsewhere.

/// Lowercase letters, digits and dashes, 3 to 64 characters, starting with a letter or digit.
pub fn is_slug(s: &str) -> bool {
    (3..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// A new time-ordered id with a readable prefix, e.g. `hc-0192f5…`.
pub fn generate(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert!(is_slug("acme"));
        assert!(is_slug("acme-uk-2"));
        assert!(!is_slug("ac"));
        assert!(!is_slug("Acme"));
        assert!(!is_slug("-acme"));
        assert!(!is_slug("acme_uk"));
        assert!(is_slug(&generate("hc")));
    }
}
