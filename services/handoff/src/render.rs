//! `{{name}}` placeholders, filled from the request's template variables.

/// Renders `template`; `Err(name)` for the first placeholder with no value, so that no message
/// with a literal placeholder ever leaves.
pub fn render(template: &str, value: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start + 2..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let name = rest[start + 2..start + 2 + len].trim();
        out.push_str(&value(name).ok_or_else(|| name.to_owned())?);
        rest = &rest[start + 2 + len + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::render;

    fn vars(name: &str) -> Option<String> {
        match name {
            "first_name" => Some("Ada".into()),
            "1" => Some("42".into()),
            _ => None,
        }
    }

    #[test]
    fn fills_placeholders_and_names_the_missing_one() {
        assert_eq!(
            render("Hi {{first_name}}, order {{ 1 }} ready", vars).as_deref(),
            Ok("Hi Ada, order 42 ready")
        );
        assert_eq!(
            render("no placeholders", vars).as_deref(),
            Ok("no placeholders")
        );
        assert_eq!(
            render("Hi {{last_name}}", vars),
            Err("last_name".to_owned())
        );
        assert_eq!(
            render("unclosed {{first_name", vars).as_deref(),
            Ok("unclosed {{first_name")
        );
    }
}
