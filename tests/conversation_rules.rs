//! The rules around conversations: who may do what (accounts, skills, roles, API key scopes,
//! revocation), bad input named by field, the consent keywords and their record, and how far
//! back the conversation log keeps events.

use std::time::Duration;

use c2m_proto::v1::{self as pb, Channel, FunnelStage};
use c2m_runtime::auth::Role as AuthRole;
use c2m_test_support::{eventually, eventually_eq};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    conversations::{
        CONSUMER, SKILL, assign, conversation, deflect_and_reply, next, reply, send, watch,
    },
    story::{
        BRAND_NUMBER, Options, Story, Topology, agent, authed, handoff_request, onboard, token,
    },
};

/// Who may do what: another account's agent sees nothing; an agent limited to other skills sees
/// nothing of this one; a viewer reads but cannot answer; nobody without a token gets anything.
#[tokio::test]
async fn agents_see_only_their_accounts_and_skills_and_viewers_only_read() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let id = deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let list = |credential: &str| {
        let request = authed(
            pb::ListConversationsRequest {
                account_id: "acme".into(),
                ..Default::default()
            },
            credential,
        );
        let story = &story;
        async move {
            story
                .conversations()
                .await
                .list_conversations(request)
                .await
                .map(|r| r.into_inner().conversations)
        }
    };

    let outsider = agent("globex", "agent-gil", &[]);
    assert_eq!(
        list(&outsider).await.expect_err("denied").code(),
        Code::PermissionDenied
    );
    assert_eq!(
        conversation(&story, &outsider, &id)
            .await
            .expect_err("denied")
            .code(),
        Code::PermissionDenied
    );
    let other_admin = token(AuthRole::Admin, Some("globex"));
    assert_eq!(
        send(&story, &other_admin, reply(&id, "x", "hi"))
            .await
            .expect_err("denied")
            .code(),
        Code::PermissionDenied
    );

    let sales = agent("acme", "agent-sam", &["sales"]);
    assert!(
        list(&sales).await.expect("lists").is_empty(),
        "none of sales' skill"
    );
    assert_eq!(
        conversation(&story, &sales, &id)
            .await
            .expect_err("hidden")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        assign(&story, &sales, &id)
            .await
            .expect_err("hidden")
            .code(),
        Code::NotFound
    );
    let watching_billing = story
        .conversations()
        .await
        .watch_conversations(authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                skill_ids: vec![SKILL.into()],
                cursor: String::new(),
                since: None,
            },
            &sales,
        ))
        .await
        .expect_err("not one of its skills");
    assert_eq!(watching_billing.code(), Code::InvalidArgument);
    assert_eq!(
        watching_billing
            .get_details_bad_request()
            .expect("field")
            .field_violations[0]
            .field,
        "skill_ids[0]"
    );

    let viewer = token(AuthRole::Viewer, Some("acme"));
    let listed = list(&viewer).await.expect("a viewer reads");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].conversation_id, id);
    assert!(
        listed[0].transcript.is_empty(),
        "listings carry no transcripts"
    );
    let denied = send(&story, &viewer, reply(&id, "v-1", "hello")).await;
    assert_eq!(
        denied.expect_err("a viewer cannot answer").code(),
        Code::PermissionDenied
    );
    assert_eq!(
        assign(&story, &viewer, &id)
            .await
            .expect_err("nor claim")
            .code(),
        Code::PermissionDenied
    );
    // An agent cannot hand a conversation to someone else.
    let ada = agent("acme", "agent-ada", &[]);
    let handed = story
        .conversations()
        .await
        .assign_conversation(authed(
            pb::AssignConversationRequest {
                account_id: "acme".into(),
                conversation_id: id.clone(),
                assignee: "agent-bob".into(),
                from_assignee: String::new(),
            },
            &ada,
        ))
        .await;
    assert_eq!(
        handed.expect_err("supervisors only").code(),
        Code::PermissionDenied
    );
    // Agents read no configuration.
    let settings = story
        .config()
        .await
        .get_account(authed(
            pb::GetAccountRequest {
                account_id: "acme".into(),
            },
            &ada,
        ))
        .await;
    assert_eq!(
        settings.expect_err("not an agent's").code(),
        Code::PermissionDenied
    );

    let anonymous = story
        .conversations()
        .await
        .list_conversations(pb::ListConversationsRequest {
            account_id: "acme".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        anonymous.expect_err("no token").code(),
        Code::Unauthenticated
    );

    // Bad input names its field.
    let long = send(&story, &ada, reply(&id, &"x".repeat(65), "hi"))
        .await
        .expect_err("too long");
    assert_eq!(long.code(), Code::InvalidArgument);
    assert_eq!(
        long.get_details_bad_request()
            .expect("field")
            .field_violations[0]
            .field,
        "client_message_id"
    );
    let plain_link = pb::SendConversationMessageRequest {
        media_urls: vec!["http://acme.example.com/a.png".into()],
        ..reply(&id, "pic", "")
    };
    let insecure = send(&story, &ada, plain_link)
        .await
        .expect_err("https only");
    assert_eq!(
        insecure
            .get_details_bad_request()
            .expect("field")
            .field_violations[0]
            .field,
        "media_urls[0]"
    );
    let huge = send(&story, &ada, reply(&id, "big", &"x".repeat(1601)))
        .await
        .expect_err("too long");
    assert_eq!(
        huge.get_details_bad_request()
            .expect("field")
            .field_violations[0]
            .field,
        "text"
    );
    story.stop().await;
}

