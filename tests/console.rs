//! The brand's console in a real browser: Debian's Chromium, headless, driven through its
//! ChromeDriver. An admin signs in, builds a configuration with two channels and previews it,
//! sees a field refused and then saved, tries a deflection and watches each step arrive, and sees
//! the funnel move; a viewer sees no edit
//! controls and a forged form is refused; a stale edit shows the conflict. Each journey saves
//! screenshots under the test's output directory.

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use c2m_proto::v1 as pb;
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::eventually;
use fantoccini::{Client, ClientBuilder, Locator};

use crate::story::{Story, Topology, authed, onboard, token};

/// A ChromeDriver on a free loopback port, stopped when dropped.
struct Driver {
    process: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Driver {
    async fn start() -> Self {
        let port = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let process = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver runs (Debian: apt install chromium chromium-driver; tests/run installs them)",
            );
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually("chromedriver answering", Duration::from_secs(20), || {
            let request = http.get(format!("{url}/status")).send();
            async move { request.await.is_ok_and(|r| r.status().is_success()) }
        })
        .await;
        Self { process, url }
    }

    /// A new headless browser with its own cookies.
    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:loggingPrefs".to_owned(),
            serde_json::json!({ "browser": "ALL" }),
        );
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a browser session")
    }
}

/// ChromeDriver's browser console log (what the page printed since the last read).
#[derive(Debug)]
struct BrowserLog;

impl fantoccini::wd::WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.to_owned()))
    }
}

/// Fails on any error the browser's console showed during the journey (a blocked resource, a
/// refused style, a page that failed to load).
async fn no_console_errors(browser: &Client) {
    let log = browser
        .issue_cmd(BrowserLog)
        .await
        .expect("the console log");
    let errors: Vec<&serde_json::Value> = log
        .as_array()
        .map(|entries| entries.iter().filter(|e| e["level"] == "SEVERE").collect())
        .unwrap_or_default();
    assert!(errors.is_empty(), "the browser's console: {errors:#?}");
}

/// Where a journey's screenshots go.
fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).expect("the screenshot directory");
    dir
}

async fn screenshot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    std::fs::write(shots().join(name), png).expect("the screenshot written");
}

async fn sign_in(browser: &Client, base: &str, credential: &str) {
    browser
        .goto(&format!("{base}/console"))
        .await
        .expect("the sign-in page");
    browser
        .find(Locator::Css("#f-token"))
        .await
        .expect("a token field")
        .send_keys(credential)
        .await
        .expect("typed");
    click(browser, "button[type=submit]").await;
}

async fn click(browser: &Client, css: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|_| panic!("{css} on the page"))
        .click()
        .await
        .expect("clicked");
}

/// The text of the first element `css` selects, waiting (10 s at most) for it to be on the page
/// and reading it again if the page was replaced in between (Try it reloads itself).
async fn text_of(browser: &Client, css: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let element = browser
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|_| panic!("{css} on the page"));
        match element.text().await {
            Ok(text) => return text,
            Err(error) if std::time::Instant::now() < deadline => {
                assert!(
                    format!("{error:?}").contains("StaleElementReference"),
                    "{css}: {error:?}"
                );
            }
            Err(error) => panic!("{css}: {error:?}"),
        }
    }
}

async fn fill(browser: &Client, css: &str, text: &str) {
    let field = browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|_| panic!("{css} on the page"));
    field.clear().await.expect("cleared");
    if !text.is_empty() {
        field.send_keys(text).await.expect("typed");
    }
}

async fn choose(browser: &Client, css: &str, value: &str) {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|_| panic!("{css} on the page"))
        .select_by_value(value)
        .await
        .expect("chosen");
}

