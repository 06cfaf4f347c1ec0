//! A Twilio emulator on loopback: the Messages API as Twilio documents it (Basic auth, form
//! fields, JSON answers, error bodies), and the webhooks Twilio sends back (status callbacks and
//! inbound messages), signed with `X-Twilio-Signature` exactly as Twilio signs them.
//!
//! The signature code here is written from Twilio's documentation independently of the gateway's,
//! so the gateway is checked against the algorithm, not against itself.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use base64::{Engine, engine::general_purpose::STANDARD};
use ring::hmac;

/// One message the emulator accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentSms {
    pub sid: String,
    pub account_sid: String,
    /// Every form field as sent (the last, for a repeated one).
    pub form: HashMap<String, String>,
    /// The `MediaUrl` fields, in order (an MMS).
    pub media_urls: Vec<String>,
    /// The W3C trace context the request carried, if any: which trace the send belongs to.
    pub traceparent: Option<String>,
}

impl SentSms {
    pub fn field(&self, name: &str) -> &str {
        self.form.get(name).map_or("", String::as_str)
    }
}

#[derive(Default)]
struct State_ {
    accounts: HashMap<String, String>,
    sent: Vec<SentSms>,
    /// Messages accepted but not kept (see [`TwilioEmulator::keep_only_counts`]).
    forgotten: usize,
    keep_only_counts: bool,
    refuse_next: Option<(u16, u32, String)>,
    counter: u64,
    line_types: HashMap<String, String>,
    lookups: Vec<String>,
    requests: usize,
    throttle_next: Option<(usize, String)>,
    hold_next: Option<Arc<tokio::sync::Notify>>,
    hold_next_lookup: Option<Arc<tokio::sync::Notify>>,
    /// Lookups that reached a hold (held now, or released since).
    lookups_held: usize,
    stall_next: bool,
    error_after_taking_next: bool,
    latency: Latency,
    /// SplitMix64's state, for the latency's draws (reproducible).
    draws: u64,
}

/// How long the emulator takes to answer a send, as a real provider does (Twilio's Messages API
/// answers in 100–500 ms).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Latency {
    /// At once (the default).
    #[default]
    None,
    Fixed(Duration),
    /// Lognormal with this median and 99th percentile, the shape of a real API's latency.
    LogNormal {
        median: Duration,
        p99: Duration,
    },
}

impl Latency {
    /// `fixed:<ms>` or `lognormal:<median ms>:<p99 ms>`, as the benchmark's knob takes it.
    pub fn parse(text: &str) -> Option<Self> {
        let ms = |v: &str| v.parse::<u64>().ok().map(Duration::from_millis);
        let parts: Vec<&str> = text.split(':').collect();
        match parts.as_slice() {
            ["none"] => Some(Self::None),
            ["fixed", d] => Some(Self::Fixed(ms(d)?)),
            ["lognormal", median, p99] => {
                let (median, p99) = (ms(median)?, ms(p99)?);
                (p99 >= median).then_some(Self::LogNormal { median, p99 })
            }
            _ => None,
        }
    }

    /// One draw, from SplitMix64's `state`.
    fn draw(self, state: &mut u64) -> Duration {
        match self {
            Self::None => Duration::ZERO,
            Self::Fixed(d) => d,
            Self::LogNormal { median, p99 } => {
                let mut uniform = || {
                    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = *state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
                };
                // Box-Muller: a standard normal draw.
                let (u1, u2) = (uniform().max(f64::MIN_POSITIVE), uniform());
                let normal = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                // The 99th percentile of a standard normal is 2.3263.
                let sigma = (p99.as_secs_f64() / median.as_secs_f64()).ln() / 2.3263;
                let seconds = median.as_secs_f64() * (sigma * normal).exp();
                Duration::from_secs_f64(seconds.min(p99.as_secs_f64() * 10.0))
            }
        }
    }
}

/// A send the emulator holds until [`Hold::release`]: a provider taking its time.
#[derive(Debug, Clone)]
pub struct Hold(Arc<tokio::sync::Notify>);

impl Hold {
    /// Lets the held send be answered.
    pub fn release(&self) {
        self.0.notify_one();
    }
}

/// The emulator. Dropping it stops the server.
pub struct TwilioEmulator {
    base_url: String,
    state: Arc<Mutex<State_>>,
    http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for TwilioEmulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioEmulator")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

fn twilio_error(status: StatusCode, code: u32, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({
            "code": code,
            "message": message,
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status.as_u16(),
        })),
    )
        .into_response()
}

