//! The console's pages. Each reads and changes through the RPCs, as the signed-in person.

use std::{collections::HashMap, fmt::Write as _, time::SystemTime};

use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Uri, header},
    response::{Html, IntoResponse, Response},
};
use c2m_proto::v1::{self as pb, Channel, config_service_server::ConfigService};
use c2m_runtime::auth::Role;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::{
    Form, Posted, Session, SignedIn, console_role, forged, html, secure_cookie, secured, see_other,
    session_cookie, to_sign_in,
};
use crate::Service;

/// A rendered page, with its status.
pub(crate) type Page = Response;

const CHANNELS: [Channel; 5] = [
    Channel::Sms,
    Channel::Whatsapp,
    Channel::Rcs,
    Channel::AppleMessages,
    Channel::AppMessaging,
];

/// What a person reads for a channel.
fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Sms => "SMS",
        Channel::Whatsapp => "WhatsApp",
        Channel::Rcs => "RCS",
        Channel::AppleMessages => "Apple Messages for Business",
        Channel::AppMessaging => "App messaging",
        Channel::Unspecified => "—",
    }
}

pub(crate) fn ok(body: String) -> Page {
    secured(Html(body).into_response())
}

fn with_status(status: StatusCode, body: String) -> Page {
    secured((status, Html(body)).into_response())
}

/// The page for an RPC that refused outright (not a form's bad input).
pub(crate) fn refused(status: &Status) -> Page {
    let (code, title) = match status.code() {
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "Not allowed"),
        Code::NotFound => (StatusCode::NOT_FOUND, "Not found"),
        Code::Unauthenticated => return to_sign_in(),
        _ => (StatusCode::BAD_GATEWAY, "Something failed"),
    };
    with_status(code, html::error_page(title, status.message()))
}

pub(crate) fn frame<'a>(
    session: &Session,
    account_id: &'a str,
    current: &'a str,
) -> html::Frame<'a> {
    html::Frame {
        account_id,
        who: session.who(),
        csrf: session.csrf(),
        current,
    }
}

/// The query string's `name`, decoded.
pub(crate) fn query(uri: &Uri, name: &str) -> String {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Field violations as (field, description), from an INVALID_ARGUMENT.
fn violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| {
            bad.field_violations
                .into_iter()
                .map(|v| (v.field, v.description))
                .collect()
        })
        .unwrap_or_default()
}

// ---- sign-in --------------------------------------------------------------------------------

pub(crate) async fn home(State(service): State<Service>, headers: HeaderMap, uri: Uri) -> Page {
    let Some(session) = Session::from_headers(&service, &headers) else {
        return ok(sign_in_page(None));
    };
    let open = query(&uri, "account");
    if !open.is_empty() {
        return see_other(&format!(
            "/console/a/{}",
            url::form_urlencoded::byte_serialize(open.as_bytes()).collect::<String>()
        ));
    }
    match &session.claims.account_id {
        Some(account) if session.claims.role != Role::Operator => {
            see_other(&format!("/console/a/{account}"))
        }
        _ => ok(html::layout(
            "Open an account",
            None,
            &format!(
                r#"<h1>Open an account</h1><section><p>Signed in as {who}. Operators act on every account.</p>
<form method="get" action="/console"><label for="f-account">Account id</label><input type="text" id="f-account" name="account" required>
<button type="submit">Open</button></form></section>"#,
                who = html::esc(&session.who())
            ),
        )),
    }
}

fn sign_in_page(error: Option<&str>) -> String {
    let (invalid, message) = html::field_error("f-token", error);
    html::layout(
        "Sign in",
        None,
        &format!(
            r#"<h1>Sign in to the c2m console</h1>
<section><form method="post" action="/console/sign-in">
<label for="f-token">Your token <span class="hint">from your operator, or <code>c2m token --role admin --account &lt;id&gt;</code></span></label>
<textarea id="f-token" name="token" required autocomplete="off"{invalid}></textarea>{message}
<button type="submit">Sign in</button>
</form></section>"#
        ),
    )
}

pub(crate) async fn sign_in(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Bytes,
) -> Page {
    let form = Form::parse(&body);
    let token = form.get("token").trim().to_owned();
    let claims = match service.key.verify(&token, SystemTime::now()) {
        Ok(claims) => claims,
        Err(error) => {
            return with_status(
                StatusCode::UNAUTHORIZED,
                sign_in_page(Some(&format!("This token does not sign in: {error}."))),
            );
        }
    };
    if !console_role(claims.role) {
        return with_status(
            StatusCode::FORBIDDEN,
            sign_in_page(Some(&format!(
                "The console is for viewers, editors, admins and operators; this token is an {}'s.",
                claims.role.name()
            ))),
        );
    }
    let left = claims.exp.saturating_sub(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
    );
    let target = match (&claims.account_id, claims.role) {
        (Some(account), role) if role != Role::Operator => format!("/console/a/{account}"),
        _ => "/console".to_owned(),
    };
    let mut response = see_other(&target);
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&token, left, secure_cookie(&headers)),
    );
    response
}

pub(crate) async fn sign_out(
    State(service): State<Service>,
    headers: HeaderMap,
    body: Bytes,
) -> Page {
    if let Some(session) = Session::from_headers(&service, &headers)
        && !session.csrf_ok(&Form::parse(&body))
    {
        return forged();
    }
    let mut response = see_other("/console");
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie("", 0, secure_cookie(&headers)),
    );
    response
}

// ---- overview -------------------------------------------------------------------------------

/// The overview's grouping choices: (query value, label, dimension).
const GROUPINGS: [(&str, &str, pb::FunnelGrouping); 4] = [
    ("", "The whole account", pb::FunnelGrouping::Unspecified),
    ("channel", "By channel", pb::FunnelGrouping::Channel),
    ("skill", "By skill", pb::FunnelGrouping::Skill),
    (
        "config",
        "By configuration",
        pb::FunnelGrouping::HandoffConfig,
    ),
];

