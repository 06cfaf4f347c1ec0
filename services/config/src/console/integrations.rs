//! The console's connections to the outside: WhatsApp templates, provider credentials and
//! webhook endpoints, and the live conversations list.

use std::fmt::Write as _;

use axum::{
    extract::{Path, State},
    http::Uri,
};
use c2m_proto::v1::{
    self as pb, config_service_server::ConfigService, put_provider_credentials_request::Credentials,
};
use c2m_runtime::auth::Role;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::{
    Posted, Session, SignedIn, html,
    pages::{Page, frame, ok, query, refused},
    see_other,
};
use crate::{Service, model::WEBHOOK_EVENT_TYPES};

fn hidden_csrf(session: &Session) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        html::esc(&session.csrf())
    )
}

/// "field: why; …" for a refusal with field violations, else its message.
fn described(status: &Status) -> String {
    match status.get_details_bad_request() {
        Some(bad) if !bad.field_violations.is_empty() => bad
            .field_violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; "),
        _ => status.message().to_owned(),
    }
}

/// After a change: back to `path` with a one-line outcome in the query.
fn back_with(path: &str, outcome: Result<&str, &Status>) -> Page {
    let (key, text) = match outcome {
        Ok(done) => ("done", done.to_owned()),
        Err(status) => ("failed", described(status)),
    };
    see_other(&format!(
        "{path}?{key}={}",
        url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>()
    ))
}

/// The outcome a change left in the query, as a banner.
fn outcome_banner(uri: &Uri) -> String {
    let done = query(uri, "done");
    let failed = query(uri, "failed");
    if !failed.is_empty() {
        html::banner("bad", &failed)
    } else if !done.is_empty() {
        html::banner("good", &done)
    } else {
        String::new()
    }
}

// ---- WhatsApp templates ---------------------------------------------------------------------