async fn create_message(
    State(state): State<Arc<Mutex<State_>>>,
    Path(account_sid): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (hold, latency) = {
        let mut state = state.lock().expect("emulator state");
        state.requests += 1;
        let latency = state.latency;
        (state.hold_next.take(), latency.draw(&mut state.draws))
    };
    if let Some(hold) = hold {
        hold.notified().await;
    }
    if !latency.is_zero() {
        // The provider's own time to answer.
        tokio::time::sleep(latency).await;
    }
    let (response, stall) = {
        let mut state = state.lock().expect("emulator state");
        let mut response = take_message(&mut state, account_sid, &headers, &body);
        let stall = response.status().is_success() && std::mem::take(&mut state.stall_next);
        if response.status().is_success() && std::mem::take(&mut state.error_after_taking_next) {
            // Twilio has the message, and answers as if it had failed.
            response = twilio_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                20500,
                "Internal Server Error",
            );
        }
        (response, stall)
    };
    if stall {
        // Twilio has the message; its answer never comes.
        std::future::pending::<()>().await;
    }
    response
}

/// What Twilio makes of a send: the message taken (201 with its resource), or the error.
fn take_message(
    state: &mut State_,
    account_sid: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    // HTTP Basic: AccountSid and AuthToken.
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            let (sid, token) = pair.split_once(':')?;
            Some(sid == account_sid && state.accounts.get(sid).is_some_and(|t| t == token))
        })
        .unwrap_or(false);
    if !authorized {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-www-form-urlencoded") {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            20001,
            "expected a form-encoded body",
        );
    }
    let Ok(form) = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body) else {
        return twilio_error(StatusCode::BAD_REQUEST, 20001, "malformed form body");
    };
    let media_urls: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "MediaUrl")
        .map(|(_, v)| v.clone())
        .collect();
    let form: HashMap<String, String> = form.into_iter().collect();
    if form.get("To").is_none_or(|t| !t.starts_with('+')) {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21604,
            "A 'To' phone number is required.",
        );
    }
    if form.get("Body").is_none_or(String::is_empty) && media_urls.is_empty() {
        return twilio_error(StatusCode::BAD_REQUEST, 21602, "Message body is required.");
    }
    if !form.contains_key("From") && !form.contains_key("MessagingServiceSid") {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21603,
            "A 'From' or 'MessagingServiceSid' parameter is required",
        );
    }
    if let Some((left, retry_after)) = state.throttle_next.take() {
        if left > 1 {
            state.throttle_next = Some((left - 1, retry_after.clone()));
        }
        let mut response = twilio_error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
        if let Ok(value) = retry_after.parse() {
            response.headers_mut().insert("retry-after", value);
        }
        return response;
    }
    if let Some((status, code, message)) = state.refuse_next.take() {
        return twilio_error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            code,
            &message,
        );
    }
    state.counter += 1;
    let sid = format!("SM{:032x}", state.counter);
    let reply = serde_json::json!({
        "sid": sid,
        "account_sid": account_sid,
        "to": form["To"],
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "body": form.get("Body").cloned().unwrap_or_default(),
        "num_media": media_urls.len().to_string(),
        "status": if form.contains_key("MessagingServiceSid") { "accepted" } else { "queued" },
        "num_segments": "1",
        "direction": "outbound-api",
        "api_version": "2010-04-01",
        "error_code": null,
        "error_message": null,
        "uri": format!("/2010-04-01/Accounts/{account_sid}/Messages/{sid}.json"),
    });
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if state.keep_only_counts {
        state.forgotten += 1;
    } else {
        state.sent.push(SentSms {
            sid,
            account_sid,
            form,
            media_urls,
            traceparent,
        });
    }
    (StatusCode::CREATED, Json(reply)).into_response()
}

