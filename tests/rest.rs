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
        "/../proto/openapi.json"
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
    // The same reason a gRPC client gets, for an IVR to act on.
    let info = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo")
        .unwrap_or_else(|| panic!("no ErrorInfo in {error}"));
    assert_eq!(
        (info["reason"].as_str(), info["metadata"]["limit"].as_str()),
        (Some("RATE_LIMITED"), Some("1"))
    );
    story.stop().await;
}

/// A desk that speaks HTTP only answers through the conversation routes: it lists what is open,
/// claims, reads the transcript, answers the consumer (once, however often it retries), and
/// closes; its mistakes come back as JSON errors naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desk_answers_a_conversation_over_rest() {
    use crate::story::agent;

    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let consumer = "+14155550191";
    story
        .deflect(
            crate::story::handoff_request("acme", consumer, "rest-desk"),
            &key,
        )
        .await;
    story.sms_to_acme(consumer, "Hello?").await;
    let base = format!("{}/v1/accounts/acme", story.servers[0].endpoint());
    let desk = agent("acme", "desk-bot", &[]);
    let get = |url: String| {
        let desk = desk.clone();
        async move {
            let response = reqwest::Client::new()
                .get(url)
                .bearer_auth(desk)
                .send()
                .await
                .expect("http");
            (
                response.status().as_u16(),
                response.json::<Value>().await.expect("json"),
            )
        }
    };

    let (status, open) = get(format!(
        "{base}/conversations?state=CONVERSATION_STATE_OPEN&consumerPhone=%2B14155550191&pageSize=10"
    ))
    .await;
    assert_eq!(status, 200, "{open}");
    let id = open["conversations"][0]["conversationId"]
        .as_str()
        .expect("one open conversation")
        .to_owned();
    let conversation = format!("{base}/conversations/{id}");

    let (status, claimed, _) =
        post(&format!("{conversation}/assign"), Some(&desk), json!({})).await;
    assert_eq!(status, 200, "{claimed}");
    assert_eq!(claimed["conversation"]["assignee"], "desk-bot");
    let other = agent("acme", "agent-bob", &[]);
    let (status, taken, _) = post(&format!("{conversation}/assign"), Some(&other), json!({})).await;
    assert_eq!((status, taken["status"].as_str()), (409, Some("ABORTED")));

    let answer = json!({ "clientMessageId": "desk-1", "text": "Hi, how can we help?" });
    for _ in 0..2 {
        let (status, sent, _) = post(
            &format!("{conversation}/messages"),
            Some(&desk),
            answer.clone(),
        )
        .await;
        assert_eq!(status, 200, "{sent}");
        assert_eq!(sent["entry"]["stage"], "FUNNEL_STAGE_SENT");
    }
    let answers = story
        .twilio
        .sent()
        .into_iter()
        .filter(|sms| sms.field("Body") == "Hi, how can we help?")
        .count();
    assert_eq!(answers, 1, "one SMS however often the desk retries");
    let (status, read) = get(conversation.clone()).await;
    assert_eq!(status, 200);
    let authors: Vec<&str> = read["conversation"]["transcript"]
        .as_array()
        .expect("transcript")
        .iter()
        .map(|e| e["author"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(authors, ["deflection", "consumer", "desk-bot"]);

    let (status, error, _) = post(
        &format!("{conversation}/messages"),
        Some(&desk),
        json!({ "clientMessageId": "desk-2", "text": "x".repeat(1601) }),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(error["details"][0]["fieldViolations"][0]["field"], "text");
    let (status, error, _) = post(
        &format!("{conversation}/close"),
        Some(&desk),
        json!({ "conversationId": "conv_someone_else" }),
    )
    .await;
    assert_eq!(status, 400, "the path's id wins over the body's: {error}");

    let (status, closed, _) = post(
        &format!("{conversation}/close"),
        Some(&desk),
        json!({ "reason": "answered" }),
    )
    .await;
    assert_eq!(status, 200, "{closed}");
    assert_eq!(closed["conversation"]["state"], "CONVERSATION_STATE_CLOSED");
    let (status, _) = get(format!("{base}/consent-changes")).await;
    assert_eq!(status, 200);
    story.stop().await;
}