pub(crate) async fn templates(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let listed = match service
        .list_whats_app_templates(session.request(pb::ListWhatsAppTemplatesRequest {
            account_id: account_id.clone(),
            page_size: 100,
            page_token: String::new(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().templates,
        Err(status) => return refused(&status),
    };
    let account = html::esc(&account_id);
    let editor = session.may(&account_id, Role::Editor);
    let mut body = format!(
        "<h1>WhatsApp templates</h1>{}<p class=\"hint\">Meta reviews each template; its status follows Meta's webhook. A configuration sends an approved template to start a conversation.</p>",
        outcome_banner(&uri)
    );
    if listed.is_empty() {
        body.push_str("<section><p>No template yet.</p></section>");
    } else {
        body.push_str(r#"<section><table><thead><tr><th scope="col">Name</th><th scope="col">Id <span class="hint">for a configuration</span></th><th scope="col">Language</th><th scope="col">Category</th><th scope="col">Status</th><th scope="col">Body</th><th scope="col"><span class="hint">Action</span></th></tr></thead><tbody>"#);
        for t in &listed {
            let status = pb::WhatsAppTemplateStatus::try_from(t.status)
                .map_or("", |s| s.as_str_name())
                .trim_start_matches("WHATS_APP_TEMPLATE_STATUS_")
                .to_lowercase();
            let category = pb::WhatsAppTemplateCategory::try_from(t.category)
                .map_or("", |s| s.as_str_name())
                .trim_start_matches("WHATS_APP_TEMPLATE_CATEGORY_")
                .to_lowercase();
            let delete = if editor {
                format!(
                    r#"<form method="post" action="/console/a/{account}/templates/{id}/delete">{csrf}<button type="submit" class="secondary" aria-label="Delete {name}">Delete</button></form>"#,
                    id = html::esc(&t.template_id),
                    name = html::esc(&t.name),
                    csrf = hidden_csrf(&session),
                )
            } else {
                String::new()
            };
            let _ = write!(
                body,
                r#"<tr><td>{}</td><td><code class="template-id">{}</code></td><td>{}</td><td>{}</td><td data-status="{status}">{status}</td><td>{}</td><td>{delete}</td></tr>"#,
                html::esc(&t.name),
                html::esc(&t.template_id),
                html::esc(&t.language),
                html::esc(&category),
                html::esc(&t.body),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    if editor {
        let _ = write!(
            body,
            r#"<section><h2>New template</h2><form method="post" action="/console/a/{account}/templates">{csrf}<div class="grid">
<div><label for="f-t-name">Name <span class="hint">as Meta knows it, e.g. billing_followup</span></label><input type="text" id="f-t-name" name="name" required></div>
<div><label for="f-t-language">Language <span class="hint">e.g. en_US</span></label><input type="text" id="f-t-language" name="language" required></div>
<div><label for="f-t-category">Category</label><select id="f-t-category" name="category"><option value="WHATS_APP_TEMPLATE_CATEGORY_UTILITY">Utility</option><option value="WHATS_APP_TEMPLATE_CATEGORY_MARKETING">Marketing</option><option value="WHATS_APP_TEMPLATE_CATEGORY_AUTHENTICATION">Authentication</option></select></div></div>
<label for="f-t-body">Body <span class="hint">with {{{{1}}}}, {{{{2}}}} for the values a configuration fills</span></label><textarea id="f-t-body" name="body" required></textarea>
<button type="submit">Add template</button></form></section>"#,
            csrf = hidden_csrf(&session),
        );
    }
    ok(html::layout(
        "WhatsApp templates",
        Some(&frame(&session, &account_id, "Templates")),
        &body,
    ))
}

pub(crate) async fn create_template(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted { session, form }: Posted,
) -> Page {
    let created = service
        .create_whats_app_template(
            session.request(pb::CreateWhatsAppTemplateRequest {
                account_id: account_id.clone(),
                template: Some(pb::WhatsAppTemplate {
                    name: form.get("name"),
                    language: form.get("language"),
                    category: pb::WhatsAppTemplateCategory::from_str_name(&form.get("category"))
                        .unwrap_or_default() as i32,
                    body: form.get("body"),
                    ..Default::default()
                }),
            }),
        )
        .await;
    let path = format!("/console/a/{account_id}/templates");
    match created {
        Ok(_) => back_with(&path, Ok("Template added; Meta reviews it.")),
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

pub(crate) async fn delete_template(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, .. }: Posted,
) -> Page {
    let deleted = service
        .delete_whats_app_template(session.request(pb::DeleteWhatsAppTemplateRequest {
            account_id: account_id.clone(),
            template_id: id,
        }))
        .await;
    let path = format!("/console/a/{account_id}/templates");
    match deleted {
        Ok(_) => back_with(&path, Ok("Template deleted.")),
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

// ---- provider credentials -------------------------------------------------------------------

/// A credential's field: its form name, its label, and whether it is a secret (typed unseen).
type CredentialField = (&'static str, &'static str, bool);

/// The providers the console sets credentials for: form value, name, fields.
const PROVIDERS: [(&str, &str, &[CredentialField]); 6] = [
    (
        "twilio",
        "Twilio (SMS)",
        &[
            ("account_sid", "Account SID", false),
            ("auth_token", "Auth token", true),
            ("from_number", "From number (E.164)", false),
            ("messaging_service_sid", "or Messaging service SID", false),
        ],
    ),
    (
        "meta",
        "Meta WhatsApp Cloud API",
        &[
            ("phone_number_id", "Phone number id", false),
            ("access_token", "Access token", true),
            ("app_secret", "App secret", true),
            ("verify_token", "Webhook verify token", true),
        ],
    ),
    (
        "google",
        "Google RCS Business Messaging",
        &[
            ("agent_id", "Agent id", false),
            ("service_account_json", "Service account key (JSON)", true),
            ("client_token", "Webhook client token", true),
        ],
    ),
    (
        "fcm",
        "Firebase Cloud Messaging (app messaging on Android)",
        &[
            ("project_id", "Project id", false),
            (
                "fcm_service_account_json",
                "Service account key (JSON)",
                true,
            ),
        ],
    ),
    (
        "apns",
        "Apple Push Notification service (app messaging on iOS)",
        &[
            ("team_id", "Team id", false),
            ("key_id", "Key id", false),
            ("private_key_pem", "Signing key (.p8, PEM)", true),
            ("topic", "Topic (the app's bundle id)", false),
        ],
    ),
    (
        "sandbox",
        "The sandbox (plays Twilio and the consumer)",
        &[("reply_text", "What the consumer answers", false)],
    ),
];

pub(crate) async fn credentials(
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let mut body = format!("<h1>Provider credentials</h1>{}", outcome_banner(&uri));
    if !session.may(&account_id, Role::Admin) {
        body.push_str(&html::banner(
            "good",
            "Provider credentials are set by the account's admins.",
        ));
    } else {
        body.push_str("<p class=\"hint\">c2m seals credentials at rest and never shows them again: setting them replaces what was set. An account without Twilio credentials sends SMS through the sandbox when it has sandbox credentials.</p>");
        let account = html::esc(&account_id);
        for (provider, name, fields) in PROVIDERS {
            let _ = write!(
                body,
                r#"<section><h2>{name}</h2><form method="post" action="/console/a/{account}/credentials" autocomplete="off">{csrf}<input type="hidden" name="provider" value="{provider}"><div class="grid">"#,
                csrf = hidden_csrf(&session),
            );
            for (field, label, secret) in fields.iter() {
                let id = format!("f-{provider}-{field}");
                let kind = if *secret { "password" } else { "text" };
                let _ = write!(
                    body,
                    r#"<div><label for="{id}">{label}</label><input type="{kind}" id="{id}" name="{field}"></div>"#
                );
            }
            body.push_str(r#"</div><button type="submit">Set</button></form></section>"#);
        }
    }
    ok(html::layout(
        "Provider credentials",
        Some(&frame(&session, &account_id, "Credentials")),
        &body,
    ))
}

pub(crate) async fn set_credentials(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted { session, form }: Posted,
) -> Page {
    let (provider, credentials) = match form.get("provider").as_str() {
        "twilio" => (
            pb::Provider::Twilio,
            Credentials::Twilio(pb::TwilioCredentials {
                account_sid: form.get("account_sid"),
                auth_token: form.get("auth_token"),
                from_number: form.get("from_number"),
                messaging_service_sid: form.get("messaging_service_sid"),
            }),
        ),
        "meta" => (
            pb::Provider::MetaWhatsapp,
            Credentials::MetaWhatsapp(pb::MetaWhatsAppCredentials {
                phone_number_id: form.get("phone_number_id"),
                access_token: form.get("access_token"),
                app_secret: form.get("app_secret"),
                verify_token: form.get("verify_token"),
            }),
        ),
        "google" => (
            pb::Provider::GoogleRbm,
            Credentials::GoogleRbm(pb::GoogleRbmCredentials {
                agent_id: form.get("agent_id"),
                service_account_json: form.get("service_account_json"),
                client_token: form.get("client_token"),
            }),
        ),
        "fcm" => (
            pb::Provider::Fcm,
            Credentials::Fcm(pb::FcmCredentials {
                project_id: form.get("project_id"),
                service_account_json: form.get("fcm_service_account_json"),
            }),
        ),
        "apns" => (
            pb::Provider::Apns,
            Credentials::Apns(pb::ApnsCredentials {
                team_id: form.get("team_id"),
                key_id: form.get("key_id"),
                private_key_pem: form.get("private_key_pem"),
                topic: form.get("topic"),
            }),
        ),
        "sandbox" => (
            pb::Provider::Sandbox,
            Credentials::Sandbox(pb::SandboxCredentials {
                reply_text: form.get("reply_text"),
                fail_delivery: false,
            }),
        ),
        _ => return refused(&Status::invalid_argument("not a provider")),
    };
    let put = match service.peers.channel_gateway_for(&session.token) {
        Ok(mut gateway) => {
            gateway
                .put_provider_credentials(pb::PutProviderCredentialsRequest {
                    account_id: account_id.clone(),
                    provider: provider as i32,
                    credentials: Some(credentials),
                })
                .await
        }
        Err(status) => Err(status),
    };
    let path = format!("/console/a/{account_id}/credentials");
    match put {
        Ok(_) => back_with(&path, Ok("Credentials set.")),
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

// ---- webhook endpoints ----------------------------------------------------------------------

pub(crate) async fn webhooks(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    webhooks_page(&service, &session, &account_id, outcome_banner(&uri)).await
}

async fn webhooks_page(
    service: &Service,
    session: &Session,
    account_id: &str,
    banners: String,
) -> Page {
    let mut body = format!("<h1>Webhook endpoints</h1>{banners}");
    if !session.may(account_id, Role::Admin) {
        body.push_str(&html::banner(
            "good",
            "Webhook endpoints are managed by the account's admins.",
        ));
        return ok(html::layout(
            "Webhooks",
            Some(&frame(session, account_id, "Webhooks")),
            &body,
        ));
    }
    let listed = match service
        .list_webhook_endpoints(session.request(pb::ListWebhookEndpointsRequest {
            account_id: account_id.to_owned(),
        }))
        .await
    {
        Ok(answer) => answer.into_inner().endpoints,
        Err(status) => return refused(&status),
    };
    let account = html::esc(account_id);
    body.push_str("<p class=\"hint\">Handoff stages and conversation events are posted to each endpoint, signed as Standard Webhooks specifies (see docs/conversations.md).</p>");
    for e in &listed {
        let disabled = e.state == pb::WebhookEndpointState::Disabled as i32;
        let state = if disabled {
            format!("disabled: {}", e.disabled_reason)
        } else if e.failing_since.is_some() {
            "failing".to_owned()
        } else {
            "enabled".to_owned()
        };
        let types = if e.event_types.is_empty() {
            "every event".to_owned()
        } else {
            e.event_types.join(", ")
        };
        let deliveries = service
            .list_webhook_deliveries(session.request(pb::ListWebhookDeliveriesRequest {
                account_id: account_id.to_owned(),
                webhook_endpoint_id: e.webhook_endpoint_id.clone(),
                page_size: 5,
                page_token: String::new(),
            }))
            .await
            .map(|r| r.into_inner().deliveries)
            .unwrap_or_default();
        let mut recent = String::new();
        for d in &deliveries {
            let at =
                d.at.as_ref()
                    .and_then(c2m_proto::from_timestamp)
                    .map_or_else(String::new, |t| t.format("%H:%M:%S").to_string());
            let result = if d.error.is_empty() {
                format!("HTTP {}", d.http_status)
            } else {
                d.error.clone()
            };
            let _ = write!(
                recent,
                "<li>{at} {} (attempt {}): {} in {} ms</li>",
                html::esc(&d.event_type),
                d.attempt,
                html::esc(&result),
                d.duration_ms
            );
        }
        let _ = write!(
            body,
            r#"<section><h2>{url}</h2><p>{description}</p><p><strong>State:</strong> {state}. <strong>Events:</strong> {types}.</p>
<h3>Recent deliveries</h3><ul>{recent}</ul>
<form method="post" action="/console/a/{account}/webhooks/{id}/test">{csrf}<button type="submit" class="secondary">Send a test event</button></form>
<form method="post" action="/console/a/{account}/webhooks/{id}/state">{csrf}<input type="hidden" name="enable" value="{enable}"><button type="submit" class="secondary">{toggle}</button></form>
<form method="post" action="/console/a/{account}/webhooks/{id}/rotate">{csrf}<button type="submit" class="secondary">Rotate the secret</button></form>
<form method="post" action="/console/a/{account}/webhooks/{id}/delete">{csrf}<button type="submit" class="secondary" aria-label="Delete the endpoint {url}">Delete</button></form></section>"#,
            url = html::esc(&e.url),
            description = html::esc(&e.description),
            state = html::esc(&state),
            types = html::esc(&types),
            id = html::esc(&e.webhook_endpoint_id),
            csrf = hidden_csrf(session),
            enable = if disabled { "yes" } else { "no" },
            toggle = if disabled { "Enable" } else { "Disable" },
        );
    }
    let mut boxes = String::new();
    for t in WEBHOOK_EVENT_TYPES {
        let _ = write!(
            boxes,
            r#"<label><input type="checkbox" name="event_type" value="{t}"> {t}</label>"#
        );
    }
    let _ = write!(
        body,
        r#"<section><h2>New endpoint</h2><form method="post" action="/console/a/{account}/webhooks">{csrf}
<label for="f-w-url">URL <span class="hint">https (plain http only to a loopback address)</span></label><input type="text" id="f-w-url" name="url" required>
<label for="f-w-description">Description</label><input type="text" id="f-w-description" name="description">
<fieldset><legend>Events <span class="hint">none ticked: every event, including types added later</span></legend>{boxes}</fieldset>
<button type="submit">Add endpoint</button></form></section>"#,
        csrf = hidden_csrf(session),
    );
    ok(html::layout(
        "Webhooks",
        Some(&frame(session, account_id, "Webhooks")),
        &body,
    ))
}

pub(crate) async fn create_webhook(
    State(service): State<Service>,
    Path(account_id): Path<String>,
    Posted { session, form }: Posted,
) -> Page {
    let created = service
        .create_webhook_endpoint(session.request(pb::CreateWebhookEndpointRequest {
            account_id: account_id.clone(),
            endpoint: Some(pb::WebhookEndpoint {
                url: form.get("url"),
                description: form.get("description"),
                event_types: form.all("event_type"),
                ..Default::default()
            }),
        }))
        .await;
    match created {
        Ok(created) => {
            let created = created.into_inner();
            let banner = format!(
                r#"<div class="banner good" role="status"><p>Endpoint added. Its signing secret, shown once (verify each delivery with it):</p><p class="secret" id="new-secret">{}</p></div>"#,
                html::esc(&created.secret)
            );
            webhooks_page(&service, &session, &account_id, banner).await
        }
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => {
            webhooks_page(
                &service,
                &session,
                &account_id,
                html::banner("bad", &described(&status)),
            )
            .await
        }
    }
}

pub(crate) async fn test_webhook(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, .. }: Posted,
) -> Page {
    let tried = service
        .send_test_webhook(session.request(pb::SendTestWebhookRequest {
            account_id: account_id.clone(),
            webhook_endpoint_id: id,
        }))
        .await;
    let path = format!("/console/a/{account_id}/webhooks");
    match tried {
        Ok(answer) => {
            let d = answer.into_inner().delivery.unwrap_or_default();
            if d.error.is_empty() && (200..300).contains(&d.http_status) {
                back_with(
                    &path,
                    Ok(&format!(
                        "The test event was taken: HTTP {}.",
                        d.http_status
                    )),
                )
            } else {
                back_with(
                    &path,
                    Err(&Status::unavailable(format!(
                        "The test event was not taken: {}",
                        if d.error.is_empty() {
                            format!("HTTP {}", d.http_status)
                        } else {
                            d.error
                        }
                    ))),
                )
            }
        }
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

/// Enables (resuming from where it stopped) or disables an endpoint.
pub(crate) async fn set_webhook_state(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, form }: Posted,
) -> Page {
    let enable = form.get("enable") == "yes";
    let path = format!("/console/a/{account_id}/webhooks");
    let current = match service
        .get_webhook_endpoint(session.request(pb::GetWebhookEndpointRequest {
            account_id: account_id.clone(),
            webhook_endpoint_id: id,
        }))
        .await
    {
        Ok(answer) => answer.into_inner().endpoint.unwrap_or_default(),
        Err(status) if status.code() == Code::PermissionDenied => return refused(&status),
        Err(status) => return back_with(&path, Err(&status)),
    };
    let updated = service
        .update_webhook_endpoint(session.request(pb::UpdateWebhookEndpointRequest {
            account_id: account_id.clone(),
            endpoint: Some(pb::WebhookEndpoint {
                state: if enable {
                    pb::WebhookEndpointState::Enabled
                } else {
                    pb::WebhookEndpointState::Disabled
                } as i32,
                ..current
            }),
        }))
        .await;
    match updated {
        Ok(_) if enable => back_with(
            &path,
            Ok("Endpoint enabled: it resumes from where it stopped."),
        ),
        Ok(_) => back_with(&path, Ok("Endpoint disabled: its events wait in the log.")),
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

/// A new signing secret, shown once; the old one still signs for a day.
pub(crate) async fn rotate_webhook(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, .. }: Posted,
) -> Page {
    match service
        .rotate_webhook_secret(session.request(pb::RotateWebhookSecretRequest {
            account_id: account_id.clone(),
            webhook_endpoint_id: id,
        }))
        .await
    {
        Ok(answer) => {
            let banner = format!(
                r#"<div class="banner good" role="status"><p>The new signing secret, shown once (deliveries carry a signature with the old one too for a day):</p><p class="secret" id="new-secret">{}</p></div>"#,
                html::esc(&answer.into_inner().secret)
            );
            webhooks_page(&service, &session, &account_id, banner).await
        }
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&format!("/console/a/{account_id}/webhooks"), Err(&status)),
    }
}

pub(crate) async fn delete_webhook(
    State(service): State<Service>,
    Path((account_id, id)): Path<(String, String)>,
    Posted { session, .. }: Posted,
) -> Page {
    let deleted = service
        .delete_webhook_endpoint(session.request(pb::DeleteWebhookEndpointRequest {
            account_id: account_id.clone(),
            webhook_endpoint_id: id,
        }))
        .await;
    let path = format!("/console/a/{account_id}/webhooks");
    match deleted {
        Ok(_) => back_with(&path, Ok("Endpoint deleted.")),
        Err(status) if status.code() == Code::PermissionDenied => refused(&status),
        Err(status) => back_with(&path, Err(&status)),
    }
}

// ---- conversations --------------------------------------------------------------------------

pub(crate) async fn conversations(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path(account_id): Path<String>,
    uri: Uri,
) -> Page {
    let closed = query(&uri, "state") == "closed";
    let listed = match service.peers.conversations_for(&session.token) {
        Ok(mut conversations) => conversations
            .list_conversations(pb::ListConversationsRequest {
                account_id: account_id.clone(),
                state: if closed {
                    pb::ConversationState::Closed
                } else {
                    pb::ConversationState::Open
                } as i32,
                page_size: 100,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().conversations),
        Err(status) => Err(status),
    };
    let listed = match listed {
        Ok(listed) => listed,
        Err(status) => return refused(&status),
    };
    let account = html::esc(&account_id);
    let admin = session.may(&account_id, Role::Admin);
    let (title, other, other_name) = if closed {
        ("Closed conversations", "open", "Open ones")
    } else {
        ("Open conversations", "closed", "Closed ones")
    };
    let mut body = format!(
        r#"<h1>{title}</h1><p><a href="/console/a/{account}/conversations?state={other}">{other_name}</a> · newest first; agents answer them through the conversation API or a desk.</p>"#
    );
    if listed.is_empty() {
        body.push_str("<section><p>None.</p></section>");
    } else {
        body.push_str(r#"<section><table><thead><tr><th scope="col">Opened (UTC)</th><th scope="col">Consumer</th><th scope="col">Channel</th><th scope="col">Skill</th><th scope="col">Assignee</th><th scope="col">Last message</th></tr></thead><tbody>"#);
        for c in &listed {
            let when = |t: &Option<prost_types::Timestamp>| {
                t.as_ref()
                    .and_then(c2m_proto::from_timestamp)
                    .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M").to_string())
            };
            // Phone numbers in full for admins only.
            let consumer = if admin {
                c.consumer_address.clone()
            } else {
                c2m_runtime::phone::mask_phone(&c.consumer_address)
            };
            let channel = pb::Channel::try_from(c.channel)
                .map_or("", |c| c.as_str_name())
                .trim_start_matches("CHANNEL_");
            let _ = write!(
                body,
                r#"<tr><td><a href="/console/a/{account}/conversations/{id}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                when(&c.opened_at),
                html::esc(&consumer),
                html::esc(channel),
                html::esc(&c.skill_id),
                html::esc(if c.assignee.is_empty() {
                    "—"
                } else {
                    &c.assignee
                }),
                when(&c.last_message_at),
                id = html::esc(&c.conversation_id),
            );
        }
        body.push_str("</tbody></table></section>");
    }
    ok(html::layout(
        title,
        Some(&frame(&session, &account_id, "Conversations")),
        &body,
    ))
}

/// One conversation: who, where, and its transcript with each outbound message's stage.
pub(crate) async fn conversation(
    State(service): State<Service>,
    SignedIn(session): SignedIn,
    Path((account_id, id)): Path<(String, String)>,
) -> Page {
    let found = match service.peers.conversations_for(&session.token) {
        Ok(mut conversations) => conversations
            .get_conversation(pb::GetConversationRequest {
                account_id: account_id.clone(),
                conversation_id: id.clone(),
            })
            .await
            .map(|r| r.into_inner().conversation.unwrap_or_default()),
        Err(status) => Err(status),
    };
    let c = match found {
        Ok(c) => c,
        Err(status) => return refused(&status),
    };
    let when = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(c2m_proto::from_timestamp)
            .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
    };
    let consumer = if session.may(&account_id, Role::Admin) {
        c.consumer_address.clone()
    } else {
        c2m_runtime::phone::mask_phone(&c.consumer_address)
    };
    let state = if c.state == pb::ConversationState::Closed as i32 {
        format!("closed ({})", c.close_reason)
    } else {
        "open".to_owned()
    };
    let mut body = format!(
        r#"<h1>Conversation {id}</h1><section><p><strong>Consumer:</strong> {consumer} · <strong>Channel:</strong> {channel} · <strong>Skill:</strong> {skill} · <strong>State:</strong> {state} · <strong>Assignee:</strong> {assignee}</p><p class="hint">Opened {opened} UTC from handoff {handoff}.</p></section><section><h2>Transcript</h2><ol class="transcript">"#,
        id = html::esc(&c.conversation_id),
        consumer = html::esc(&consumer),
        channel = html::esc(
            pb::Channel::try_from(c.channel)
                .map_or("", |c| c.as_str_name())
                .trim_start_matches("CHANNEL_")
        ),
        skill = html::esc(&c.skill_id),
        state = html::esc(&state),
        assignee = html::esc(if c.assignee.is_empty() {
            "nobody"
        } else {
            &c.assignee
        }),
        opened = when(&c.opened_at),
        handoff = html::esc(&c.handoff_id),
    );
    for e in &c.transcript {
        let inbound = e.direction == pb::TranscriptDirection::Inbound as i32;
        let stage = pb::FunnelStage::try_from(e.stage)
            .ok()
            .filter(|s| *s != pb::FunnelStage::Unspecified)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("FUNNEL_STAGE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let media: String = e
            .media_urls
            .iter()
            .map(|u| format!(r#" <a href="{0}" rel="noreferrer">{0}</a>"#, html::esc(u)))
            .collect();
        let _ = write!(
            body,
            r#"<li data-direction="{dir}"><span class="hint">{at} · {who}{stage}</span><br>{text}{media}</li>"#,
            dir = if inbound { "in" } else { "out" },
            at = when(&e.at),
            who = html::esc(&e.author),
            stage = if stage.is_empty() {
                String::new()
            } else {
                format!(" · {}", html::esc(&stage))
            },
            text = html::esc(&e.text),
        );
    }
    body.push_str("</ol></section>");
    ok(html::layout(
        "Conversation",
        Some(&frame(&session, &account_id, "Conversations")),
        &body,
    ))
}