/// The standard keywords on SMS: HELP is answered with the brand's help text, STOP keeps the
/// consumer from being deflected, START gives them back, and the account's consent record lists
/// both changes in order.
#[tokio::test]
async fn keywords_answer_help_and_opt_a_consumer_out_and_back_in_on_the_record() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            consumer_lease_ms: Some(1),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let help = "Acme billing: call 0800 123 456. Reply STOP to stop.";
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                help_text: help.into(),
                ..Default::default()
            },
        )
        .await;

    story.sms_to_acme(CONSUMER, "help").await;
    let answered: Vec<_> = story
        .twilio
        .sent()
        .into_iter()
        .filter(|sms| sms.field("Body") == help)
        .collect();
    assert_eq!(
        answered.len(),
        1,
        "HELP is answered once, before the webhook's answer"
    );
    assert_eq!(answered[0].field("To"), CONSUMER);
    assert_eq!(answered[0].field("From"), BRAND_NUMBER);

    story.sms_to_acme(CONSUMER, "STOP").await;
    let refused = story
        .deflect(handoff_request("acme", CONSUMER, "call-1"), &key)
        .await;
    assert_eq!(refused.status, pb::HandoffStatus::RejectedOptedOut as i32);
    story.sms_to_acme(CONSUMER, "Start").await;
    let sent = story
        .deflect(handoff_request("acme", CONSUMER, "call-2"), &key)
        .await;
    assert_eq!(sent.status, pb::HandoffStatus::Sent as i32);

    let changes = story
        .conversations()
        .await
        .list_consent_changes(authed(
            pb::ListConsentChangesRequest {
                account_id: "acme".into(),
                consumer_phone: CONSUMER.into(),
                ..Default::default()
            },
            &token(AuthRole::Viewer, Some("acme")),
        ))
        .await
        .expect("consent record")
        .into_inner()
        .changes;
    let record: Vec<(bool, &str, i32)> = changes
        .iter()
        .map(|c| (c.opted_in, c.source.as_str(), c.channel))
        .collect();
    assert_eq!(
        record,
        [
            (false, "keyword:STOP", Channel::Sms as i32),
            (true, "keyword:START", Channel::Sms as i32),
        ]
    );
    let count = |stage: &'static str| story.sms_stage("acme", stage);
    // The same record as a file, for the brand's records.
    let csv = reqwest::Client::new()
        .get(format!(
            "{}/v1/accounts/acme/consent-changes.csv?consumerPhone=%2B14155550301",
            story.servers[0].endpoint()
        ))
        .bearer_auth(token(AuthRole::Viewer, Some("acme")))
        .send()
        .await
        .expect("http");
    assert_eq!(csv.status(), 200);
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    let csv = csv.text().await.expect("text");
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .map(|line| line.split(',').take(4).collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["consumer_phone", "channel", "opted_in", "source"],
            vec![CONSUMER, "CHANNEL_SMS", "false", "keyword:STOP"],
            vec![CONSUMER, "CHANNEL_SMS", "true", "keyword:START"],
        ]
    );
    eventually_eq("the opt-in counted", Duration::from_secs(10), &1, || {
        count("FUNNEL_STAGE_OPTED_IN")
    })
    .await;
    assert_eq!(count("FUNNEL_STAGE_OPTED_OUT").await, 1);
    story.stop().await;
}

