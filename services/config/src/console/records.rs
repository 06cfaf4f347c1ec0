//! The console's records: the account's handoffs (with a CSV download) and its audit log.

use std::fmt::Write as _;

use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderValue, Uri, header},
    response::IntoResponse,
};
use c2m_proto::v1::{self as pb, config_service_server::ConfigService};
use chrono::{DateTime, NaiveDate, Utc};
use futures::StreamExt;
use tonic::Status;

use super::{
    SignedIn, html,
    pages::{Page, frame, ok, query, refused},
    secured,
};
use crate::Service;

/// A period from the page's `from` and `to` (dates, UTC; `to` included), by default the last
/// seven days; the dates as shown.
fn period(uri: &Uri) -> (DateTime<Utc>, DateTime<Utc>, String, String) {
    let today = Utc::now().date_naive();
    let date = |name: &str, default: NaiveDate| {
        NaiveDate::parse_from_str(&query(uri, name), "%Y-%m-%d").unwrap_or(default)
    };
    let to = date("to", today);
    let from = date("from", to - chrono::Duration::days(6)).min(to);
    let start = from.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let end = (to + chrono::Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    (start, end, from.to_string(), to.to_string())
}

fn period_form(from: &str, to: &str, extra: &str) -> String {
    format!(
        r#"<section><form method="get" class="grid" aria-label="Period">
<div><label for="f-from">From</label><input type="text" id="f-from" name="from" value="{from}" inputmode="numeric" placeholder="YYYY-MM-DD"></div>
<div><label for="f-to">To <span class="hint">included; days in UTC</span></label><input type="text" id="f-to" name="to" value="{to}" inputmode="numeric" placeholder="YYYY-MM-DD"></div>
<div><button type="submit" class="secondary">Show</button> {extra}</div></form></section>"#,
        from = html::esc(from),
        to = html::esc(to),
    )
}

fn time(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(c2m_proto::from_timestamp)
        .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn stage_name(stage: i32) -> String {
    pb::FunnelStage::try_from(stage)
        .map_or("", |s| s.as_str_name())
        .trim_start_matches("FUNNEL_STAGE_")
        .replace('_', " ")
        .to_lowercase()
}

pub(crate) async fn transactions(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let (start, end, from, to) = period(&uri);
    let page_token = query(&uri, "page");
    let listed = match service.peers.reporting_for(&session.token) {
        Ok(mut reporting) => reporting
            .list_transactions(pb::ListTransactionsRequest {
                account_id: account_id.clone(),
                start_time: Some(c2m_proto::timestamp(start)),
                end_time: Some(c2m_proto::timestamp(end)),
                page_size: 50,
                page_token: page_token.clone(),
                handoff_id: String::new(),
            })
            .await
            .map(tonic::Response::into_inner),
        Err(status) => Err(status),
    };
    let listed = match listed {
        Ok(listed) => listed,
        Err(status) => return refused(&status),
    };
    let account = html::esc(&account_id);
    let range = format!("from={}&to={}", html::esc(&from), html::esc(&to));
    let mut body = String::from("<h1>Handoffs</h1>");
    body.push_str(&period_form(
        &from,
        &to,
        &format!(
            r#"<a class="button" href="/console/a/{account}/transactions.csv?{range}" download>Download CSV</a>"#
        ),
    ));
    if listed.transactions.is_empty() {
        body.push_str("<section><p>No handoff in this period.</p></section>");
    } else {
        body.push_str(r#"<section><table><thead><tr><th scope="col">Handoff</th><th scope="col">Channel</th><th scope="col">Skill</th><th scope="col">Stages</th><th scope="col">Conversation</th></tr></thead><tbody>"#);
        for t in &listed.transactions {
            let stages: Vec<String> = t
                .stages
                .iter()
                .map(|s| format!("{} {}", stage_name(s.stage), time(s.at.as_ref())))
                .collect();
            let channel = pb::Channel::try_from(t.channel)
                .map_or("", |c| c.as_str_name())
                .trim_start_matches("CHANNEL_");
            let _ = write!(
                body,
                "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                html::esc(&t.handoff_id),
                html::esc(channel),
                html::esc(&t.skill_id),
                stages
                    .iter()
                    .map(|s| html::esc(s))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                html::esc(&t.conversation_id),
            );
        }
        body.push_str("</tbody></table>");
        if !listed.next_page_token.is_empty() {
            let _ = write!(
                body,
                r#"<p><a class="button secondary" href="/console/a/{account}/transactions?{range}&page={}">More</a></p>"#,
                url::form_urlencoded::byte_serialize(listed.next_page_token.as_bytes())
                    .collect::<String>()
            );
        }
        body.push_str("</section>");
    }
    ok(html::layout(
        "Handoffs",
        Some(&frame(&session, &account_id, "Handoffs")),
        &body,
    ))
}

/// The period's handoffs as CSV, streamed from ExportTransactions a batch at a time.
pub(crate) async fn transactions_csv(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let (start, end, from, to) = period(&uri);
    let stream = match service.peers.reporting_for(&session.token) {
        Ok(mut reporting) => reporting
            .export_transactions(pb::ExportTransactionsRequest {
                account_id: account_id.clone(),
                start_time: Some(c2m_proto::timestamp(start)),
                end_time: Some(c2m_proto::timestamp(end)),
            })
            .await
            .map(tonic::Response::into_inner),
        Err(status) => Err(status),
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(status) => return refused(&status),
    };
    let header = futures::stream::once(async { Ok::<_, Status>(c2m_proto::csv::header()) });
    let lines = stream.map(|batch| {
        batch.map(|batch| {
            batch
                .transactions
                .iter()
                .map(c2m_proto::csv::line)
                .collect::<String>()
        })
    });
    let body = Body::from_stream(header.chain(lines));
    let name = format!("c2m-{account_id}-handoffs-{from}-{to}.csv");
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{}\"",
        name.replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
            "_"
        )
    )) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    secured(response)
}