pub(crate) async fn overview(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let account = match service
        .get_account(session.request(pb::GetAccountRequest {
            account_id: account_id.clone(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().account.unwrap_or_default(),
        Err(status) => return refused(&status),
    };
    let mut body = format!(
        "<h1>{}</h1>",
        html::esc(&format!("{} — overview", account.display_name))
    );
    let settings = account.settings.unwrap_or_default();
    if !settings.deflection_enabled {
        body.push_str(&html::banner(
            "bad",
            "Deflection is off for this account: handoffs are refused until an admin turns it on in Settings.",
        ));
    }
    let by = query(&uri, "by");
    let (_, _, grouping) = GROUPINGS
        .iter()
        .find(|(value, _, _)| *value == by)
        .copied()
        .unwrap_or(GROUPINGS[0]);
    let series = match service.peers.reporting_for(&session.token) {
        Ok(mut reporting) => reporting
            .get_funnel_series(pb::GetFunnelSeriesRequest {
                account_id: account_id.clone(),
                bucket: pb::FunnelBucket::Day as i32,
                group_by: if grouping == pb::FunnelGrouping::Unspecified {
                    Vec::new()
                } else {
                    vec![grouping as i32]
                },
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner),
        Err(status) => Err(status),
    };
    let mut options = String::new();
    for (value, label, _) in GROUPINGS {
        let selected = if value == by { " selected" } else { "" };
        let _ = write!(
            options,
            r#"<option value="{value}"{selected}>{label}</option>"#
        );
    }
    let _ = write!(
        body,
        r#"<section><h2>The last seven days</h2><form method="get" class="grid" aria-label="Grouping"><div><label for="f-by">Show</label><select id="f-by" name="by">{options}</select></div><div><button type="submit" class="secondary">Show</button></div></form>"#
    );
    match series {
        Ok(series) if series.rows.is_empty() => {
            body.push_str("<p>No handoffs in the last seven days.</p>");
        }
        Ok(series) => body.push_str(&funnel_section(&series)),
        Err(status) => body.push_str(&html::banner(
            "bad",
            &format!("The funnel is unavailable: {}", status.message()),
        )),
    }
    body.push_str("</section>");
    ok(html::layout(
        "Overview",
        Some(&frame(&session, &account_id, "Overview")),
        &body,
    ))
}

/// Colours for grouped series, each at least 4.5:1 against white.
const PALETTE: [&str; 6] = [
    "#0b57d0", "#1a7f37", "#8250df", "#bc4c00", "#0a7d8c", "#a4161a",
];

fn funnel_section(series: &pb::GetFunnelSeriesResponse) -> String {
    let count = |row: &pb::FunnelSeriesRow, stage: pb::FunnelStage| {
        row.counts
            .iter()
            .find(|c| c.stage == stage as i32)
            .map_or(0, |c| c.count)
    };
    let grouped = series.rows.iter().any(|r| !r.groups.is_empty());
    let mut labels: Vec<String> = series.rows.iter().map(|r| r.bucket_label.clone()).collect();
    labels.dedup();
    let chart = if grouped {
        // Per group, the handoffs attempted each day (the six largest groups).
        let mut groups: Vec<(String, u64)> = Vec::new();
        for row in &series.rows {
            let name = row.groups.join(" · ");
            let n = count(row, pb::FunnelStage::Attempted);
            match groups.iter_mut().find(|(g, _)| *g == name) {
                Some((_, total)) => *total += n,
                None => groups.push((name, n)),
            }
        }
        groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let bars: Vec<(String, &str, Vec<u64>)> = groups
            .iter()
            .take(PALETTE.len())
            .zip(PALETTE)
            .map(|((name, _), color)| {
                let values = labels
                    .iter()
                    .map(|day| {
                        series
                            .rows
                            .iter()
                            .filter(|r| &r.bucket_label == day && r.groups.join(" · ") == *name)
                            .map(|r| count(r, pb::FunnelStage::Attempted))
                            .sum()
                    })
                    .collect();
                (
                    format!(
                        "{} (attempted)",
                        if name.is_empty() { "none" } else { name }
                    ),
                    color,
                    values,
                )
            })
            .collect();
        let bars: Vec<(&str, &str, Vec<u64>)> = bars
            .iter()
            .map(|(name, color, values)| (name.as_str(), *color, values.clone()))
            .collect();
        html::bar_chart(&labels, &bars)
    } else {
        let column = |stage| series.rows.iter().map(|r| count(r, stage)).collect();
        html::bar_chart(
            &labels,
            &[
                ("Attempted", "#0b57d0", column(pb::FunnelStage::Attempted)),
                ("Delivered", "#8250df", column(pb::FunnelStage::Delivered)),
                ("Responded", "#1a7f37", column(pb::FunnelStage::Responded)),
            ],
        )
    };
    let group_head = if grouped {
        r#"<th scope="col">Group</th>"#
    } else {
        ""
    };
    let mut table = format!(
        r#"<table><caption class="hint">Days in {}; each handoff counts on the day it was attempted.</caption>
<thead><tr><th scope="col">Day</th>{group_head}<th scope="col" class="n">Attempted</th><th scope="col" class="n">Sent</th><th scope="col" class="n">Delivered</th><th scope="col" class="n">Responded</th><th scope="col" class="n">Delivery rate</th><th scope="col" class="n">Deflection rate</th><th scope="col" class="n">Median reply</th><th scope="col" class="n">Called again within a day</th></tr></thead><tbody>"#,
        html::esc(&series.time_zone)
    );
    for row in &series.rows {
        let reply = row.time_to_reply.filter(|t| t.count > 0).map_or_else(
            || "—".to_owned(),
            |t| format!("{:.0} s", t.p50_ms as f64 / 1000.0),
        );
        let group = if grouped {
            let name = row.groups.join(" · ");
            format!(
                "<td>{}</td>",
                html::esc(if name.is_empty() { "none" } else { &name })
            )
        } else {
            String::new()
        };
        let _ = write!(
            table,
            r#"<tr><th scope="row">{}</th>{group}<td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{}</td><td class="n">{:.1}%</td><td class="n">{:.1}%</td><td class="n">{}</td><td class="n">{}</td></tr>"#,
            html::esc(&row.bucket_label),
            count(row, pb::FunnelStage::Attempted),
            count(row, pb::FunnelStage::Sent),
            count(row, pb::FunnelStage::Delivered),
            count(row, pb::FunnelStage::Responded),
            row.delivery_rate * 100.0,
            row.deflection_rate * 100.0,
            reply,
            row.repeat_deflections,
        );
    }
    table.push_str("</tbody></table>");
    format!("{chart}{table}")
}

// ---- handoff configurations -----------------------------------------------------------------

pub(crate) async fn configs(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let channel = Channel::from_str_name(&query(&uri, "channel")).unwrap_or_default();
    let skill = query(&uri, "skill");
    let listed = match service
        .list_handoff_configs(session.request(pb::ListHandoffConfigsRequest {
            account_id: account_id.clone(),
            page_size: 100,
            channel: channel as i32,
            skill_id: skill.clone(),
            ..Default::default()
        }))
        .await
    {
        Ok(answer) => answer.into_inner().configs,
        Err(status) => return refused(&status),
    };
    let account = html::esc(&account_id);
    let mut body = String::from("<h1>Handoff configurations</h1>");
    if session.may(&account_id, Role::Editor) {
        let _ = write!(
            body,
            r#"<p><a class="button" href="/console/a/{account}/configs/new">New configuration</a></p>"#
        );
    }
    let mut options = String::from(r#"<option value="">Any channel</option>"#);
    for c in CHANNELS {
        let selected = if c == channel { " selected" } else { "" };
        let _ = write!(
            options,
            r#"<option value="{}"{selected}>{}</option>"#,
            c.as_str_name(),
            channel_name(c)
        );
    }
    let _ = write!(
        body,
        r#"<section><form method="get" class="grid" aria-label="Filter">
<div><label for="f-channel">Channel</label><select id="f-channel" name="channel">{options}</select></div>
<div><label for="f-skill">Skill</label><input type="text" id="f-skill" name="skill" value="{skill}"></div>
<div><button type="submit" class="secondary">Filter</button></div></form></section>"#,
        skill = html::esc(&skill)
    );
    if listed.is_empty() {
        body.push_str("<section><p>No configuration matches.</p></section>");
    } else {
        body.push_str(r#"<section><table><thead><tr><th scope="col">Name</th><th scope="col">Id</th><th scope="col">Skill</th><th scope="col">Channels, in order</th><th scope="col" class="n">Version</th></tr></thead><tbody>"#);
        for c in &listed {
            let channels: Vec<&str> = c
                .channel_priority
                .iter()
                .map(|n| channel_name(Channel::try_from(*n).unwrap_or_default()))
                .collect();
            let _ = write!(
                body,
                r#"<tr><td><a href="/console/a/{account}/configs/{id}">{name}</a></td><td>{id}</td><td>{skill}</td><td>{channels}</td><td class="n">{version}</td></tr>"#,
                id = html::esc(&c.handoff_config_id),
                name = html::esc(&c.name),
                skill = html::esc(&c.skill_id),
                channels = html::esc(&channels.join(" → ")),
                version = c.version,
            );
        }
        body.push_str("</tbody></table></section>");
    }
    ok(html::layout(
        "Configurations",
        Some(&frame(&session, &account_id, "Configurations")),
        &body,
    ))
}

/// Sample values for a preview.
const SAMPLE: [(&str, &str); 5] = [
    ("first_name", "Ada"),
    ("last_name", "Lovelace"),
    ("topic", "your bill"),
    ("handoff_id", "ho-sample"),
    ("skill_id", "billing-agents"),
];

/// `text` with `{{name}}` placeholders filled from [`SAMPLE`]; others shown as `[name]`.
pub(crate) fn render_sample(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = after[..close].trim();
        match SAMPLE.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                let _ = write!(out, "[{name}]");
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

/// How many SMS segments `text` takes: GSM-7 (160, or 153 each when split; some characters
/// count twice) or, with any other character, UCS-2 (70, or 67 each).
pub(crate) fn sms_segments(text: &str) -> (usize, &'static str) {
    const GSM: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    const EXTENDED: &str = "^{}\\[~]|€\u{c}";
    let gsm: Option<usize> = text.chars().try_fold(0, |n, c| {
        if GSM.contains(c) {
            Some(n + 1)
        } else if EXTENDED.contains(c) {
            Some(n + 2)
        } else {
            None
        }
    });
    match gsm {
        Some(n) if n <= 160 => (1, "GSM-7"),
        Some(n) => (n.div_ceil(153), "GSM-7"),
        None => {
            let units = text.encode_utf16().count();
            (if units <= 70 { 1 } else { units.div_ceil(67) }, "UCS-2")
        }
    }
}

/// A configuration form's values, as submitted or as stored.
#[derive(Debug, Default, Clone)]
struct ConfigForm {
    id: String,
    name: String,
    skill_id: String,
    priority: Vec<Channel>,
    messages: HashMap<Channel, String>,
    whatsapp_template_id: String,
    apple_business_id: String,
    apple_intent_id: String,
    apple_group_id: String,
    apple_body: String,
    delivery_deadline_seconds: String,
    version: i64,
}

impl ConfigForm {
    fn from_wire(c: &pb::HandoffConfig) -> Self {
        Self {
            id: c.handoff_config_id.clone(),
            name: c.name.clone(),
            skill_id: c.skill_id.clone(),
            priority: c
                .channel_priority
                .iter()
                .filter_map(|n| Channel::try_from(*n).ok())
                .collect(),
            messages: c
                .messages
                .iter()
                .filter_map(|m| Some((Channel::try_from(m.channel).ok()?, m.text.clone())))
                .collect(),
            whatsapp_template_id: c.whatsapp_template_id.clone(),
            apple_business_id: c.apple_business_id.clone(),
            apple_intent_id: c.apple_intent_id.clone(),
            apple_group_id: c.apple_group_id.clone(),
            apple_body: c.apple_body.clone(),
            delivery_deadline_seconds: c.delivery_deadline_seconds.to_string(),
            version: c.version,
        }
    }

    fn from_form(form: &Form) -> Self {
        let priority = (1..=CHANNELS.len())
            .filter_map(|i| Channel::from_str_name(&form.get(&format!("channel_{i}"))))
            .collect();
        let messages = CHANNELS
            .iter()
            .map(|c| (*c, form.get(&format!("message_{}", c.as_str_name()))))
            .filter(|(_, text)| !text.trim().is_empty())
            .collect();
        Self {
            id: form.get("handoff_config_id").trim().to_owned(),
            name: form.get("name"),
            skill_id: form.get("skill_id"),
            priority,
            messages,
            whatsapp_template_id: form.get("whatsapp_template_id"),
            apple_business_id: form.get("apple_business_id"),
            apple_intent_id: form.get("apple_intent_id"),
            apple_group_id: form.get("apple_group_id"),
            apple_body: form.get("apple_body"),
            delivery_deadline_seconds: form.get("delivery_deadline_seconds"),
            version: form.get("version").parse().unwrap_or_default(),
        }
    }

    /// The configuration to send, and the channel of each message in the order sent (so a
    /// violation of `messages[i]` finds its field). A deadline that is not a number is a
    /// violation of its own.
    fn to_wire(&self, account_id: &str) -> (pb::HandoffConfig, Vec<Channel>, Option<String>) {
        let order: Vec<Channel> = CHANNELS
            .iter()
            .copied()
            .filter(|c| self.messages.contains_key(c))
            .collect();
        let deadline = self.delivery_deadline_seconds.trim();
        let (deadline, bad_deadline) = if deadline.is_empty() {
            (0, None)
        } else {
            match deadline.parse::<u32>() {
                Ok(n) => (n, None),
                Err(_) => (
                    0,
                    Some("a whole number of seconds (0: no fallback on delivery)".to_owned()),
                ),
            }
        };
        let config = pb::HandoffConfig {
            handoff_config_id: self.id.clone(),
            account_id: account_id.to_owned(),
            name: self.name.clone(),
            skill_id: self.skill_id.clone(),
            channel_priority: self.priority.iter().map(|c| *c as i32).collect(),
            messages: order
                .iter()
                .map(|c| pb::ChannelMessage {
                    channel: *c as i32,
                    text: self.messages[c].clone(),
                })
                .collect(),
            whatsapp_template_id: self.whatsapp_template_id.clone(),
            apple_business_id: self.apple_business_id.clone(),
            apple_intent_id: self.apple_intent_id.clone(),
            apple_group_id: self.apple_group_id.clone(),
            apple_body: self.apple_body.clone(),
            delivery_deadline_seconds: deadline,
            version: self.version,
            updated_at: None,
        };
        (config, order, bad_deadline)
    }
}

/// Form field names for RPC violations of `config.…`.
fn config_errors(
    found: &[(String, String)],
    order: &[Channel],
) -> (HashMap<String, String>, Vec<String>) {
    let mut fields = HashMap::new();
    let mut other = Vec::new();
    for (field, why) in found {
        let name = field.strip_prefix("config.").unwrap_or(field);
        let form_field = if let Some(rest) = name.strip_prefix("messages[") {
            rest.split_once(']')
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .and_then(|i| order.get(i))
                .map(|c| format!("message_{}", c.as_str_name()))
        } else if let Some(rest) = name.strip_prefix("channel_priority[") {
            rest.split_once(']')
                .and_then(|(i, _)| i.parse::<usize>().ok())
                .map(|i| format!("channel_{}", i + 1))
        } else if name == "channel_priority" {
            Some("channel_1".to_owned())
        } else if [
            "handoff_config_id",
            "name",
            "skill_id",
            "whatsapp_template_id",
            "apple_business_id",
            "apple_intent_id",
            "apple_group_id",
            "apple_body",
            "delivery_deadline_seconds",
        ]
        .contains(&name)
        {
            Some(name.to_owned())
        } else {
            None
        };
        match form_field {
            Some(f) => {
                fields.entry(f).or_insert_with(|| why.clone());
            }
            None => other.push(format!("{field}: {why}")),
        }
    }
    (fields, other)
}

struct ConfigPage<'a> {
    account_id: &'a str,
    /// `None`: a new configuration.
    existing: Option<&'a str>,
    form: &'a ConfigForm,
    errors: &'a HashMap<String, String>,
    banners: String,
    preview: bool,
    editable: bool,
    /// The WhatsApp template the configuration names, for the preview.
    template: Option<pb::WhatsAppTemplate>,
}

fn config_page(session: &Session, page: ConfigPage<'_>) -> String {
    let ConfigPage {
        account_id,
        existing,
        form,
        errors,
        banners,
        preview,
        editable,
        template,
    } = page;
    let error = |name: &str| errors.get(name).map(String::as_str);
    let title = match existing {
        Some(_) => format!("Configuration {}", form.name),
        None => "New configuration".to_owned(),
    };
    let action = match existing {
        Some(id) => format!("/console/a/{account_id}/configs/{id}"),
        None => format!("/console/a/{account_id}/configs/new"),
    };
    let mut body = format!("<h1>{}</h1>{banners}", html::esc(&title));
    if !editable {
        body.push_str(&html::banner(
            "good",
            "You can read this configuration; changing it needs the editor role.",
        ));
    }
    let _ = write!(
        body,
        r#"<form method="post" action="{action}" novalidate><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="version" value="{version}"><section><h2>What and where</h2><div class="grid">"#,
        action = html::esc(&action),
        csrf = html::esc(&session.csrf()),
        version = form.version,
    );
    if existing.is_none() {
        body.push_str(&format!(
            "<div>{}</div>",
            html::text_field(
                "handoff_config_id",
                "Id",
                &form.id,
                "lowercase letters, digits and dashes; empty: one is made",
                error("handoff_config_id"),
                editable
            )
        ));
    }
    let _ = write!(
        body,
        "<div>{}</div><div>{}</div><div>{}</div></div></section>",
        html::text_field("name", "Name", &form.name, "", error("name"), editable),
        html::text_field(
            "skill_id",
            "Skill",
            &form.skill_id,
            "where replies are routed",
            error("skill_id"),
            editable
        ),
        html::text_field(
            "delivery_deadline_seconds",
            "Delivery deadline (seconds)",
            &form.delivery_deadline_seconds,
            "try the next channel when no receipt comes in time; 0: never",
            error("delivery_deadline_seconds"),
            editable
        ),
    );
    body.push_str(r#"<section><h2>Channels, in the order they are tried</h2><div class="grid">"#);
    for i in 1..=CHANNELS.len() {
        let name = format!("channel_{i}");
        let id = format!("f-{name}");
        let (invalid, message) = html::field_error(&id, error(&name));
        let chosen = form.priority.get(i - 1).copied();
        let mut options = String::from(r#"<option value="">—</option>"#);
        for c in CHANNELS {
            let selected = if Some(c) == chosen { " selected" } else { "" };
            let _ = write!(
                options,
                r#"<option value="{}"{selected}>{}</option>"#,
                c.as_str_name(),
                channel_name(c)
            );
        }
        let disabled = if editable { "" } else { " disabled" };
        let _ = write!(
            body,
            r#"<div><label for="{id}">{ordinal}</label><select id="{id}" name="{name}"{invalid}{disabled}>{options}</select>{message}</div>"#,
            ordinal = ["First", "Second", "Third", "Fourth", "Fifth"][i - 1],
        );
    }
    body.push_str("</div></section><section><h2>Messages</h2><p class=\"hint\">Placeholders such as <code>{{first_name}}</code> are filled from the IVR's variables.</p>");
    for c in CHANNELS {
        let name = format!("message_{}", c.as_str_name());
        let text = form.messages.get(&c).cloned().unwrap_or_default();
        body.push_str(&html::text_area(
            &name,
            channel_name(c),
            &text,
            error(&name),
            editable,
        ));
    }
    let _ = write!(
        body,
        r#"</section><section><h2>WhatsApp and Apple Messages for Business</h2><div class="grid"><div>{}</div><div>{}</div><div>{}</div><div>{}</div></div>{}</section>"#,
        html::text_field(
            "whatsapp_template_id",
            "WhatsApp template",
            &form.whatsapp_template_id,
            "sent to start a conversation",
            error("whatsapp_template_id"),
            editable
        ),
        html::text_field(
            "apple_business_id",
            "Apple business id",
            &form.apple_business_id,
            "",
            error("apple_business_id"),
            editable
        ),
        html::text_field(
            "apple_intent_id",
            "Apple intent",
            &form.apple_intent_id,
            "",
            error("apple_intent_id"),
            editable
        ),
        html::text_field(
            "apple_group_id",
            "Apple group",
            &form.apple_group_id,
            "",
            error("apple_group_id"),
            editable
        ),
        html::text_area(
            "apple_body",
            "Apple chat's opening message",
            &form.apple_body,
            error("apple_body"),
            editable
        ),
    );
    if preview {
        body.push_str(&preview_section(form, template.as_ref()));
    }
    body.push_str(r#"<p><button type="submit" name="action" value="preview" class="secondary">Preview</button>"#);
    if editable {
        body.push_str(r#" <button type="submit" name="action" value="save">Save</button>"#);
    }
    body.push_str("</p></form>");
    html::layout(
        &title,
        Some(&frame(session, account_id, "Configurations")),
        &body,
    )
}

/// The distinct `{{n}}` placeholders of a WhatsApp template's body, in order.
pub(crate) fn template_placeholders(body: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for piece in body.split("{{").skip(1) {
        if let Some((name, _)) = piece.split_once("}}") {
            let name = name.trim().to_owned();
            if !name.is_empty() && !found.contains(&name) {
                found.push(name);
            }
        }
    }
    found
}

fn preview_section(form: &ConfigForm, template: Option<&pb::WhatsAppTemplate>) -> String {
    let mut out = String::from(
        r#"<section aria-live="polite"><h2>Preview</h2><p class="hint">With sample values: first_name Ada, last_name Lovelace, topic “your bill”.</p>"#,
    );
    let shown: Vec<Channel> = if form.priority.is_empty() {
        CHANNELS.to_vec()
    } else {
        form.priority.clone()
    };
    let mut any = false;
    for c in shown {
        let Some(text) = form.messages.get(&c) else {
            continue;
        };
        any = true;
        let rendered = render_sample(text);
        let note = if c == Channel::Sms {
            let (segments, encoding) = sms_segments(&rendered);
            format!(
                r#"<p class="hint">{} characters, {segments} SMS segment{} ({encoding})</p>"#,
                rendered.chars().count(),
                if segments == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        };
        let _ = write!(
            out,
            r#"<h3>{}</h3><div class="preview" data-channel="{}">{}</div>{note}"#,
            channel_name(c),
            c.as_str_name(),
            html::esc(&rendered)
        );
    }
    if let Some(t) = template {
        any = true;
        let placeholders = template_placeholders(&t.body);
        let status = pb::WhatsAppTemplateStatus::try_from(t.status)
            .map_or("", |s| s.as_str_name())
            .trim_start_matches("WHATS_APP_TEMPLATE_STATUS_")
            .to_lowercase();
        let _ = write!(
            out,
            r#"<h3>WhatsApp template {name} ({language})</h3><div class="preview" data-channel="WHATSAPP_TEMPLATE">{body}</div><p class="hint">{count} placeholder{s} ({list}), filled from the IVR's variables; Meta's review: {status}.</p>"#,
            name = html::esc(&t.name),
            language = html::esc(&t.language),
            body = html::esc(&t.body),
            count = placeholders.len(),
            s = if placeholders.len() == 1 { "" } else { "s" },
            list = html::esc(
                &placeholders
                    .iter()
                    .map(|p| format!("{{{{{p}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            status = html::esc(&status),
        );
        if t.status != pb::WhatsAppTemplateStatus::Approved as i32 {
            out.push_str(&html::banner(
                "bad",
                "Meta has not approved this template: WhatsApp handoffs fall to the next channel until it does.",
            ));
        }
    }
    if !any {
        out.push_str("<p>No message to preview yet.</p>");
    }
    out.push_str("</section>");
    out
}

pub(crate) async fn new_config(
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
) -> Page {
    if !session.may(&account_id, Role::Editor) {
        return refused(&Status::permission_denied(
            "creating a configuration needs the editor role",
        ));
    }
    let form = ConfigForm {
        priority: vec![Channel::Sms],
        delivery_deadline_seconds: "0".into(),
        ..ConfigForm::default()
    };
    ok(config_page(
        &session,
        ConfigPage {
            account_id: &account_id,
            existing: None,
            form: &form,
            errors: &HashMap::new(),
            banners: String::new(),
            preview: false,
            editable: true,
            template: None,
        },
    ))
}

pub(crate) async fn edit_config(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path((account_id, id)): Path<(String, String)>,
) -> Page {
    let config = match service
        .get_handoff_config(session.request(pb::GetHandoffConfigRequest {
            account_id: account_id.clone(),
            handoff_config_id: id.clone(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().config.unwrap_or_default(),
        Err(status) => return refused(&status),
    };
    let form = ConfigForm::from_wire(&config);
    ok(config_page(
        &session,
        ConfigPage {
            account_id: &account_id,
            existing: Some(&id),
            form: &form,
            errors: &HashMap::new(),
            banners: String::new(),
            preview: false,
            editable: session.may(&account_id, Role::Editor),
            template: None,
        },
    ))
}

pub(crate) async fn save_new_config(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    posted: Posted,
) -> Page {
    submit_config(service, account_id, None, posted).await
}

pub(crate) async fn save_config(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    posted: Posted,
) -> Page {
    submit_config(service, account_id, Some(id), posted).await
}

async fn submit_config(
    service: Service,
    account_id: String,
    existing: Option<String>,
    Posted {
        session,
        form: submitted,
    }: Posted,
) -> Page {
    let mut form = ConfigForm::from_form(&submitted);
    if let Some(id) = &existing {
        form.id.clone_from(id);
    }
    let editable = session.may(&account_id, Role::Editor);
    let render = |form: &ConfigForm, errors: &HashMap<String, String>, banners: String, preview| {
        config_page(
            &session,
            ConfigPage {
                account_id: &account_id,
                existing: existing.as_deref(),
                form,
                errors,
                banners,
                preview,
                editable,
                template: None,
            },
        )
    };
    if submitted.get("action") == "preview" || !submitted.has("action") {
        let template = if form.whatsapp_template_id.trim().is_empty() {
            None
        } else {
            service
                .get_whats_app_template(session.request(pb::GetWhatsAppTemplateRequest {
                    account_id: account_id.clone(),
                    template_id: form.whatsapp_template_id.trim().to_owned(),
                }))
                .await
                .ok()
                .and_then(|r| r.into_inner().template)
        };
        return ok(config_page(
            &session,
            ConfigPage {
                account_id: &account_id,
                existing: existing.as_deref(),
                form: &form,
                errors: &HashMap::new(),
                banners: String::new(),
                preview: true,
                editable,
                template,
            },
        ));
    }
    let (config, order, bad_deadline) = form.to_wire(&account_id);
    if let Some(why) = bad_deadline {
        let errors = HashMap::from([("delivery_deadline_seconds".to_owned(), why)]);
        return ok(render(
            &form,
            &errors,
            html::banner("bad", "Check the field marked below."),
            false,
        ));
    }
    let saved = match &existing {
        None => service
            .create_handoff_config(session.request(pb::CreateHandoffConfigRequest {
                account_id: account_id.clone(),
                config: Some(config),
            }))
            .await
            .map(|r| r.into_inner().config),
        Some(_) => service
            .update_handoff_config(session.request(pb::UpdateHandoffConfigRequest {
                account_id: account_id.clone(),
                config: Some(config),
            }))
            .await
            .map(|r| r.into_inner().config),
    };
    match saved {
        Ok(Some(saved)) => see_other(&format!(
            "/console/a/{account_id}/configs/{}?saved=1",
            url::form_urlencoded::byte_serialize(saved.handoff_config_id.as_bytes())
                .collect::<String>()
        )),
        Ok(None) => refused(&Status::internal(
            "the configuration was saved but not returned",
        )),
        Err(status) if status.code() == Code::InvalidArgument => {
            let (errors, other) = config_errors(&violations(&status), &order);
            let mut banners = html::banner(
                "bad",
                "The configuration was not saved: check the fields marked below.",
            );
            for message in other {
                banners.push_str(&html::banner("bad", &message));
            }
            ok(render(&form, &errors, banners, false))
        }
        Err(status) if status.code() == Code::Aborted => {
            let current = match &existing {
                Some(id) => service
                    .get_handoff_config(session.request(pb::GetHandoffConfigRequest {
                        account_id: account_id.clone(),
                        handoff_config_id: id.clone(),
                    }))
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().config),
                None => None,
            };
            let message = match &current {
                Some(current) => format!(
                    "Someone else changed this configuration while you edited it: it is now at version {} (you started from version {}). Your changes are below, not saved; reload the page to start from theirs.",
                    current.version, form.version
                ),
                None => status.message().to_owned(),
            };
            ok(render(
                &form,
                &HashMap::new(),
                html::banner("bad", &message),
                false,
            ))
        }
        Err(status) if status.code() == Code::AlreadyExists => {
            let errors =
                HashMap::from([("handoff_config_id".to_owned(), status.message().to_owned())]);
            ok(render(
                &form,
                &errors,
                html::banner("bad", status.message()),
                false,
            ))
        }
        Err(status) => refused(&status),
    }
}

// ---- settings -------------------------------------------------------------------------------

pub(crate) async fn settings(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let account = match service
        .get_account(session.request(pb::GetAccountRequest {
            account_id: account_id.clone(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().account.unwrap_or_default(),
        Err(status) => return refused(&status),
    };
    let banner = if query(&uri, "saved") == "1" {
        html::banner("good", "Settings saved.")
    } else {
        String::new()
    };
    ok(settings_page(
        &session,
        &account_id,
        &account.settings.unwrap_or_default(),
        &HashMap::new(),
        banner,
    ))
}

fn settings_page(
    session: &Session,
    account_id: &str,
    s: &pb::AccountSettings,
    errors: &HashMap<String, String>,
    banners: String,
) -> String {
    let editable = session.may(account_id, Role::Admin);
    let error = |name: &str| errors.get(name).map(String::as_str);
    let check = |name: &str, label: &str, on: bool| {
        let checked = if on { " checked" } else { "" };
        let disabled = if editable { "" } else { " disabled" };
        format!(
            r#"<label><input type="checkbox" name="{name}" value="on"{checked}{disabled}> {label}</label>"#
        )
    };
    let mut body = format!("<h1>Settings</h1>{banners}");
    if !editable {
        body.push_str(&html::banner(
            "good",
            "You can read these settings; changing them needs the admin role.",
        ));
    }
    let _ = write!(
        body,
        r#"<form method="post" novalidate><input type="hidden" name="csrf" value="{}"><section><h2>Deflection</h2>{}{}<div class="grid"><div>{}</div><div>{}</div><div>{}</div><div>{}</div></div>"#,
        html::esc(&session.csrf()),
        check("deflection_enabled", "Deflection on", s.deflection_enabled),
        check(
            "landline_check_enabled",
            "Check for landlines before sending",
            s.landline_check_enabled
        ),
        html::text_field(
            "rate_limit_per_second",
            "Handoffs per second",
            &s.rate_limit_per_second.to_string(),
            "over any one-second window",
            error("rate_limit_per_second"),
            editable
        ),
        html::text_field(
            "reply_lookback_hours",
            "Reply window (hours)",
            &s.reply_lookback_hours.to_string(),
            "a reply this long after the message counts as a response",
            error("reply_lookback_hours"),
            editable
        ),
        html::text_field(
            "idle_close_minutes",
            "Close idle conversations after (minutes)",
            &s.idle_close_minutes.to_string(),
            "0: never",
            error("idle_close_minutes"),
            editable
        ),
        html::text_field(
            "time_zone",
            "Time zone",
            &s.time_zone,
            "IANA name for reports, e.g. America/New_York; empty: UTC",
            error("time_zone"),
            editable
        ),
    );
    body.push_str(r#"<fieldset><legend>Channels the account may use</legend>"#);
    let enabled: Vec<i32> = s.enabled_channels.clone();
    for c in CHANNELS {
        body.push_str(&check(
            &format!("channel_{}", c.as_str_name()),
            channel_name(c),
            enabled.is_empty() || enabled.contains(&(c as i32)),
        ));
    }
    let _ = write!(
        body,
        "</fieldset></section><section><h2>Conversations</h2>{}</section>",
        html::text_area(
            "help_text",
            "What a consumer who texts HELP is answered",
            &s.help_text,
            error("help_text"),
            editable
        )
    );
    if editable {
        body.push_str(r#"<p><button type="submit">Save settings</button></p>"#);
    }
    body.push_str("</form>");
    html::layout(
        "Settings",
        Some(&frame(session, account_id, "Settings")),
        &body,
    )
}

pub(crate) async fn save_settings(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted { session, form }: Posted,
) -> Page {
    let mut errors = HashMap::new();
    let mut number = |name: &str| -> u32 {
        let text = form.get(name);
        text.trim().parse().unwrap_or_else(|_| {
            errors.insert(name.to_owned(), "a whole number".to_owned());
            0
        })
    };
    let settings = pb::AccountSettings {
        deflection_enabled: form.has("deflection_enabled"),
        landline_check_enabled: form.has("landline_check_enabled"),
        rate_limit_per_second: number("rate_limit_per_second"),
        enabled_channels: CHANNELS
            .iter()
            .filter(|c| form.has(&format!("channel_{}", c.as_str_name())))
            .map(|c| *c as i32)
            .collect(),
        reply_lookback_hours: number("reply_lookback_hours"),
        idle_close_minutes: number("idle_close_minutes"),
        help_text: form.get("help_text"),
        time_zone: form.get("time_zone"),
    };
    if !errors.is_empty() {
        return ok(settings_page(
            &session,
            &account_id,
            &settings,
            &errors,
            html::banner(
                "bad",
                "The settings were not saved: check the fields marked below.",
            ),
        ));
    }
    match service
        .update_account_settings(session.request(pb::UpdateAccountSettingsRequest {
            account_id: account_id.clone(),
            settings: Some(settings.clone()),
        }))
        .await
    {
        Ok(_) => see_other(&format!("/console/a/{account_id}/settings?saved=1")),
        Err(status) if status.code() == Code::InvalidArgument => {
            let errors = violations(&status)
                .into_iter()
                .map(|(field, why)| {
                    let name = field.strip_prefix("settings.").unwrap_or(&field);
                    let name = name.split('[').next().unwrap_or(name).to_owned();
                    (name, why)
                })
                .collect();
            ok(settings_page(
                &session,
                &account_id,
                &settings,
                &errors,
                html::banner(
                    "bad",
                    "The settings were not saved: check the fields marked below.",
                ),
            ))
        }
        Err(status) => refused(&status),
    }
}

// ---- API keys -------------------------------------------------------------------------------

pub(crate) async fn keys(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
) -> Page {
    keys_page(&service, &session, &account_id, String::new()).await
}

async fn keys_page(
    service: &Service,
    session: &Session,
    account_id: &str,
    banners: String,
) -> Page {
    let mut body = format!("<h1>API keys</h1>{banners}");
    if !session.may(account_id, Role::Admin) {
        body.push_str(&html::banner(
            "good",
            "API keys are managed by the account's admins.",
        ));
        return ok(html::layout(
            "API keys",
            Some(&frame(session, account_id, "API keys")),
            &body,
        ));
    }
    let listed = match service
        .list_api_keys(session.request(pb::ListApiKeysRequest {
            account_id: account_id.to_owned(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().api_keys,
        Err(status) => return refused(&status),
    };
    let csrf = html::esc(&session.csrf());
    let account = html::esc(account_id);
    let _ = write!(
        body,
        r#"<section><h2>New key</h2><form method="post" action="/console/a/{account}/keys"><input type="hidden" name="csrf" value="{csrf}">
<label for="f-key-name">Name <span class="hint">who uses it, e.g. “ivr-east”</span></label><input type="text" id="f-key-name" name="name" required>
<fieldset><legend>May be used for</legend><label><input type="checkbox" name="scope_handoffs" value="on" checked> Handoffs (an IVR)</label><label><input type="checkbox" name="scope_conversations" value="on"> Conversations (a bot or a desk)</label></fieldset>
<button type="submit">Create key</button></form></section>"#
    );
    if !listed.is_empty() {
        body.push_str(r#"<section><h2>Keys</h2><table><thead><tr><th scope="col">Name</th><th scope="col">Begins</th><th scope="col">Created</th><th scope="col">Last used</th><th scope="col">State</th><th scope="col"><span class="hint">Action</span></th></tr></thead><tbody>"#);
        for key in &listed {
            let when = |t: &Option<prost_types::Timestamp>| {
                t.as_ref().and_then(c2m_proto::from_timestamp).map_or_else(
                    || "—".to_owned(),
                    |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
                )
            };
            let (state, action) = if key.revoked_at.is_some() {
                (format!("revoked {}", when(&key.revoked_at)), String::new())
            } else {
                (
                    "live".to_owned(),
                    format!(
                        r#"<form method="post" action="/console/a/{account}/keys/{id}/revoke"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" class="secondary" aria-label="Revoke {name}">Revoke</button></form>"#,
                        id = html::esc(&key.api_key_id),
                        name = html::esc(&key.name),
                    ),
                )
            };
            let _ = write!(
                body,
                r#"<tr><td>{}</td><td><code>{}…</code></td><td>{}</td><td>{}</td><td>{}</td><td>{action}</td></tr>"#,
                html::esc(&key.name),
                html::esc(&key.prefix),
                when(&key.created_at),
                when(&key.last_used_at),
                html::esc(&state),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    ok(html::layout(
        "API keys",
        Some(&frame(session, account_id, "API keys")),
        &body,
    ))
}

pub(crate) async fn create_key(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted { session, form }: Posted,
) -> Page {
    let mut scopes = Vec::new();
    if form.has("scope_handoffs") {
        scopes.push(pb::ApiKeyScope::Handoffs as i32);
    }
    if form.has("scope_conversations") {
        scopes.push(pb::ApiKeyScope::Conversations as i32);
    }
    match service
        .create_api_key(session.request(pb::CreateApiKeyRequest {
            account_id: account_id.clone(),
            name: form.get("name"),
            scopes,
        }))
        .await
    {
        Ok(created) => {
            let created = created.into_inner();
            let banner = format!(
                r#"<div class="banner good" role="status"><p>Key “{}” created. Copy it now: c2m keeps only its digest and cannot show it again.</p><p class="secret" id="new-key">{}</p></div>"#,
                html::esc(&created.api_key.unwrap_or_default().name),
                html::esc(&created.plaintext)
            );
            keys_page(&service, &session, &account_id, banner).await
        }
        Err(status) if status.code() == Code::InvalidArgument => {
            let message = violations(&status)
                .into_iter()
                .map(|(f, why)| format!("{f}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
            keys_page(
                &service,
                &session,
                &account_id,
                html::banner("bad", &format!("The key was not created: {message}")),
            )
            .await
        }
        Err(status) => refused(&status),
    }
}

pub(crate) async fn revoke_key(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, .. }: Posted,
) -> Page {
    match service
        .revoke_api_key(session.request(pb::RevokeApiKeyRequest {
            account_id: account_id.clone(),
            api_key_id: id,
        }))
        .await
    {
        Ok(_) => see_other(&format!("/console/a/{account_id}/keys")),
        Err(status) => refused(&status),
    }
}

// ---- try it ---------------------------------------------------------------------------------

pub(crate) async fn try_it(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
) -> Page {
    let form = TryForm {
        first_name: "Ada".into(),
        topic: "your bill".into(),
        ..TryForm::default()
    };
    try_page(
        &service,
        &session,
        &account_id,
        &form,
        &HashMap::new(),
        String::new(),
    )
    .await
}

#[derive(Debug, Default)]
struct TryForm {
    phone: String,
    config: String,
    first_name: String,
    topic: String,
}

async fn try_page(
    service: &Service,
    session: &Session,
    account_id: &str,
    form: &TryForm,
    errors: &HashMap<String, String>,
    banners: String,
) -> Page {
    let mut body = format!("<h1>Try it</h1>{banners}");
    if !session.may(account_id, Role::Editor) {
        body.push_str(&html::banner(
            "good",
            "Trying a deflection needs the editor role.",
        ));
        return ok(html::layout(
            "Try it",
            Some(&frame(session, account_id, "Try it")),
            &body,
        ));
    }
    let configs = match service
        .list_handoff_configs(session.request(pb::ListHandoffConfigsRequest {
            account_id: account_id.to_owned(),
            page_size: 100,
            ..Default::default()
        }))
        .await
    {
        Ok(answer) => answer.into_inner().configs,
        Err(status) => return refused(&status),
    };
    let error = |name: &str| errors.get(name).map(String::as_str);
    let mut options = String::new();
    for c in &configs {
        let selected = if c.handoff_config_id == form.config {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            options,
            r#"<option value="{id}"{selected}>{name}</option>"#,
            id = html::esc(&c.handoff_config_id),
            name = html::esc(&c.name),
        );
    }
    let (invalid, message) = html::field_error("f-config", error("handoff_config_id"));
    let _ = write!(
        body,
        r#"<section><p>Deflect a phone you hold, as an IVR would, and watch each step arrive. The message goes through the account's providers (the sandbox, if that is what the account has).</p>
<form method="post" novalidate><input type="hidden" name="csrf" value="{csrf}"><div class="grid">
<div>{phone}</div><div><label for="f-config">Configuration</label><select id="f-config" name="config"{invalid}>{options}</select>{message}</div>
<div>{first}</div><div>{topic}</div></div>
<button type="submit">Deflect</button></form></section>"#,
        csrf = html::esc(&session.csrf()),
        phone = html::text_field(
            "phone",
            "Phone",
            &form.phone,
            "E.164, e.g. +14155550123",
            error("consumer_phone"),
            true
        ),
        first = html::text_field("first_name", "First name", &form.first_name, "", None, true),
        topic = html::text_field("topic", "Topic", &form.topic, "", None, true),
    );
    ok(html::layout(
        "Try it",
        Some(&frame(session, account_id, "Try it")),
        &body,
    ))
}

pub(crate) async fn run_try(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted {
        session,
        form: submitted,
    }: Posted,
) -> Page {
    let form = TryForm {
        phone: submitted.get("phone").trim().to_owned(),
        config: submitted.get("config"),
        first_name: submitted.get("first_name"),
        topic: submitted.get("topic"),
    };
    let request = pb::CreateHandoffRequest {
        account_id: account_id.clone(),
        handoff_config_id: form.config.clone(),
        consumer_phone: form.phone.clone(),
        idempotency_key: c2m_runtime::ids::generate("console"),
        engagement_attributes: Some(pb::EngagementAttributes {
            personal_info: Some(pb::PersonalInfo {
                first_name: form.first_name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        template_variables: [("topic".to_owned(), form.topic.clone())].into(),
        ivr_call_id: "console-try".to_owned(),
        ..Default::default()
    };
    let created = match service.peers.handoff_for(&session.token) {
        Ok(mut handoff) => handoff.create_handoff(request).await,
        Err(status) => Err(status),
    };
    match created {
        Ok(answer) => {
            let handoff = answer.into_inner().handoff.unwrap_or_default();
            see_other(&format!(
                "/console/a/{account_id}/try/{}",
                url::form_urlencoded::byte_serialize(handoff.handoff_id.as_bytes())
                    .collect::<String>()
            ))
        }
        Err(status) if status.code() == Code::InvalidArgument => {
            let errors: HashMap<String, String> = violations(&status).into_iter().collect();
            try_page(
                &service,
                &session,
                &account_id,
                &form,
                &errors,
                html::banner("bad", status.message()),
            )
            .await
        }
        Err(status) if status.code() == Code::FailedPrecondition => {
            try_page(
                &service,
                &session,
                &account_id,
                &form,
                &HashMap::new(),
                html::banner("bad", status.message()),
            )
            .await
        }
        Err(status) => refused(&status),
    }
}

/// The steps a tried deflection shows, in order, with what a person reads for each.
const TRY_STEPS: [(pb::FunnelStage, &str); 6] = [
    (pb::FunnelStage::Attempted, "Asked for, as an IVR would"),
    (pb::FunnelStage::Sent, "Sent: a provider took the message"),
    (pb::FunnelStage::Delivered, "Delivered to the phone"),
    (pb::FunnelStage::Read, "Read"),
    (pb::FunnelStage::Responded, "Replied"),
    (
        pb::FunnelStage::ConversationOpened,
        "Conversation opened for the skill's agents",
    ),
];

pub(crate) async fn watch_try(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path((account_id, handoff_id)): Path<(String, String)>,
) -> Page {
    let listed = match service.peers.reporting_for(&session.token) {
        Ok(mut reporting) => reporting
            .list_transactions(pb::ListTransactionsRequest {
                account_id: account_id.clone(),
                handoff_id: handoff_id.clone(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().transactions),
        Err(status) => Err(status),
    };
    let transaction = match listed {
        Ok(mut found) => found.pop().unwrap_or_default(),
        Err(status) => return refused(&status),
    };
    let reached = |stage: pb::FunnelStage| {
        transaction
            .stages
            .iter()
            .find(|s| s.stage == stage as i32)
            .and_then(|s| s.at.as_ref())
            .and_then(c2m_proto::from_timestamp)
    };
    let started = reached(pb::FunnelStage::Attempted);
    let ended: Vec<&pb::StageTime> = transaction
        .stages
        .iter()
        .filter(|s| !TRY_STEPS.iter().any(|(stage, _)| *stage as i32 == s.stage))
        .collect();
    let opened = reached(pb::FunnelStage::ConversationOpened).is_some();
    // Reloaded while something may still come: up to two minutes, until the conversation opens.
    let waiting =
        !opened && started.is_none_or(|at| chrono::Utc::now() - at < chrono::Duration::minutes(2));
    let mut body = format!(
        r#"<h1>Try it: {}</h1><section aria-live="polite"><ol class="steps">"#,
        html::esc(&handoff_id)
    );
    for (stage, label) in TRY_STEPS {
        let (state, time) = match reached(stage) {
            Some(at) => (
                "done",
                format!(
                    "{} (+{:.1} s)",
                    at.format("%H:%M:%S"),
                    started.map_or(0.0, |s| (at - s).num_milliseconds() as f64 / 1000.0)
                ),
            ),
            None if waiting => ("waiting", "waiting…".to_owned()),
            None => ("missing", "—".to_owned()),
        };
        let _ = write!(
            body,
            r#"<li data-stage="{}" data-state="{state}"><strong>{label}</strong> <span class="hint">{time}</span></li>"#,
            stage.as_str_name()
        );
    }
    body.push_str("</ol>");
    for other in ended {
        let name = pb::FunnelStage::try_from(other.stage)
            .map_or("", |s| s.as_str_name())
            .trim_start_matches("FUNNEL_STAGE_")
            .replace('_', " ")
            .to_lowercase();
        let code = if transaction.error_code.is_empty() {
            String::new()
        } else {
            format!(" ({})", transaction.error_code)
        };
        body.push_str(&html::banner("bad", &format!("Also: {name}{code}.")));
    }
    if waiting {
        body.push_str(r#"<p class="hint">This page reloads every two seconds while steps may still arrive.</p>"#);
    }
    let _ = write!(
        body,
        r#"</section><p><a class="button secondary" href="/console/a/{}/try">Try again</a></p>"#,
        html::esc(&account_id)
    );
    ok(html::layout_refreshing(
        "Try it",
        Some(&frame(&session, &account_id, "Try it")),
        &body,
        waiting.then_some(2),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_fills_the_samples_and_shows_unknown_placeholders() {
        assert_eq!(
            render_sample("Hi {{first_name}}, about {{ topic }} ({{ref}})"),
            "Hi Ada, about your bill ([ref])"
        );
        assert_eq!(
            render_sample("unclosed {{first_name"),
            "unclosed {{first_name"
        );
    }

    #[test]
    fn a_templates_placeholders_are_listed_once_in_order() {
        assert_eq!(
            template_placeholders("Hi {{1}}, about {{2}}; {{1}} again, {{ 3 }}"),
            ["1", "2", "3"]
        );
        assert!(template_placeholders("no placeholder").is_empty());
    }

    #[test]
    fn sms_segments_count_as_carriers_do() {
        assert_eq!(sms_segments(&"a".repeat(160)), (1, "GSM-7"));
        assert_eq!(sms_segments(&"a".repeat(161)), (2, "GSM-7"));
        assert_eq!(sms_segments(&"€".repeat(80)), (1, "GSM-7"));
        assert_eq!(sms_segments(&"€".repeat(81)), (2, "GSM-7"));
        assert_eq!(sms_segments(&"é".repeat(160)), (1, "GSM-7"));
        assert_eq!(sms_segments("Hello 👋"), (1, "UCS-2"));
        assert_eq!(sms_segments(&"ç".repeat(71)), (2, "UCS-2"));
    }
}