/// A bot or desk integration authenticates with an API key that has the conversations scope; an
/// IVR's key (handoffs) cannot read conversations, and a conversations key cannot deflect.
#[tokio::test]
async fn an_api_key_with_the_conversations_scope_answers_and_an_ivr_key_cannot() {
    let story = Story::start(Topology::Dev).await;
    let ivr_key = onboard(&story, "acme").await;
    let id = deflect_and_reply(&story, &ivr_key, CONSUMER, "call-1").await;
    let bot_key = story
        .config()
        .await
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                account_id: "acme".into(),
                name: "faq-bot".into(),
                scopes: vec![pb::ApiKeyScope::Conversations as i32],
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("a conversations key")
        .into_inner();
    let bot_key_id = bot_key.api_key.as_ref().expect("key").api_key_id.clone();
    assert_eq!(
        bot_key.api_key.expect("key").scopes,
        [pb::ApiKeyScope::Conversations as i32]
    );
    let bot = bot_key.plaintext;

    let entry = send(&story, &bot, reply(&id, "b-1", "I am the FAQ bot"))
        .await
        .expect("sent");
    assert_eq!(entry.author, "key:faq-bot");
    assert_eq!(entry.stage, FunnelStage::Sent as i32);
    let claimed = assign(&story, &bot, &id).await.expect("claimed");
    assert_eq!(claimed.assignee, "key:faq-bot");

    let refused = conversation(&story, &ivr_key, &id)
        .await
        .expect_err("an IVR's key");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let deflecting = story
        .handoff()
        .await
        .create_handoff(authed(
            handoff_request("acme", "+14155550399", "bot-call"),
            &bot,
        ))
        .await
        .expect_err("a conversations key deflects no one");
    assert_eq!(deflecting.code(), Code::PermissionDenied);
    let other = conversation(&story, &bot, "conv_unknown")
        .await
        .expect_err("none");
    assert_eq!(other.code(), Code::NotFound);
    let unknown = conversation(&story, "c2m_not_a_key", &id)
        .await
        .expect_err("unknown key");
    assert_eq!(unknown.code(), Code::Unauthenticated);

    // Revoked, the key stops working at once (Config's notice), not when its cache entry ages
    // out (30 s).
    story
        .config()
        .await
        .revoke_api_key(authed(
            pb::RevokeApiKeyRequest {
                account_id: "acme".into(),
                api_key_id: bot_key_id,
            },
            &token(AuthRole::Admin, Some("acme")),
        ))
        .await
        .expect("revoked");
    eventually(
        "the revoked key refused",
        Duration::from_secs(5),
        || async {
            conversation(&story, &bot, &id)
                .await
                .is_err_and(|status| status.code() == Code::Unauthenticated)
        },
    )
    .await;
    story.stop().await;
}

/// The log forgets events past `routing.log_retention_days`: a cursor from before them is told
/// so (OUT_OF_RANGE, CURSOR_EXPIRED) instead of getting a stream with a hole, and one just ahead
/// of the oldest kept event still resumes.
#[tokio::test]
async fn a_cursor_older_than_the_log_keeps_is_refused_naming_the_oldest_kept() {
    let story = Story::start_with(
        Topology::Dev,
        Options {
            idle_sweep_ms: Some(100),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let ada = agent("acme", "agent-ada", &[]);
    let mut stream = watch(&story, &ada, "").await;
    deflect_and_reply(&story, &key, CONSUMER, "call-1").await;
    let opened = next(&mut stream).await;
    assign(&story, &ada, &opened.conversation_id)
        .await
        .expect("claimed");
    let assigned = next(&mut stream).await;
    story.sms_to_acme(CONSUMER, "still there?").await;
    let message = next(&mut stream).await;

    // The first two events are 31 days old now; the sweep forgets them.
    let mut db = story.db.connect().await;
    sqlx::query(
        "UPDATE routing.conversation_events SET at = now() - interval '31 days' \
         WHERE account_id = 'acme' AND position <= 2",
    )
    .execute(&mut db)
    .await
    .expect("time passes");
    eventually(
        "the old events forgotten",
        Duration::from_secs(10),
        || async {
            let mut db = story.db.connect().await;
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM routing.conversation_events WHERE account_id = 'acme'",
            )
            .fetch_one(&mut db)
            .await
            .expect("count");
            left == 1
        },
    )
    .await;

    let resume = |cursor: String| {
        let request = authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                cursor,
                ..Default::default()
            },
            &ada,
        );
        let story = &story;
        async move {
            story
                .conversations()
                .await
                .watch_conversations(request)
                .await
        }
    };
    let expired = resume(opened.cursor.clone())
        .await
        .expect_err("its next event is gone");
    assert_eq!(expired.code(), Code::OutOfRange);
    let info = expired.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "CURSOR_EXPIRED");
    assert_eq!(info.metadata["oldest_kept"], "3");
    let mut resumed = resume(assigned.cursor.clone())
        .await
        .expect("nothing after it is gone")
        .into_inner();
    assert_eq!(next(&mut resumed).await, message);
    // A start `since` a time before what the log keeps begins at the oldest event kept.
    let mut from_long_ago = story
        .conversations()
        .await
        .watch_conversations(authed(
            pb::WatchConversationsRequest {
                account_id: "acme".into(),
                since: Some(c2m_proto::timestamp(
                    chrono::Utc::now() - chrono::Duration::days(60),
                )),
                ..Default::default()
            },
            &ada,
        ))
        .await
        .expect("since a time long gone")
        .into_inner();
    assert_eq!(next(&mut from_long_ago).await, message);
    story.stop().await;
}
