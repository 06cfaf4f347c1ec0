//! The handoff hot path under contention: concurrent duplicates send once, one consumer gets one
//! message, an idempotency key cannot be reused for another request, and each handoff costs
//! exactly one Redis round trip.

use std::time::Duration;

use c2m_proto::v1::HandoffStatus;
use c2m_test_support::{RedisServer, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

use crate::story::{Options, Story, Topology, authed, handoff_request, onboard};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_send_once_and_all_learn_the_same_handoff() {
    concurrent_duplicates(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_concurrent_duplicates_send_once_and_all_learn_the_same_handoff() {
    concurrent_duplicates(Options::without_redis()).await;
}

async fn concurrent_duplicates(options: Options) {
    let story = Story::start_with(Topology::Dev, options).await;
    let key = onboard(&story, "acme").await;
    let handoff = story.handoff().await;
    let calls = (0..8).map(|_| {
        let mut client = handoff.clone();
        let key = key.clone();
        async move {
            // An IVR retries ABORTED after the delay the error carries.
            loop {
                match client
                    .create_handoff(authed(
                        handoff_request("acme", "+14155550150", "dup-1"),
                        &key,
                    ))
                    .await
                {
                    Ok(answer) => return answer.into_inner().handoff.expect("handoff"),
                    Err(status) if status.code() == Code::Aborted => {
                        let wait = status
                            .get_details_retry_info()
                            .and_then(|r| r.retry_delay)
                            .expect("ABORTED carries RetryInfo");
                        tokio::time::sleep(wait).await;
                    }
                    Err(status) => panic!("unexpected {status:?}"),
                }
            }
        }
    });
    let answers = futures::future::join_all(calls).await;
    // On a failure, what went and what each caller heard: which handoff, message id (in the
    // status callback) and trace each message belongs to.
    let sent = story.twilio.sent();
    assert_eq!(
        sent.len(),
        1,
        "exactly one message: sent {sent:#?}, answers {:?}",
        answers
            .iter()
            .map(|h| (&h.handoff_id, h.status))
            .collect::<Vec<_>>()
    );
    assert!(
        answers
            .iter()
            .all(|h| h.handoff_id == answers[0].handoff_id)
    );
    assert!(
        answers
            .iter()
            .all(|h| h.status == HandoffStatus::Sent as i32)
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_consumer_called_twice_at_once_gets_one_message() {
    one_consumer_twice(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_one_consumer_called_twice_at_once_gets_one_message() {
    one_consumer_twice(Options::without_redis()).await;
}

/// The embedded default (SQLite files, no Redis): duplicates, one consumer twice, and the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_concurrent_duplicates_send_once_and_all_learn_the_same_handoff() {
    let dir = tempfile::tempdir().expect("a data directory");
    concurrent_duplicates(Options::embedded(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_one_consumer_called_twice_at_once_gets_one_message() {
    let dir = tempfile::tempdir().expect("a data directory");
    one_consumer_twice(Options::embedded(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_forty_callers_at_once_under_a_limit_of_thirty_send_thirty() {
    let dir = tempfile::tempdir().expect("a data directory");
    forty_callers_under_thirty(Options::embedded(dir.path())).await;
}

/// `c2m dev` with no Redis: 40 callers of one account at once, under its limit of 30 a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_forty_callers_at_once_under_a_limit_of_thirty_send_thirty() {
    forty_callers_under_thirty(Options::without_redis()).await;
}

async fn forty_callers_under_thirty(options: Options) {
    let story = Story::start_with(Topology::Dev, options).await;
    let key = onboard(&story, "acme").await;
    let handoff = story.handoff().await;
    let calls = (0..40).map(|i| {
        let mut client = handoff.clone();
        let request = handoff_request(
            "acme",
            &format!("+1415555{:04}", 3000 + i),
            &format!("burst-{i}"),
        );
        let key = key.clone();
        async move { client.create_handoff(authed(request, &key)).await }
    });
    let results = futures::future::join_all(calls).await;
    let limited: Vec<&tonic::Status> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(limited.len(), 10, "{limited:?}");
    assert!(limited.iter().all(|s| s.code() == Code::ResourceExhausted));
    assert_eq!(story.twilio.sent().len(), 30, "only admitted handoffs send");
    story.stop().await;
}

async fn one_consumer_twice(options: Options) {
    let story = Story::start_with(Topology::Dev, options).await;
    let key = onboard(&story, "acme").await;
    let handoff = story.handoff().await;
    let calls = ["ivr-a", "ivr-b"].map(|idempotency_key| {
        let mut client = handoff.clone();
        let key = key.clone();
        async move {
            client
                .create_handoff(authed(
                    handoff_request("acme", "+14155550160", idempotency_key),
                    &key,
                ))
                .await
                .expect("answered")
                .into_inner()
                .handoff
                .expect("handoff")
        }
    });
    let [a, b] = futures::future::join_all(calls)
        .await
        .try_into()
        .expect("two answers");
    assert_eq!(story.twilio.sent().len(), 1, "one consumer, one message");
    let (sent, skipped) = if a.status == HandoffStatus::Sent as i32 {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(sent.status, HandoffStatus::Sent as i32);
    assert_eq!(skipped.status, HandoffStatus::SkippedRecentHandoff as i32);
    assert_eq!(skipped.duplicate_of, sent.handoff_id);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_for_another_request_is_refused_naming_it() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;
    handoff
        .create_handoff(authed(
            handoff_request("acme", "+14155550170", "reused"),
            &key,
        ))
        .await
        .expect("first");
    let mut other = handoff_request("acme", "+14155550171", "reused");
    other
        .template_variables
        .insert("topic".into(), "your order".into());
    let refused = handoff
        .create_handoff(authed(other, &key))
        .await
        .expect_err("another request under the same key");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let violations = refused
        .get_details_bad_request()
        .expect("details")
        .field_violations;
    assert_eq!(violations[0].field, "idempotency_key");
    assert_eq!(story.twilio.sent().len(), 1);
    story.stop().await;
}

/// Every command clients send to a Redis server, as MONITOR shows them (commands a script runs
/// inside Redis are marked `lua` and left out).
struct Monitor {
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    _task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    async fn start(port: u16) -> Self {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connects");
        stream.write_all(b"MONITOR\r\n").await.expect("writes");
        let mut reader = BufReader::new(stream);
        let mut ok = String::new();
        reader.read_line(&mut ok).await.expect("reads");
        assert_eq!(ok.trim(), "+OK");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut line = String::new();
            while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                if !line.contains("[0 lua]") && tx.send(line.trim().to_owned()).is_err() {
                    return;
                }
                line.clear();
            }
        });
        Self { lines, _task: task }
    }

    /// The client commands (names, lowercased; health probes left out) seen before `sentinel`
    /// arrives. Redis shows commands in the order it runs them, so once the sentinel is seen,
    /// everything sent before it has been too.
    async fn commands_before(&mut self, sentinel: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(10), self.lines.recv())
                .await
                .expect("the sentinel shows up within 10 s")
                .expect("monitor open");
            if line.contains(sentinel) {
                return seen;
            }
            // +1700000000.123456 [0 127.0.0.1:40000] "evalsha" "…" …
            let command = line
                .split(']')
                .nth(1)
                .and_then(|rest| rest.trim().split('"').nth(1))
                .unwrap_or_default()
                .to_lowercase();
            if command != "ping" {
                seen.push(command);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_costs_exactly_one_redis_round_trip() {
    let redis = RedisServer::start();
    let story = Story::start_with(
        Topology::Dev,
        Options {
            redis_url: Some(redis.url()),
            ..Options::default()
        },
    )
    .await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;
    // The first handoff loads the script (EVALSHA, NOSCRIPT, then EVAL).
    handoff
        .create_handoff(authed(
            handoff_request("acme", "+14155550180", "warm"),
            &key,
        ))
        .await
        .expect("warm-up");

    let mut monitor = Monitor::start(redis.port()).await;
    for i in 0..5 {
        let answer = handoff
            .create_handoff(authed(
                handoff_request("acme", &format!("+1415555019{i}"), &format!("rt-{i}")),
                &key,
            ))
            .await
            .expect("handoff")
            .into_inner()
            .handoff
            .expect("handoff");
        assert_eq!(answer.status, HandoffStatus::Sent as i32);
    }
    let client = redis::Client::open(redis.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects");
    let _: String = redis::cmd("ECHO")
        .arg("c2m-sentinel")
        .query_async(&mut connection)
        .await
        .expect("echo");
    let commands = monitor.commands_before("c2m-sentinel").await;
    assert_eq!(
        commands,
        vec!["evalsha"; 5],
        "client commands for five handoffs"
    );
    story.stop().await;
    drop(redis);
}

/// 40 simultaneous handoffs for 40 consumers of one account (numbered from `first`); (admitted,
/// limited).
pub(crate) async fn burst(
    client: &c2m_proto::v1::handoff_service_client::HandoffServiceClient<tonic::transport::Channel>,
    account_id: &str,
    key: &str,
    (tag, first): (&str, usize),
) -> (usize, usize) {
    let calls = (first..first + 40).map(|i| {
        let mut client = client.clone();
        let request = handoff_request(
            account_id,
            &format!("+1415666{i:04}"),
            &format!("{tag}-{i}"),
        );
        let key = key.to_owned();
        async move { client.create_handoff(authed(request, &key)).await }
    });
    let results = futures::future::join_all(calls).await;
    let limited = results
        .iter()
        .filter(|r| {
            r.as_ref()
                .is_err_and(|s| s.code() == Code::ResourceExhausted)
        })
        .count();
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        admitted + limited,
        40,
        "{:?}",
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .collect::<Vec<_>>()
    );
    (admitted, limited)
}

/// `c2m_handoffs_total` in `/metrics`: every answer, the refusals over the limit, the SMS sent.
fn handoff_counts(text: &str) -> (u64, u64, u64) {
    let count = |series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let answers: u64 = text
        .lines()
        .filter(|l| l.starts_with("c2m_handoffs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    (
        answers,
        count("c2m_handoffs_total{status=\"ResourceExhausted\",channel=\"\"}"),
        count("c2m_handoffs_total{status=\"HANDOFF_STATUS_SENT\",channel=\"CHANNEL_SMS\"}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_handoffs_go_on_within_the_replica_share_and_exact_limits_return() {
    let redis = RedisServer::start();
    let port = redis.port();
    let story = Story::start_with(
        Topology::Dev,
        Options {
            redis_url: Some(redis.url()),
            handoff_replicas: Some(2),
            ..Options::default()
        },
    )
    .await;
    let acme = onboard(&story, "acme").await;
    let globex = onboard(&story, "globex").await;
    let handoff = story.handoff().await;
    let channel = crate::grpc::channel(&story.servers[0].endpoint()).await;
    crate::grpc::wait_for_status(
        &channel,
        &["c2m.v1.HandoffService/redis"],
        ServingStatus::Serving,
    )
    .await;

    // The metrics are the process's, which other tests may share (`cargo test` runs them on
    // threads of one process): what this test adds is counted from here, and at least.
    let before = handoff_counts(&story.metrics().await);
    redis.stop();
    // Served on, from this replica's memory: half of acme's 30 per second, as one of two replicas.
    assert_eq!(burst(&handoff, "acme", &acme, ("down", 0)).await, (15, 25));
    crate::grpc::wait_for_status(
        &channel,
        &["c2m.v1.HandoffService/redis"],
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(
        crate::grpc::health(&channel, "c2m.v1.HandoffService").await,
        ServingStatus::Serving
    );
    // The metrics say so too.
    let metrics = || story.metrics();
    assert!(
        metrics()
            .await
            .contains("c2m_redis_degraded{service=\"handoff\"} 1\n"),
        "degraded while redis is down"
    );

    // Redis returns (empty: it keeps nothing on disk). Once a decision is made there again...
    let redis = RedisServer::start_on(port);
    crate::grpc::wait_for_status(
        &channel,
        &["c2m.v1.HandoffService/redis"],
        ServingStatus::Serving,
    )
    .await;
    let client = redis::Client::open(redis.url()).expect("url");
    let connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects");
    let rate_key = format!("{}:{{acme}}:rl", story.redis.prefix());
    let mut probe = 0;
    eventually(
        "a handoff decided by redis again",
        Duration::from_secs(5),
        || {
            probe += 1;
            let mut handoff = handoff.clone();
            let request = handoff_request(
                "acme",
                &format!("+1415777{probe:04}"),
                &format!("probe-{probe}"),
            );
            let key = acme.clone();
            let mut connection = connection.clone();
            let rate_key = rate_key.clone();
            async move {
                let _ = handoff.create_handoff(authed(request, &key)).await;
                redis::cmd("EXISTS")
                    .arg(&rate_key)
                    .query_async::<bool>(&mut connection)
                    .await
                    .unwrap_or(false)
            }
        },
    )
    .await;
    // ...the limit is the account's whole limit again, exact across replicas.
    assert_eq!(
        burst(&handoff, "globex", &globex, ("back", 0)).await,
        (30, 10)
    );
    let text = metrics().await;
    assert!(
        text.contains("c2m_redis_degraded{service=\"handoff\"} 0\n"),
        "{text}"
    );
    // Every answer counted: two bursts of 40 and the probes, 15 + 30 of the bursts sent and
    // 25 + 10 refused (a probe may be either).
    let after = handoff_counts(&text);
    let (answers, refused, sent) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    assert!(answers >= 80 + probe, "{answers} answers counted: {text}");
    assert!(
        refused >= 35 && sent >= 45,
        "{refused} refused, {sent} sent: {text}"
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_sends_nothing_and_counts_what_it_should() {
    use c2m_proto::v1 as pb;

    use crate::story::funnel;

    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;

    // Twilio refuses the number (21610: the recipient replied STOP): the handoff fails, counted
    // with Twilio's code.
    story
        .twilio
        .refuse_next(400, 21610, "Attempt to send to unsubscribed recipient");
    let failed = story
        .deflect(handoff_request("acme", "+14155550201", "r-1"), &key)
        .await;
    assert_eq!(failed.status, HandoffStatus::Failed as i32);
    assert_eq!(failed.attempts.len(), 1);
    assert_eq!(failed.attempts[0].error_code, "21610");

    // A template variable missing: refused before anything is sent or counted.
    let mut missing = handoff_request("acme", "+14155550202", "r-2");
    missing.template_variables.clear();
    let refused = handoff
        .create_handoff(authed(missing, &key))
        .await
        .expect_err("missing variable");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused
            .get_details_bad_request()
            .expect("details")
            .field_violations[0]
            .field,
        "template_variables[topic]"
    );

    // An unknown configuration: NOT_FOUND.
    let mut unknown = handoff_request("acme", "+14155550203", "r-3");
    unknown.handoff_config_id = "nope".into();
    let refused = handoff
        .create_handoff(authed(unknown, &key))
        .await
        .expect_err("unknown configuration");
    assert_eq!(refused.code(), Code::NotFound);

    // Deflection switched off for the account: FAILED_PRECONDITION (after Handoff's 5 s cache, so a
    // fresh account is used).
    let globex = onboard(&story, "globex").await;
    story
        .set_settings(
            "globex",
            pb::AccountSettings {
                deflection_enabled: false,
                ..Default::default()
            },
        )
        .await;
    let refused = handoff
        .create_handoff(authed(
            handoff_request("globex", "+14155550204", "r-4"),
            &globex,
        ))
        .await
        .expect_err("disabled account");
    assert_eq!(refused.code(), Code::FailedPrecondition);

    assert!(story.twilio.sent().is_empty(), "nothing was sent");
    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 1),
                    ("FUNNEL_STAGE_FAILED", 1),
                    // Twilio's 21610 also records the opt-out.
                    ("FUNNEL_STAGE_OPTED_OUT", 1),
                ],
            )],
        )
        .await;
    assert!(funnel(&story, "globex").await.is_empty());
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_holds_neither_its_key_nor_its_consumer() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;

    // Refused after the gate admitted it (a template variable is missing), then corrected and
    // sent again at once under the same key: a new request, not one "still in progress".
    let corrected = handoff_request("acme", "+14155550211", "fix-1");
    let mut missing = corrected.clone();
    missing.template_variables.clear();
    let refused = handoff
        .create_handoff(authed(missing, &key))
        .await
        .expect_err("missing variable");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let sent = story.deflect(corrected, &key).await;
    assert_eq!(sent.status, HandoffStatus::Sent as i32);

    // Refused for an unknown configuration, then deflected under another key: the consumer is
    // not skipped in favour of the refused request, which never became a handoff.
    let mut unknown = handoff_request("acme", "+14155550212", "fix-2");
    unknown.handoff_config_id = "nope".into();
    let refused = handoff
        .create_handoff(authed(unknown, &key))
        .await
        .expect_err("unknown configuration");
    assert_eq!(refused.code(), Code::NotFound);
    let sent = story
        .deflect(handoff_request("acme", "+14155550212", "fix-3"), &key)
        .await;
    assert_eq!(sent.status, HandoffStatus::Sent as i32);
    assert!(sent.duplicate_of.is_empty());

    let to: Vec<String> = story
        .twilio
        .sent()
        .iter()
        .map(|m| m.field("To").to_owned())
        .collect();
    assert_eq!(to, ["+14155550211", "+14155550212"]);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_redis_forgot_its_key_is_answered_from_the_record_and_holds_nothing() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let request = handoff_request("acme", "+14155550221", "late-1");
    let first = story.deflect(request.clone(), &key).await;
    assert_eq!(first.status, HandoffStatus::Sent as i32);

    // Redis keeps a claim for a minute and a lease for seconds, PostgreSQL the record for a day:
    // the IVR retries once both are gone (removed here rather than waited for).
    let claim = format!("{}:{{acme}}:idem:late-1", story.redis.prefix());
    let lease = format!("{}:{{acme}}:lease:+14155550221", story.redis.prefix());
    let client = redis::Client::open(story.redis.url()).expect("url");
    let mut redis = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let removed: u32 = redis::cmd("DEL")
        .arg(&claim)
        .arg(&lease)
        .query_async(&mut redis)
        .await
        .expect("del");
    assert_eq!(removed, 2, "the first handoff's claim and lease were there");

    let again = story.deflect(request, &key).await;
    assert_eq!(again.handoff_id, first.handoff_id, "the original answer");
    assert_eq!(story.twilio.sent().len(), 1, "nothing sent again");
    // The gate admitted the retry while the record was looked up; what it took is given back.
    let left: u32 = redis::cmd("EXISTS")
        .arg(&claim)
        .arg(&lease)
        .query_async(&mut redis)
        .await
        .expect("exists");
    assert_eq!(
        left, 0,
        "no claim or lease left for a handoff that never was"
    );
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ivr_that_stops_waiting_mid_send_finds_the_handoff_on_retry() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;
    let request = handoff_request("acme", "+14155550231", "slow-1");

    // Twilio takes its time over the send; the IVR gives up after 300 ms.
    let hold = story.twilio.hold_next();
    let mut impatient = authed(request.clone(), &key);
    impatient.set_timeout(Duration::from_millis(300));
    let gave_up = handoff
        .create_handoff(impatient)
        .await
        .expect_err("the IVR stopped waiting");
    assert!(
        matches!(gave_up.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{gave_up}"
    );
    eventually(
        "the send reaches Twilio",
        Duration::from_secs(10),
        || async { story.twilio.requests() == 1 },
    )
    .await;
    hold.release();

    // The IVR retries under the same key until the handoff is recorded: it gets the one that was
    // sent, and no second message.
    let answer = std::sync::Mutex::new(None);
    eventually("the retry is answered", Duration::from_secs(10), || async {
        match handoff
            .clone()
            .create_handoff(authed(request.clone(), &key))
            .await
        {
            Ok(response) => {
                *answer.lock().expect("answer") = response.into_inner().handoff;
                true
            }
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Aborted,
                    "in progress, or done: {status}"
                );
                false
            }
        }
    })
    .await;
    let answer = answer.into_inner().expect("answer").expect("a handoff");
    assert_eq!(answer.status, HandoffStatus::Sent as i32);
    assert_eq!(story.twilio.sent().len(), 1, "one message");
    assert_eq!(story.twilio.requests(), 1, "one send");
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_a_handoff_its_ivr_gave_up_on_finish_and_record_itself() {
    let mut story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut handoff = story.handoff().await;

    // The IVR gives up while Twilio holds the send...
    let hold = story.twilio.hold_next();
    let mut impatient = authed(handoff_request("acme", "+14155550232", "slow-2"), &key);
    impatient.set_timeout(Duration::from_millis(300));
    handoff
        .create_handoff(impatient)
        .await
        .expect_err("the IVR stopped waiting");
    eventually(
        "the send reaches Twilio",
        Duration::from_secs(10),
        || async { story.twilio.requests() == 1 },
    )
    .await;

    // ...and the process is told to stop: with no request in flight, it still waits for the
    // handoff, which would otherwise be cut off with its message sent and nothing recorded.
    let server = story.servers.pop().expect("the dev server");
    let mut stopping = tokio::spawn(server.stop());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut stopping)
            .await
            .is_err(),
        "stopped with the handoff still running"
    );
    hold.release();
    stopping.await.expect("joins").expect("drains cleanly");
    let db = sqlx::PgPool::connect(story.db.url()).await.expect("pool");
    let recorded: Vec<(String, String)> = sqlx::query_as(
        "SELECT h.status, h.channel FROM handoff.handoffs h \
         JOIN handoff.idempotency_keys k USING (handoff_id) WHERE k.idempotency_key = 'slow-2'",
    )
    .fetch_all(&db)
    .await
    .expect("handoffs");
    assert_eq!(
        recorded,
        [("HANDOFF_STATUS_SENT".to_owned(), "CHANNEL_SMS".to_owned())]
    );
    assert_eq!(story.twilio.sent().len(), 1);
    db.close().await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_postgresql_refused_to_save_is_saved_once_it_can() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    let mut db = story.db.connect().await;

    // PostgreSQL refuses Handoff's save for a while (a table it writes is gone), after the
    // message has gone out.
    sqlx::query("ALTER TABLE handoff.deflection_outbox RENAME TO deflection_outbox_away")
        .execute(&mut db)
        .await
        .expect("rename");
    let mut handoff = story.handoff().await;
    let call = tokio::spawn(async move {
        handoff
            .create_handoff(authed(
                handoff_request("acme", "+14155550241", "pg-away-1"),
                &key,
            ))
            .await
    });
    eventually(
        "a refused save is offered again",
        Duration::from_secs(10),
        || async {
            story
                .metric("c2m_handoff_save_retries_total")
                .await
                .is_some_and(|n| n > 0.0)
        },
    )
    .await;
    assert_eq!(story.twilio.sent().len(), 1, "the message went");
    sqlx::query("ALTER TABLE handoff.deflection_outbox_away RENAME TO deflection_outbox")
        .execute(&mut db)
        .await
        .expect("rename back");

    // The IVR's call ends with the handoff, saved, and nothing sent twice.
    let answer = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call ends")
        .expect("task")
        .expect("answered")
        .into_inner()
        .handoff
        .expect("a handoff");
    assert_eq!(answer.status, HandoffStatus::Sent as i32);
    let saved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM handoff.handoffs WHERE handoff_id = $1")
            .bind(&answer.handoff_id)
            .fetch_one(&mut db)
            .await
            .expect("count");
    assert_eq!(saved, 1);
    assert_eq!(story.twilio.sent().len(), 1);
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_landline_check_on_a_landline_is_refused_and_lookups_are_spared() {
    use c2m_proto::v1::{self as pb, IneligibilityReason};

    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    story
        .set_settings(
            "acme",
            pb::AccountSettings {
                deflection_enabled: true,
                landline_check_enabled: true,
                ..Default::default()
            },
        )
        .await;
    story.twilio.set_line_type("+14155550601", "landline");

    let refused = story
        .deflect(handoff_request("acme", "+14155550601", "l-1"), &key)
        .await;
    assert_eq!(refused.status, HandoffStatus::RejectedLandline as i32);
    assert!(story.twilio.sent().is_empty());

    let check = |phone: &'static str| story.eligibility("acme", phone, &key);
    let landline = check("+14155550601").await;
    assert!(!landline.eligible);
    assert_eq!(
        landline.channels[0].reason,
        IneligibilityReason::Landline as i32
    );
    // A US number needs Lookup once; the answer is reused.
    assert!(check("+14155550602").await.eligible);
    assert!(check("+14155550602").await.eligible);
    // A UK mobile is known from the numbering plan alone.
    assert!(check("+447400123456").await.eligible);
    assert_eq!(story.twilio.lookups(), ["+14155550601", "+14155550602"]);

    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 1),
                    ("FUNNEL_STAGE_REJECTED_LANDLINE", 1),
                ],
            )],
        )
        .await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_who_said_stop_is_not_messaged_there_again() {
    use c2m_proto::v1::IneligibilityReason;

    use crate::story::{BRAND_NUMBER, TWILIO_SID};

    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;

    // The consumer texts STOP (any case).
    let (status, _) = story
        .twilio
        .send_inbound(
            &format!("{}/webhooks/twilio/acme/inbound", story.webhooks),
            TWILIO_SID,
            "+14155550701",
            BRAND_NUMBER,
            "Stop",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let refused = story
        .deflect(handoff_request("acme", "+14155550701", "s-1"), &key)
        .await;
    assert_eq!(refused.status, HandoffStatus::RejectedOptedOut as i32);

    // Twilio refusing a number with 21610 (it said STOP to this sender) records the same.
    story
        .twilio
        .refuse_next(400, 21610, "Attempt to send to unsubscribed recipient");
    let failed = story
        .deflect(handoff_request("acme", "+14155550702", "s-2"), &key)
        .await;
    assert_eq!(failed.status, HandoffStatus::Failed as i32);
    let answer = story.eligibility("acme", "+14155550702", &key).await;
    assert!(!answer.eligible);
    assert_eq!(
        answer.channels[0].reason,
        IneligibilityReason::OptedOut as i32
    );
    assert!(story.twilio.sent().is_empty());

    story
        .await_funnel(
            "acme",
            &[(
                "CHANNEL_SMS",
                &[
                    ("FUNNEL_STAGE_ATTEMPTED", 2),
                    ("FUNNEL_STAGE_FAILED", 1),
                    ("FUNNEL_STAGE_OPTED_OUT", 2),
                    ("FUNNEL_STAGE_REJECTED_OPTED_OUT", 1),
                ],
            )],
        )
        .await;
    story.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_says_too_many_requests_is_retried_after_the_wait_it_asks() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;

    // Twilio throttles twice (Retry-After: 0), then takes the message.
    story.twilio.throttle_next(2, "0");
    let sent = story
        .deflect(handoff_request("acme", "+14155550801", "t-1"), &key)
        .await;
    assert_eq!(sent.status, HandoffStatus::Sent as i32);
    assert_eq!((story.twilio.requests(), story.twilio.sent().len()), (3, 1));

    // Throttled past the retries: the attempt fails with Twilio's code, nothing is sent.
    story.twilio.throttle_next(3, "0");
    let failed = story
        .deflect(handoff_request("acme", "+14155550802", "t-2"), &key)
        .await;
    assert_eq!(failed.status, HandoffStatus::Failed as i32);
    assert_eq!(failed.attempts[0].error_code, "20429");
    assert_eq!((story.twilio.requests(), story.twilio.sent().len()), (6, 1));
    story.stop().await;
}

/// Providers answer with codes of their own, thousands of them: none becomes a metric label.
/// Each refusal is counted as `failed` (its code stays on the attempt), and `/metrics` holds no
/// more series than its labels' fixed values allow, however many codes come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_error_codes_never_become_metric_labels() {
    let story = Story::start(Topology::Dev).await;
    let key = onboard(&story, "acme").await;
    // Twenty codes spread over Twilio's range, one per handoff.
    let codes: Vec<u32> = (0..20u32).map(|i| 20_000 + (i * 7_919) % 70_000).collect();
    for (i, code) in codes.iter().enumerate() {
        story
            .twilio
            .refuse_next(400, *code, "a refusal with a code of its own");
        let phone = format!("+1415555{:04}", 3000 + i);
        let failed = story
            .deflect(handoff_request("acme", &phone, &format!("fuzz-{i}")), &key)
            .await;
        assert_eq!(failed.status, HandoffStatus::Failed as i32);
        assert_eq!(failed.attempts[0].error_code, code.to_string());
    }
    let text = story.metrics().await;
    for code in &codes {
        assert!(
            !text.contains(&format!("\"{code}\"")),
            "{code} became a label value: {text}"
        );
    }
    let sends: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("c2m_provider_sends_total{"))
        .collect();
    assert!(
        sends.iter().all(|l| ["accepted", "failed", "unconfirmed"]
            .iter()
            .any(|o| l.contains(&format!("outcome=\"{o}\"")))),
        "{sends:?}"
    );
    // Five channels, three outcomes at most.
    assert!(!sends.is_empty() && sends.len() <= 15, "{sends:?}");
    let failed: u64 = sends
        .iter()
        .filter(|l| l.contains("outcome=\"failed\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(failed >= codes.len() as u64, "{sends:?}");
    // The RPC layer counted every answer, by method and code.
    let created: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with(
                "c2m_rpc_requests_total{service=\"c2m.v1.HandoffService\",method=\"CreateHandoff\"",
            )
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(created >= codes.len() as u64, "{text}");
    story.stop().await;
}