/// Lookup v2: `GET /v2/PhoneNumbers/{number}?Fields=line_type_intelligence`, HTTP Basic with any
/// account the emulator knows.
async fn lookup(
    State(state): State<Arc<Mutex<State_>>>,
    Path(number): Path<String>,
    headers: HeaderMap,
    query: axum::http::Uri,
) -> Response {
    let hold = state
        .lock()
        .expect("emulator state")
        .hold_next_lookup
        .take();
    if let Some(hold) = hold {
        state.lock().expect("emulator state").lookups_held += 1;
        hold.notified().await;
    }
    let mut state = state.lock().expect("emulator state");
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            let (sid, token) = pair.split_once(':')?;
            Some(state.accounts.get(sid).is_some_and(|t| t == token))
        })
        .unwrap_or(false);
    if !authorized {
        return twilio_error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
    }
    if !query
        .query()
        .unwrap_or_default()
        .contains("Fields=line_type_intelligence")
    {
        return twilio_error(StatusCode::BAD_REQUEST, 60200, "Invalid parameter");
    }
    state.lookups.push(number.clone());
    let kind = state
        .line_types
        .get(&number)
        .cloned()
        .unwrap_or_else(|| "mobile".into());
    Json(serde_json::json!({
        "calling_country_code": "1",
        "country_code": "US",
        "phone_number": number,
        "national_format": number,
        "valid": true,
        "line_type_intelligence": {
            "carrier_name": "Emulated Carrier",
            "error_code": null,
            "mobile_country_code": "310",
            "mobile_network_code": "456",
            "type": kind,
        },
        "url": format!("https://lookups.twilio.com/v2/PhoneNumbers/{number}"),
    }))
    .into_response()
}