async fn present(browser: &Client, css: &str) -> bool {
    !browser
        .find_all(Locator::Css(css))
        .await
        .expect("a query")
        .is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_builds_a_configuration_and_watches_the_funnel_in_a_browser() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let base = story.config_url().to_owned();
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    sign_in(&browser, &base, &token(AuthRole::Admin, Some("acme"))).await;
    assert!(text_of(&browser, "h1").await.contains("overview"));

    // A configuration with two channels, previewed before it is saved.
    browser
        .goto(&format!("{base}/console/a/acme/configs/new"))
        .await
        .expect("the form");
    fill(&browser, "#f-handoff_config_id", "two-channels").await;
    fill(&browser, "#f-skill_id", "billing-agents").await;
    choose(&browser, "#f-channel_1", "CHANNEL_RCS").await;
    choose(&browser, "#f-channel_2", "CHANNEL_SMS").await;
    fill(
        &browser,
        "#f-message_CHANNEL_SMS",
        "Hi {{first_name}}, text us here about {{topic}}.",
    )
    .await;
    fill(
        &browser,
        "#f-message_CHANNEL_RCS",
        "Hi {{first_name}}, chat with us about {{topic}}.",
    )
    .await;
    click(&browser, "button[value=preview]").await;
    assert_eq!(
        text_of(&browser, ".preview[data-channel=CHANNEL_SMS]").await,
        "Hi Ada, text us here about your bill."
    );
    assert!(
        browser
            .source()
            .await
            .expect("the page")
            .contains("1 SMS segment (GSM-7)")
    );

    // Saved without a name: refused, the field named beside it, nothing typed lost.
    click(&browser, "button[value=save]").await;
    assert!(
        text_of(&browser, "#f-name-error")
            .await
            .contains("required"),
        "the name's error beside it"
    );
    let kept = browser
        .find(Locator::Css("#f-message_CHANNEL_SMS"))
        .await
        .expect("the message")
        .prop("value")
        .await
        .expect("its value");
    assert_eq!(
        kept.as_deref(),
        Some("Hi {{first_name}}, text us here about {{topic}}.")
    );
    fill(&browser, "#f-name", "Billing, RCS first").await;
    screenshot(&browser, "admin-new-configuration.png").await;
    click(&browser, "button[value=save]").await;
    eventually(
        "the saved configuration's page",
        Duration::from_secs(10),
        || {
            let url = browser.current_url();
            async move {
                url.await
                    .is_ok_and(|u| u.path() == "/console/a/acme/configs/two-channels")
            }
        },
    )
    .await;
    browser
        .goto(&format!("{base}/console/a/acme/configs"))
        .await
        .expect("the list");
    let listed = text_of(&browser, "table").await;
    assert!(listed.contains("Billing, RCS first"), "{listed}");
    assert!(listed.contains("RCS → SMS"), "{listed}");
    let stored = story
        .config()
        .await
        .get_handoff_config(authed(
            pb::GetHandoffConfigRequest {
                account_id: "acme".into(),
                handoff_config_id: "two-channels".into(),
            },
            &token(AuthRole::Viewer, Some("acme")),
        ))
        .await
        .expect("saved through the RPC")
        .into_inner()
        .config
        .expect("config");
    assert_eq!(
        stored.channel_priority,
        [pb::Channel::Rcs as i32, pb::Channel::Sms as i32]
    );

    // Try it: a deflection to a phone, each step arriving on the page as the provider and the
    // consumer act.
    let phone = "+14155550377";
    browser
        .goto(&format!("{base}/console/a/acme/try"))
        .await
        .expect("the try-it page");
    fill(&browser, "#f-phone", phone).await;
    choose(&browser, "#f-config", "billing").await;
    click(&browser, "main button[type=submit]").await;
    let step = |stage: &'static str| {
        let browser = &browser;
        async move {
            browser
                .find(Locator::Css(&format!("li[data-stage={stage}]")))
                .await
                .ok()?
                .attr("data-state")
                .await
                .ok()?
        }
    };
    let done = |stage: &'static str| {
        let step = &step;
        async move { step(stage).await.as_deref() == Some("done") }
    };
    eventually("sent, on the page", Duration::from_secs(15), || {
        done("FUNNEL_STAGE_SENT")
    })
    .await;
    assert_eq!(
        step("FUNNEL_STAGE_DELIVERED").await.as_deref(),
        Some("waiting")
    );
    let sms = story.twilio.sent().pop().expect("the SMS at Twilio");
    assert_eq!(sms.field("To"), phone);
    assert_eq!(sms.field("Body"), "Hi Ada, text us here about your bill.");
    let (status, _) = story.twilio.send_status(&sms, "delivered", None).await;
    assert_eq!(status, 200);
    eventually("delivered, on the page", Duration::from_secs(15), || {
        done("FUNNEL_STAGE_DELIVERED")
    })
    .await;
    story.sms_to_acme(phone, "Yes please").await;
    eventually(
        "the conversation, on the page",
        Duration::from_secs(15),
        || done("FUNNEL_STAGE_CONVERSATION_OPENED"),
    )
    .await;
    assert!(done("FUNNEL_STAGE_RESPONDED").await);
    screenshot(&browser, "admin-try-it.png").await;
    // The conversation it opened is in the live list, the phone in full for an admin.
    browser
        .goto(&format!("{base}/console/a/acme/conversations"))
        .await
        .expect("the conversations");
    let open = text_of(&browser, "table").await;
    assert!(
        open.contains(phone) && open.contains("billing-agents"),
        "{open}"
    );
    // Its transcript: the deflection's message out, then the consumer's reply, each by its author.
    click(&browser, "table a").await;
    let transcript = text_of(&browser, "ol.transcript").await;
    let out = transcript
        .find("text us here about your bill")
        .expect("the message out");
    let reply = transcript.find("Yes please").expect("the reply");
    assert!(out < reply, "{transcript}");
    assert!(
        transcript.contains("· deflection") && transcript.contains("· consumer"),
        "{transcript}"
    );

    // The overview's funnel moved.
    browser
        .goto(&format!("{base}/console/a/acme"))
        .await
        .expect("the overview");
    let table = text_of(&browser, "table").await;
    // Day, attempted, sent, delivered, responded.
    assert!(
        table.lines().any(|l| l
            .split_whitespace()
            .skip(1)
            .take(4)
            .eq(["1", "1", "1", "1"])),
        "{table}"
    );
    assert!(present(&browser, "svg[role=img]").await, "the chart");
    screenshot(&browser, "admin-overview.png").await;
    // By channel: a row per day and channel.
    choose(&browser, "#f-by", "channel").await;
    click(&browser, "form[aria-label=Grouping] button").await;
    // The form's answer is a new page: the table is read until it is that page's.
    let grouped = |table: &str| {
        table.lines().any(|l| {
            l.split_whitespace()
                .skip(1)
                .take(3)
                .eq(["CHANNEL_SMS", "1", "1"])
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut by_channel = text_of(&browser, "table").await;
    while !grouped(&by_channel) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        by_channel = text_of(&browser, "table").await;
    }
    assert!(grouped(&by_channel), "{by_channel}");

    // The handoff in the records, and as a spreadsheet.
    browser
        .goto(&format!("{base}/console/a/acme/transactions"))
        .await
        .expect("the handoffs");
    let records = text_of(&browser, "table").await;
    let handoff_id = records
        .split_whitespace()
        .find(|w| w.starts_with("ho-"))
        .expect("a handoff listed")
        .to_owned();
    assert!(records.contains("conversation opened"), "{records}");
    let cookie = browser
        .get_named_cookie("c2m_console")
        .await
        .expect("the session cookie");
    let csv = reqwest::Client::new()
        .get(format!("{base}/console/a/acme/transactions.csv"))
        .header("cookie", format!("c2m_console={}", cookie.value()))
        .send()
        .await
        .expect("the download");
    assert_eq!(csv.status(), 200);
    assert!(
        csv.headers()["content-disposition"]
            .to_str()
            .expect("ascii")
            .starts_with("attachment; filename=\"c2m-acme-handoffs-")
    );
    let csv = csv.text().await.expect("the file");
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 2, "a header and the handoff: {csv}");
    assert!(rows[1].starts_with(&format!("{handoff_id},")), "{csv}");

    // Who changed what: the configuration made above, by this admin.
    browser
        .goto(&format!("{base}/console/a/acme/audit"))
        .await
        .expect("the audit log");
    let log = text_of(&browser, "table").await;
    assert!(
        log.lines().any(|l| l.contains("tester")
            && l.contains("CreateHandoffConfig")
            && l.contains("two-channels")),
        "{log}"
    );
    no_console_errors(&browser).await;
    browser.close().await.expect("closed");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_no_edit_controls_and_a_forged_form_is_refused() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let base = story.config_url().to_owned();
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    let viewer = token(AuthRole::Viewer, Some("acme"));
    sign_in(&browser, &base, &viewer).await;
    assert!(text_of(&browser, "h1").await.contains("overview"));
    browser
        .goto(&format!("{base}/console/a/acme/configs"))
        .await
        .expect("the list");
    assert!(text_of(&browser, "table").await.contains("billing"));
    assert!(!present(&browser, "a[href$='/configs/new']").await);
    browser
        .goto(&format!("{base}/console/a/acme/configs/billing"))
        .await
        .expect("a configuration");
    assert!(present(&browser, "#f-name[readonly]").await);
    assert!(!present(&browser, "button[value=save]").await);
    browser
        .goto(&format!("{base}/console/a/acme/settings"))
        .await
        .expect("settings");
    assert!(!present(&browser, "main button[type=submit]").await);
    screenshot(&browser, "viewer-settings.png").await;

    // The page's own CSRF token does not make the viewer an admin: the RPC refuses.
    let csrf = browser
        .find(Locator::Css("main input[name=csrf]"))
        .await
        .expect("the form's token")
        .attr("value")
        .await
        .expect("its value")
        .expect("a value");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client");
    let post = |credential: &str, fields: Vec<(&str, String)>| {
        http.post(format!("{base}/console/a/acme/settings"))
            .header("cookie", format!("c2m_console={credential}"))
            .form(&fields)
            .send()
    };
    let settings = |csrf: String| {
        vec![
            ("csrf", csrf),
            ("deflection_enabled", "on".to_owned()),
            ("rate_limit_per_second", "30".to_owned()),
            ("reply_lookback_hours", "24".to_owned()),
            ("idle_close_minutes", "0".to_owned()),
            ("time_zone", String::new()),
            ("help_text", "forged".to_owned()),
        ]
    };
    let as_viewer = post(&viewer, settings(csrf)).await.expect("answered");
    assert_eq!(as_viewer.status(), 403);
    // An admin's cookie, sent by another site's form (no token): refused before any RPC.
    let admin = token(AuthRole::Admin, Some("acme"));
    let cross_site = post(&admin, settings(String::new()))
        .await
        .expect("answered");
    assert_eq!(cross_site.status(), 403);
    let account = story
        .config()
        .await
        .get_account(authed(
            pb::GetAccountRequest {
                account_id: "acme".into(),
            },
            &admin,
        ))
        .await
        .expect("the account")
        .into_inner()
        .account
        .expect("account");
    assert_eq!(
        account.settings.expect("settings").help_text,
        "",
        "nothing forged was saved"
    );

    // Every page keeps to c2m's origin.
    let page = http
        .get(format!("{base}/console"))
        .send()
        .await
        .expect("answered");
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    no_console_errors(&browser).await;
    browser.close().await.expect("closed");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_edit_says_someone_else_changed_the_configuration() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let base = story.config_url().to_owned();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    let admin = token(AuthRole::Admin, Some("acme"));
    sign_in(&browser, &base, &admin).await;
    browser
        .goto(&format!("{base}/console/a/acme/configs/billing"))
        .await
        .expect("the configuration");

    // Someone else saves it meanwhile.
    let mut config = story.config().await;
    let current = config
        .get_handoff_config(authed(
            pb::GetHandoffConfigRequest {
                account_id: "acme".into(),
                handoff_config_id: "billing".into(),
            },
            &admin,
        ))
        .await
        .expect("the configuration")
        .into_inner()
        .config
        .expect("config");
    config
        .update_handoff_config(authed(
            pb::UpdateHandoffConfigRequest {
                account_id: "acme".into(),
                config: Some(pb::HandoffConfig {
                    name: "Billing (theirs)".into(),
                    ..current.clone()
                }),
            },
            &admin,
        ))
        .await
        .expect("their update");

    fill(&browser, "#f-name", "Billing (mine)").await;
    click(&browser, "button[value=save]").await;
    let banner = text_of(&browser, ".banner.bad").await;
    assert!(
        banner.contains(&format!("now at version {}", current.version + 1)),
        "{banner}"
    );
    assert_eq!(
        browser
            .find(Locator::Css("#f-name"))
            .await
            .expect("the name")
            .prop("value")
            .await
            .expect("its value")
            .as_deref(),
        Some("Billing (mine)"),
        "the edit is kept to reapply"
    );
    screenshot(&browser, "stale-edit.png").await;
    no_console_errors(&browser).await;
    browser.close().await.expect("closed");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_adds_a_template_a_webhook_endpoint_and_credentials() {
    let story = Story::start(Topology::Dev).await;
    onboard(&story, "acme").await;
    let base = story.config_url().to_owned();
    let driver = Driver::start().await;
    let browser = driver.browser().await;
    sign_in(&browser, &base, &token(AuthRole::Admin, Some("acme"))).await;

    browser
        .goto(&format!("{base}/console/a/acme/templates"))
        .await
        .expect("the templates");
    fill(&browser, "#f-t-name", "billing_followup").await;
    fill(&browser, "#f-t-language", "en_US").await;
    fill(
        &browser,
        "#f-t-body",
        "Hi {{1}}, about your bill: reply here.",
    )
    .await;
    click(
        &browser,
        "main form[action$='/templates'] button[type=submit]",
    )
    .await;
    assert!(
        text_of(&browser, ".banner.good")
            .await
            .contains("Template added")
    );
    assert_eq!(
        text_of(&browser, "td[data-status]").await,
        "pending",
        "Meta reviews it first"
    );
    // A configuration naming it previews the template with its placeholders, and warns that
    // Meta has not approved it yet.
    let template_id = text_of(&browser, "code.template-id").await;
    browser
        .goto(&format!("{base}/console/a/acme/configs/billing"))
        .await
        .expect("a configuration");
    fill(&browser, "#f-whatsapp_template_id", &template_id).await;
    click(&browser, "button[value=preview]").await;
    assert_eq!(
        text_of(&browser, ".preview[data-channel=WHATSAPP_TEMPLATE]").await,
        "Hi {{1}}, about your bill: reply here."
    );
    let page = browser.source().await.expect("the page");
    assert!(
        page.contains("1 placeholder ({{1}})"),
        "the placeholders listed"
    );
    assert!(page.contains("Meta has not approved this template"));

    // An endpoint that nobody answers: added with its secret shown once; a test is not taken.
    browser
        .goto(&format!("{base}/console/a/acme/webhooks"))
        .await
        .expect("the webhooks");
    fill(&browser, "#f-w-url", "http://127.0.0.1:9/hooks/c2m").await;
    click(&browser, "input[value='handoff.sent']").await;
    click(
        &browser,
        "main form[action$='/webhooks'] button[type=submit]",
    )
    .await;
    let first_secret = text_of(&browser, "#new-secret").await;
    assert!(first_secret.starts_with("whsec_"));
    assert!(
        text_of(&browser, "main section h2 + p + p")
            .await
            .contains("handoff.sent")
    );
    click(&browser, "form[action$='/test'] button").await;
    assert!(
        text_of(&browser, ".banner.bad")
            .await
            .contains("The test event was not taken")
    );
    // Disabled and enabled again; the secret rotated, the new one shown once.
    click(&browser, "form[action$='/state'] button").await;
    assert!(
        text_of(&browser, ".banner.good")
            .await
            .contains("Endpoint disabled")
    );
    assert!(
        browser
            .source()
            .await
            .expect("the page")
            .contains("disabled by an admin")
    );
    click(&browser, "form[action$='/state'] button").await;
    assert!(
        text_of(&browser, ".banner.good")
            .await
            .contains("Endpoint enabled")
    );
    click(&browser, "form[action$='/rotate'] button").await;
    let rotated = text_of(&browser, "#new-secret").await;
    assert!(rotated.starts_with("whsec_") && rotated != first_secret);
    screenshot(&browser, "admin-webhooks.png").await;
    let endpoints = story
        .config()
        .await
        .list_webhook_endpoints(authed(
            pb::ListWebhookEndpointsRequest {
                account_id: "acme".into(),
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("the endpoints")
        .into_inner()
        .endpoints;
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].event_types, ["handoff.sent"]);

    // Credentials are set and never shown back; a bad one is refused naming its field.
    browser
        .goto(&format!("{base}/console/a/acme/credentials"))
        .await
        .expect("the credentials");
    fill(&browser, "#f-sandbox-reply_text", "Yes please").await;
    click(&browser, "form:has(#f-sandbox-reply_text) button").await;
    assert_eq!(text_of(&browser, ".banner.good").await, "Credentials set.");
    assert!(
        !browser
            .source()
            .await
            .expect("the page")
            .contains("Yes please"),
        "nothing set is shown back"
    );
    fill(&browser, "#f-twilio-account_sid", "not-a-sid").await;
    click(&browser, "form:has(#f-twilio-account_sid) button").await;
    let refusal = text_of(&browser, ".banner.bad").await;
    assert!(refusal.contains("twilio."), "{refusal}");
    no_console_errors(&browser).await;
    browser.close().await.expect("closed");
    story.stop().await;
}
