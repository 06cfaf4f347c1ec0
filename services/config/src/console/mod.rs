//! The brand's console: configure, watch and manage deflection in a browser, served by the Config
//! role (and `c2m dev`) at `/console`, with nothing to install or build.
//!
//! Pages are rendered on the server; the browser needs no script. Every page acts as the
//! signed-in person: their token rides in a secure, HTTP-only, same-site cookie, and each action
//! is the gRPC call an API client would make with that token, so the console can do exactly what
//! the person may (a viewer's forged form is refused by the same check as a viewer's RPC). Forms
//! carry a CSRF token derived from the session, checked on every change. A form refused for what
//! it holds comes back as the page (200) with its fields marked, as a browser expects of a form;
//! a person refused (403) and a thing not found (404) keep their statuses.

mod html;
mod integrations;
mod pages;
mod records;

use std::time::SystemTime;

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, FromRequestParts},
    http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use c2m_runtime::auth::{Claims, Role};
use tonic::Request;

use crate::Service;

/// The session cookie.
const COOKIE: &str = "c2m_console";
/// The stylesheet, served from c2m itself.
const CSS: &str = include_str!("console.css");

/// `/console` and everything under it.
pub(crate) fn router(service: Service) -> Router {
    Router::new()
        .route("/console", get(pages::home))
        .route("/console/", get(pages::home))
        .route("/console/sign-in", post(pages::sign_in))
        .route("/console/sign-out", post(pages::sign_out))
        .route("/console/assets/console.css", get(stylesheet))
        .route("/console/a/{account}", get(pages::overview))
        .route("/console/a/{account}/configs", get(pages::configs))
        .route(
            "/console/a/{account}/configs/new",
            get(pages::new_config).post(pages::save_new_config),
        )
        .route(
            "/console/a/{account}/configs/{id}",
            get(pages::edit_config).post(pages::save_config),
        )
        .route(
            "/console/a/{account}/settings",
            get(pages::settings).post(pages::save_settings),
        )
        .route(
            "/console/a/{account}/keys",
            get(pages::keys).post(pages::create_key),
        )
        .route(
            "/console/a/{account}/keys/{id}/revoke",
            post(pages::revoke_key),
        )
        .route(
            "/console/a/{account}/try",
            get(pages::try_it).post(pages::run_try),
        )
        .route("/console/a/{account}/try/{handoff}", get(pages::watch_try))
        .route(
            "/console/a/{account}/transactions",
            get(records::transactions),
        )
        .route(
            "/console/a/{account}/transactions.csv",
            get(records::transactions_csv),
        )
        .route("/console/a/{account}/audit", get(records::audit))
        .route(
            "/console/a/{account}/templates",
            get(integrations::templates).post(integrations::create_template),
        )
        .route(
            "/console/a/{account}/templates/{id}/delete",
            post(integrations::delete_template),
        )
        .route(
            "/console/a/{account}/credentials",
            get(integrations::credentials).post(integrations::set_credentials),
        )
        .route(
            "/console/a/{account}/webhooks",
            get(integrations::webhooks).post(integrations::create_webhook),
        )
        .route(
            "/console/a/{account}/webhooks/{id}/test",
            post(integrations::test_webhook),
        )
        .route(
            "/console/a/{account}/webhooks/{id}/delete",
            post(integrations::delete_webhook),
        )
        .route(
            "/console/a/{account}/webhooks/{id}/state",
            post(integrations::set_webhook_state),
        )
        .route(
            "/console/a/{account}/webhooks/{id}/rotate",
            post(integrations::rotate_webhook),
        )
        .route(
            "/console/a/{account}/conversations",
            get(integrations::conversations),
        )
        .route(
            "/console/a/{account}/conversations/{id}",
            get(integrations::conversation),
        )
        .with_state(service)
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

/// The signed-in person: their token and what it says.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    token: String,
    claims: Claims,
}

impl Session {
    /// From the request's cookie, if it holds a valid token of a person who may use the console.
    fn from_headers(service: &Service, headers: &HeaderMap) -> Option<Self> {
        let token = cookie(headers, COOKIE)?;
        let claims = service.key.verify(&token, SystemTime::now()).ok()?;
        console_role(claims.role).then_some(Self { token, claims })
    }

    /// The CSRF token forms carry: a digest of the session token, which a page of another
    /// origin cannot read and so cannot compute.
    fn csrf(&self) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("c2m-console-csrf\0{}", self.token).as_bytes(),
        );
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    }

    /// Whether `form` carries this session's CSRF token (compared in constant time).
    fn csrf_ok(&self, form: &Form) -> bool {
        let (sent, expected) = (form.get("csrf"), self.csrf());
        sent.len() == expected.len()
            && sent
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    }

    /// A gRPC request as this person makes it.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Whether the person's role reaches `min` on `account_id` (what the page shows; the RPC
    /// decides).
    fn may(&self, account_id: &str, min: Role) -> bool {
        self.claims.authorize(account_id, min).is_ok()
    }

    fn who(&self) -> String {
        format!("{} ({})", self.claims.sub, self.claims.role.name())
    }
}

/// The signed-in person, for a page: without a session, the answer is the sign-in page.
pub(crate) struct SignedIn(pub(crate) Session);

impl FromRequestParts<Service> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, service: &Service) -> Result<Self, Response> {
        Session::from_headers(service, &parts.headers)
            .map(SignedIn)
            .ok_or_else(to_sign_in)
    }
}

/// A form posted from one of the signed-in person's pages, its CSRF token checked: a form that
/// did not come from their session is refused before any handler runs.
pub(crate) struct Posted {
    pub(crate) session: Session,
    pub(crate) form: Form,
}

impl FromRequest<Service> for Posted {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        service: &Service,
    ) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let SignedIn(session) = SignedIn::from_request_parts(&mut parts, service).await?;
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), service)
            .await
            .map_err(IntoResponse::into_response)?;
        let form = Form::parse(&body);
        if !session.csrf_ok(&form) {
            return Err(forged());
        }
        Ok(Self { session, form })
    }
}

/// Roles that use the console: people who configure and read, not agents or services.
fn console_role(role: Role) -> bool {
    matches!(
        role,
        Role::Viewer | Role::Editor | Role::Admin | Role::Operator
    )
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether the browser reached c2m over HTTPS (directly, or through a proxy that says so), or
/// on a loopback address, where browsers keep a `Secure` cookie too.
fn secure_cookie(headers: &HeaderMap) -> bool {
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let loopback = host.starts_with("localhost") || host.starts_with("127.0.0.1");
    forwarded_https || !loopback
}

fn session_cookie(value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("c2m_console=; Path=/console; Max-Age=0"))
}

/// A submitted form: its fields in order, repeated names kept.
#[derive(Debug, Default)]
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &Bytes) -> Self {
        Self(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// The first value of `name`; empty when absent.
    fn get(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Every value of `name`, in order.
    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }
}

/// What every console response carries: no caching of pages, nothing from another origin, no
/// framing.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// To the sign-in page.
fn to_sign_in() -> Response {
    secured(Redirect::to("/console").into_response())
}

/// 303 to `path`: after a change, the browser loads the page again rather than re-posting.
fn see_other(path: &str) -> Response {
    secured(Redirect::to(path).into_response())
}

/// 403 for a form that did not come from a console page.
fn forged() -> Response {
    secured(
        (
            StatusCode::FORBIDDEN,
            axum::response::Html(html::error_page(
                "Refused",
                "This form did not come from your console session. Reload the page and try again.",
            )),
        )
            .into_response(),
    )
}
