//! HTML for the console's pages: escaping, the layout every page shares, and small parts.

use std::fmt::Write as _;

/// `text` safe inside an element or a quoted attribute.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The navigation of an account's pages, and who is signed in.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    pub account_id: &'a str,
    pub who: String,
    pub csrf: String,
    /// Which link is the current page.
    pub current: &'a str,
}

/// A whole page: `title`, the account's navigation (when there is one), and `body`.
pub(crate) fn layout(title: &str, frame: Option<&Frame<'_>>, body: &str) -> String {
    layout_refreshing(title, frame, body, None)
}

/// [`layout`], reloaded by the browser every `refresh` seconds when given (no script needed).
pub(crate) fn layout_refreshing(
    title: &str,
    frame: Option<&Frame<'_>>,
    body: &str,
    refresh: Option<u32>,
) -> String {
    let refresh = refresh.map_or_else(String::new, |s| {
        format!(r#"<meta http-equiv="refresh" content="{s}">"#)
    });
    let mut nav = String::new();
    if let Some(f) = frame {
        let account = esc(f.account_id);
        let _ = write!(
            nav,
            r#"<a href="/console/a/{account}"><strong>c2m</strong> · {account}</a><nav aria-label="Account">"#
        );
        for (path, name) in [
            ("", "Overview"),
            ("/configs", "Configurations"),
            ("/try", "Try it"),
            ("/transactions", "Handoffs"),
            ("/conversations", "Conversations"),
            ("/templates", "Templates"),
            ("/webhooks", "Webhooks"),
            ("/credentials", "Credentials"),
            ("/settings", "Settings"),
            ("/keys", "API keys"),
            ("/audit", "Audit log"),
        ] {
            let current = if f.current == name {
                r#" aria-current="page""#
            } else {
                ""
            };
            let _ = write!(
                nav,
                r#"<a href="/console/a/{account}{path}"{current}>{name}</a>"#
            );
        }
        nav.push_str("</nav>");
        let _ = write!(
            nav,
            r#"<div class="who"><span>{who}</span><form method="post" action="/console/sign-out"><input type="hidden" name="csrf" value="{csrf}"><button type="submit">Sign out</button></form></div>"#,
            who = esc(&f.who),
            csrf = esc(&f.csrf),
        );
    } else {
        nav.push_str("<strong>c2m console</strong>");
    }
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">{refresh}
<title>{title} · c2m</title>
<link rel="stylesheet" href="/console/assets/console.css">
</head>
<body>
<header>{nav}</header>
<main id="main">
{body}
</main>
</body>
</html>
"#,
        title = esc(title)
    )
}

pub(crate) fn error_page(title: &str, message: &str) -> String {
    layout(
        title,
        None,
        &format!(
            r#"<h1>{}</h1><p class="banner bad" role="alert">{}</p><p><a href="/console">Back to the console</a></p>"#,
            esc(title),
            esc(message)
        ),
    )
}

/// A banner: `good` or `bad`.
pub(crate) fn banner(kind: &str, message: &str) -> String {
    let role = if kind == "bad" { "alert" } else { "status" };
    format!(
        r#"<p class="banner {kind}" role="{role}">{}</p>"#,
        esc(message)
    )
}

/// A labelled text input, with its error under it when it has one.
pub(crate) fn text_field(
    name: &str,
    label: &str,
    value: &str,
    hint: &str,
    error: Option<&str>,
    editable: bool,
) -> String {
    let id = format!("f-{name}");
    let (invalid, message) = field_error(&id, error);
    let readonly = if editable { "" } else { " readonly" };
    let hint = if hint.is_empty() {
        String::new()
    } else {
        format!(r#" <span class="hint">{}</span>"#, esc(hint))
    };
    format!(
        r#"<label for="{id}">{label}{hint}</label><input type="text" id="{id}" name="{name}" value="{value}"{invalid}{readonly}>{message}"#,
        label = esc(label),
        value = esc(value),
    )
}

/// A labelled text area, with its error.
pub(crate) fn text_area(
    name: &str,
    label: &str,
    value: &str,
    error: Option<&str>,
    editable: bool,
) -> String {
    let id = format!("f-{name}");
    let (invalid, message) = field_error(&id, error);
    let readonly = if editable { "" } else { " readonly" };
    format!(
        r#"<label for="{id}">{label}</label><textarea id="{id}" name="{name}"{invalid}{readonly}>{value}</textarea>{message}"#,
        label = esc(label),
        value = esc(value),
    )
}

/// `aria-invalid` and the message element for a field's error.
pub(crate) fn field_error(id: &str, error: Option<&str>) -> (String, String) {
    match error {
        Some(error) => (
            format!(r#" aria-invalid="true" aria-describedby="{id}-error""#),
            format!(
                r#"<p class="field-error" id="{id}-error">{}</p>"#,
                esc(error)
            ),
        ),
        None => (String::new(), String::new()),
    }
}

/// A bar chart of the funnel over time: per bucket, bars for each series, as inline SVG (no
/// script, no outside asset), with a text equivalent in the table beside it.
pub(crate) fn bar_chart(labels: &[String], series: &[(&str, &str, Vec<u64>)]) -> String {
    let height = 160.0;
    let bar = 12.0;
    let gap = 10.0;
    let group = bar * series.len() as f64 + gap;
    let width = 40.0 + group * labels.len().max(1) as f64;
    let top = series
        .iter()
        .flat_map(|(_, _, values)| values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let mut svg = format!(
        r#"<svg role="img" aria-label="Funnel by day" width="{width}" height="{h}" viewBox="0 0 {width} {h}">"#,
        h = height + 40.0
    );
    for (i, label) in labels.iter().enumerate() {
        let x0 = 30.0 + i as f64 * group;
        for (j, (_, color, values)) in series.iter().enumerate() {
            let value = values.get(i).copied().unwrap_or(0) as f64;
            let h = (value / top * height).max(if value > 0.0 { 1.0 } else { 0.0 });
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{y}" width="{bar}" height="{h}" fill="{color}"><title>{value}</title></rect>"#,
                x = x0 + j as f64 * bar,
                y = 10.0 + height - h,
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{x}" y="{y}">{label}</text>"#,
            x = x0,
            y = height + 28.0,
            label = esc(label.get(5..).unwrap_or(label)),
        );
    }
    svg.push_str("</svg>");
    let mut legend = String::from(r#"<p class="legend">"#);
    for (name, color, _) in series {
        let _ = write!(
            legend,
            r#"<span><svg class="swatch" width="12" height="12" aria-hidden="true"><rect width="12" height="12" fill="{color}"/></svg>{}</span>"#,
            esc(name)
        );
    }
    legend.push_str("</p>");
    format!("{svg}{legend}")
}
