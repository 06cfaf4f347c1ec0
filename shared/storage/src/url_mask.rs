/// Replaces the password of a URL (`scheme://user:secret@host`) with `*****`, for logs and for
/// printing the effective configuration. Text that does not parse as a URL is returned unchanged.
pub fn mask_password(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only fails for URLs that cannot have credentials, which this one has.
            let _ = parsed.set_password(Some("*****"));
            parsed.to_string()
        }
        _ => raw.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::mask_password;

    #[test]
    fn masks_only_the_password() {
        assert_eq!(
            mask_password("postgres://c2m:hunter2@db:5432/c2m"),
            "postgres://c2m:*****@db:5432/c2m"
        );
        assert_eq!(
            mask_password("redis://:s3cret@cache:6379/0"),
            "redis://:*****@cache:6379/0"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1/c2m"),
            "postgres://postgres@127.0.0.1/c2m"
        );
    }
}