pub(crate) async fn audit(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let (start, end, from, to) = period(&uri);
    let listed = match service
        .list_audit_events(session.request(pb::ListAuditEventsRequest {
            account_id: account_id.clone(),
            start_time: Some(c2m_proto::timestamp(start)),
            end_time: Some(c2m_proto::timestamp(end)),
            page_size: 100,
            page_token: query(&uri, "page"),
        }))
        .await
    {
        Ok(answer) => answer.into_inner(),
        Err(status) => return refused(&status),
    };
    let mut body = String::from("<h1>Audit log</h1>");
    body.push_str(&period_form(&from, &to, ""));
    if listed.events.is_empty() {
        body.push_str("<section><p>No change in this period.</p></section>");
    } else {
        body.push_str(r#"<section><table><thead><tr><th scope="col">When (UTC)</th><th scope="col">Who</th><th scope="col">What</th><th scope="col">Resource</th><th scope="col">Before and after</th></tr></thead><tbody>"#);
        for e in &listed.events {
            let pretty = |json: &str| {
                serde_json::from_str::<serde_json::Value>(json)
                    .and_then(|v| serde_json::to_string_pretty(&v))
                    .unwrap_or_else(|_| json.to_owned())
            };
            let change = match (e.before_json.is_empty(), e.after_json.is_empty()) {
                (true, true) => String::new(),
                (before_empty, after_empty) => {
                    let mut details = String::from("<details><summary>Show</summary>");
                    if !before_empty {
                        let _ = write!(
                            details,
                            "<p>Before</p><pre>{}</pre>",
                            html::esc(&pretty(&e.before_json))
                        );
                    }
                    if !after_empty {
                        let _ = write!(
                            details,
                            "<p>After</p><pre>{}</pre>",
                            html::esc(&pretty(&e.after_json))
                        );
                    }
                    details.push_str("</details>");
                    details
                }
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{change}</td></tr>",
                time(e.at.as_ref()),
                html::esc(&e.actor),
                html::esc(&e.action),
                html::esc(&e.resource),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    ok(html::layout(
        "Audit log",
        Some(&frame(&session, &account_id, "Audit log")),
        &body,
    ))
}