/// Twilio's signature: base64(HMAC-SHA1(auth token, URL + each parameter name and value, sorted
/// by name)).
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(&str, &str)]) -> String {
    let mut params = params.to_vec();
    params.sort();
    let mut data = url.to_owned();
    for (name, value) in params {
        data.push_str(name);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    STANDARD.encode(hmac::sign(&key, data.as_bytes()))
}

impl TwilioEmulator {
    /// Answers every send after `latency` from now on.
    pub fn set_latency(&self, latency: Latency) {
        self.state.lock().expect("emulator state").latency = latency;
    }
}

impl TwilioEmulator {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base_url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State_::default()));
        let app = Router::new()
            .route(
                "/2010-04-01/Accounts/{account_sid}/Messages.json",
                post(create_message),
            )
            .route("/v2/PhoneNumbers/{number}", axum::routing::get(lookup))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("emulator serves");
        });
        Self {
            base_url,
            state,
            http: reqwest::Client::new(),
            server,
        }
    }

    /// The API base URL to configure (`channel_gateway.twilio_api_base`).
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Accepts sends for this account and token.
    pub fn add_account(&self, account_sid: &str, auth_token: &str) {
        self.state
            .lock()
            .expect("emulator state")
            .accounts
            .insert(account_sid.into(), auth_token.into());
    }

    /// Answers the next send with this HTTP status and Twilio error.
    pub fn refuse_next(&self, http_status: u16, code: u32, message: &str) {
        self.state.lock().expect("emulator state").refuse_next =
            Some((http_status, code, message.into()));
    }

    /// What Lookup answers for `number` (`landline`, `mobile`, `nonFixedVoip`, …); `mobile` unless set.
    pub fn set_line_type(&self, number: &str, kind: &str) {
        self.state
            .lock()
            .expect("emulator state")
            .line_types
            .insert(number.into(), kind.into());
    }

    /// The numbers looked up so far.
    pub fn lookups(&self) -> Vec<String> {
        self.state.lock().expect("emulator state").lookups.clone()
    }

    /// Answers the next `times` sends 429 (Twilio 20429) with this `Retry-After`.
    pub fn throttle_next(&self, times: usize, retry_after: &str) {
        self.state.lock().expect("emulator state").throttle_next =
            Some((times, retry_after.into()));
    }

    /// Takes the next message but never answers the send: the answer lost on its way back.
    pub fn stall_next(&self) {
        self.state.lock().expect("emulator state").stall_next = true;
    }

    /// Takes the next message, then answers 500 as if it had not.
    pub fn error_after_taking_next(&self) {
        self.state
            .lock()
            .expect("emulator state")
            .error_after_taking_next = true;
    }

    /// Holds the next send, before taking it and unanswered, until the returned [`Hold`] is
    /// released.
    pub fn hold_next(&self) -> Hold {
        let hold = Arc::new(tokio::sync::Notify::new());
        self.state.lock().expect("emulator state").hold_next = Some(hold.clone());
        Hold(hold)
    }

    /// Holds the next number lookup, unanswered, until the returned [`Hold`] is released.
    pub fn hold_next_lookup(&self) -> Hold {
        let hold = Arc::new(tokio::sync::Notify::new());
        self.state.lock().expect("emulator state").hold_next_lookup = Some(hold.clone());
        Hold(hold)
    }

    /// Lookups that reached a hold of [`hold_next_lookup`](Self::hold_next_lookup).
    pub fn lookups_held(&self) -> usize {
        self.state.lock().expect("emulator state").lookups_held
    }

    /// Send requests received, accepted or not.
    pub fn requests(&self) -> usize {
        self.state.lock().expect("emulator state").requests
    }

    /// From now on, counts the messages it accepts without keeping them: a long benchmark then
    /// measures the servers' memory, not the emulator's record. [`Self::sent`] lists only the
    /// messages kept before; [`Self::accepted`] counts all.
    pub fn keep_only_counts(&self) {
        self.state.lock().expect("emulator state").keep_only_counts = true;
    }

    /// How many messages it accepted, kept or not.
    pub fn accepted(&self) -> usize {
        let state = self.state.lock().expect("emulator state");
        state.sent.len() + state.forgotten
    }

    /// Every message accepted so far.
    pub fn sent(&self) -> Vec<SentSms> {
        self.state.lock().expect("emulator state").sent.clone()
    }

    fn token(&self, account_sid: &str) -> String {
        self.state.lock().expect("emulator state").accounts[account_sid].clone()
    }

    /// Posts a webhook as Twilio does; `signature` overrides the correct one. Returns the HTTP
    /// status and body.
    pub async fn post_webhook(
        &self,
        url: &str,
        account_sid: &str,
        params: &[(&str, &str)],
        signature: Option<&str>,
    ) -> (u16, String) {
        let signature = signature
            .map(str::to_owned)
            .unwrap_or_else(|| twilio_signature(&self.token(account_sid), url, params));
        let response = self
            .http
            .post(url)
            .header("X-Twilio-Signature", signature)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("I-Twilio-Idempotency-Token", format!("{:x}", rand_token()))
            .body(serde_urlencoded::to_string(params).expect("form"))
            .send()
            .await
            .expect("webhook delivered");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    /// The status callback Twilio sends for `sms` reaching `status` (e.g. `delivered`).
    pub async fn send_status(
        &self,
        sms: &SentSms,
        status: &str,
        signature: Option<&str>,
    ) -> (u16, String) {
        let from = sms.field("From").to_owned();
        let params = [
            ("MessageSid", sms.sid.as_str()),
            ("SmsSid", sms.sid.as_str()),
            ("SmsStatus", status),
            ("MessageStatus", status),
            ("AccountSid", sms.account_sid.as_str()),
            ("From", from.as_str()),
            ("To", sms.field("To")),
            ("ApiVersion", "2010-04-01"),
        ];
        self.post_webhook(
            sms.field("StatusCallback"),
            &sms.account_sid,
            &params,
            signature,
        )
        .await
    }

    /// The inbound-message webhook Twilio sends when `from` texts `to`.
    pub async fn send_inbound(
        &self,
        url: &str,
        account_sid: &str,
        from: &str,
        to: &str,
        body: &str,
        signature: Option<&str>,
    ) -> (u16, String) {
        let sid = {
            let mut state = self.state.lock().expect("emulator state");
            state.counter += 1;
            format!("SM{:032x}", state.counter)
        };
        let params = [
            ("MessageSid", sid.as_str()),
            ("SmsMessageSid", sid.as_str()),
            ("AccountSid", account_sid),
            ("From", from),
            ("To", to),
            ("Body", body),
            ("NumMedia", "0"),
            ("NumSegments", "1"),
            ("SmsStatus", "received"),
            ("ApiVersion", "2010-04-01"),
            ("FromCountry", "US"),
        ];
        self.post_webhook(url, account_sid, &params, signature)
            .await
    }
}

fn rand_token() -> u128 {
    uuid::Uuid::new_v4().as_u128()
}

impl Drop for TwilioEmulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::{Duration, Latency, twilio_signature};

    /// 10,000 lognormal draws land on the median and the 99th percentile asked for (within 5%).
    #[test]
    fn latency_draws_have_the_median_and_p99_asked_for() {
        let latency = Latency::parse("lognormal:150:600").expect("parses");
        let mut state = 7;
        let mut draws: Vec<Duration> = (0..10_000).map(|_| latency.draw(&mut state)).collect();
        draws.sort();
        let near =
            |got: Duration, want: f64| (got.as_secs_f64() * 1000.0 / want - 1.0).abs() < 0.05;
        assert!(near(draws[5_000], 150.0), "median {:?}", draws[5_000]);
        assert!(near(draws[9_900], 600.0), "p99 {:?}", draws[9_900]);
        assert_eq!(
            Latency::parse("fixed:20"),
            Some(Latency::Fixed(Duration::from_millis(20)))
        );
        assert_eq!(
            Latency::parse("lognormal:600:150"),
            None,
            "a p99 under the median"
        );
    }

    /// Twilio's published example.
    #[test]
    fn signs_like_twilio() {
        let params = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ];
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                &params
            ),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }
}
