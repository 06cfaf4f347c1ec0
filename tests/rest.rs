//! REST for IVRs that cannot speak gRPC: the Handoff RPCs over HTTP/JSON on the gRPC port, the same
//! auth and semantics, errors as JSON with the gRPC code mapped to an HTTP status.

use c2m_proto::v1 as pb;
use serde_json::{Value, json};

use crate::story::{Story, Topology, onboard};

async fn post(
    url: &str,
    key: Option<&str>,
    body: Value,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut request = reqwest::Client::new().post(url).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.expect("http");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json().await.expect("json body");
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ivr_can_deflect_over_rest_with_the_same_rules() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let base = story.servers[0].endpoint();
    let handoffs = format!("{base}/v1/accounts/acme/handoffs");
    // proto3 JSON: lowerCamelCase, and snake_case accepted.
    let body = json!({
        "handoffConfigId": "billing",
        "consumer_phone": "+14155550190",
        "idempotencyKey": "rest-1",
        "templateVariables": { "topic": "your bill" },
        "engagementAttributes": { "personalInfo": { "firstName": "Ada" } },
    });

    let (status, answer, _) = post(&handoffs, Some(&key), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let handoff = &answer["handoff"];
    assert_eq!(handoff["status"], "HANDOFF_STATUS_SENT");
    assert_eq!(handoff["channel"], "CHANNEL_SMS");
    assert_eq!(handoff["accountId"], "acme");
    assert_eq!(
        story.twilio.sent()[0].field("Body"),
        "Hi Ada, text us here about your bill."
    );

    // The same idempotency key over REST is the same handoff.
    let (status, again, _) = post(&handoffs, Some(&key), body.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again["handoff"]["handoffId"], handoff["handoffId"]);
    assert_eq!(story.twilio.sent().len(), 1);

    let (status, error, _) = post(&handoffs, None, body.clone()).await;
    assert_eq!(
        (status, error["status"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );

    let mut bad_phone = body.clone();
    bad_phone["consumer_phone"] = json!("415-555-0190");
    bad_phone["idempotencyKey"] = json!("rest-2");
    let (status, error, _) = post(&handoffs, Some(&key), bad_phone).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], 3);
    assert_eq!(
        error["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(
        error["details"][0]["fieldViolations"][0]["field"],
        "consumer_phone"
    );

    let mut unknown = body.clone();
    unknown["consumerPhoneNumber"] = json!("+14155550190");
    let (status, error, _) = post(&handoffs, Some(&key), unknown).await;
    assert_eq!(status, 400, "{error}");

    let mut other_account = body.clone();
    other_account["accountId"] = json!("globex");
    let (status, error, _) = post(&handoffs, Some(&key), other_account).await;
    assert_eq!(status, 400);
    assert_eq!(
        error["details"][0]["fieldViolations"][0]["field"],
        "account_id"
    );

    let (status, eligibility, _) = post(
        &format!("{base}/v1/accounts/acme/eligibility"),
        Some(&key),
        json!({
            "handoffConfigId": "billing",
            "consumerPhone": "+14155550191",
            "templateVariables": { "topic": "x", "first_name": "y" },
        }),
    )
    .await;
    assert_eq!(status, 200, "{eligibility}");
    assert_eq!(eligibility["eligible"], true);
    assert_eq!(eligibility["recommendedChannel"], "CHANNEL_SMS");

    let got: Value = reqwest::Client::new()
        .get(format!(
            "{handoffs}/{}",
            handoff["handoffId"].as_str().expect("id")
        ))
        .bearer_auth(&key)
        .send()
        .await
        .expect("http")
        .json()
        .await
        .expect("json");
    assert_eq!(got["handoff"]["handoffId"], handoff["handoffId"]);

    let document = reqwest::get(format!("{base}/v1/openapi.json"))
        .await
        .expect("http")
        .text()
        .await
        .expect("text");
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../services/handoff/openapi.json"
    ))
    .expect("committed document");
    assert_eq!(
        document, committed,
        "the served document is the committed one"
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_rest_answers_429_with_retry_after() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                rate_limit_per_second: 1,
                ..Default::default()
            },
        )
        .await;
    let handoffs = format!("{}/v1/accounts/acme/handoffs", story.servers[0].endpoint());
    let body = |n: u32| {
        json!({
            "handoffConfigId": "billing",
            "consumerPhone": format!("+1415555{n:04}"),
            "idempotencyKey": format!("limit-{n}"),
            "templateVariables": { "topic": "x", "first_name": "y" },
        })
    };
    let (status, _, _) = post(&handoffs, Some(&key), body(1)).await;
    assert_eq!(status, 200);
    let (status, error, headers) = post(&handoffs, Some(&key), body(2)).await;
    assert_eq!(
        (status, error["status"].as_str()),
        (429, Some("RESOURCE_EXHAUSTED"))
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        error["details"][0]["@type"],
        "type.googleapis.com/google.rpc.RetryInfo"
    );
    story.stop().await;
}
