//! Faults on a real `c2m dev` process: killed with SIGKILL in the middle of a handoff, then
//! started again on the same PostgreSQL and Redis. Sends are counted at the provider emulator.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use c2m_proto::v1::{
    self as pb, AttemptOutcome, HandoffStatus, handoff_service_client::HandoffServiceClient,
};
use c2m_test_support::{TestDatabase, TestRedis, TwilioEmulator, eventually};
use support::{
    acme::{authed, environment, onboard, onboard_on, request, start},
    dev::Mesh,
};
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Sends `call` and waits until Twilio holds its message (the emulator never answers it), then
/// kills `server` with SIGKILL: the IVR's call breaks off.
async fn crash_while_twilio_holds(
    channel: &Channel,
    twilio: &TwilioEmulator,
    api_key: &str,
    call: pb::CreateHandoffRequest,
    server: support::dev::Dev,
) {
    twilio.stall_next();
    let mut client = HandoffServiceClient::new(channel.clone());
    let call = {
        let request = authed(call, api_key);
        tokio::spawn(async move { client.create_handoff(request).await })
    };
    eventually(
        "twilio has the message",
        Duration::from_secs(10),
        || async { twilio.sent().len() == 1 },
    )
    .await;
    server.kill9().await;
    assert!(
        call.await.expect("joins").is_err(),
        "the IVR's call broke off"
    );
}

/// The IVR's retries under one key while the answer says "retry" (or the server is away),
/// after the delay it carries, for up to 30 s.
async fn retry_until_answered(
    channel: &Channel,
    api_key: &str,
    request: pb::CreateHandoffRequest,
) -> pb::Handoff {
    answered(channel, api_key, request, &AtomicUsize::new(0)).await
}

/// [`retry_until_answered`], counting each answer that said "retry" in `refusals` as it comes.
async fn answered(
    channel: &Channel,
    api_key: &str,
    request: pb::CreateHandoffRequest,
    refusals: &AtomicUsize,
) -> pb::Handoff {
    let until = Instant::now() + Duration::from_secs(30);
    let mut client = HandoffServiceClient::new(channel.clone());
    loop {
        match client
            .create_handoff(authed(request.clone(), api_key))
            .await
        {
            Ok(answer) => return answer.into_inner().handoff.expect("handoff"),
            Err(status)
                // What a server that is away or dying answers (a broken connection reads as
                // UNKNOWN or CANCELLED), and what an unfinished handoff answers: retry, same key.
                if matches!(
                    status.code(),
                    tonic::Code::Aborted
                        | tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                ) && Instant::now() < until =>
            {
                let wait = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(Duration::from_millis(200));
                refusals.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
            Err(status) => panic!("the retry was refused: {status:?}"),
        }
    }
}

/// c2m is killed while Twilio holds a message it has taken; started again, the IVR's retry under
/// the same key finishes the handoff it started (the send unconfirmed, for Twilio's reports to
/// settle) and the consumer has one message. Before, the retry answered "in progress" naming a
/// handoff that was never saved, then sent a second message once Redis forgot the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_provider_holds_the_message_does_not_send_it_twice() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let env = environment(&twilio);
    let first = start(&db, &redis, &env).await;
    let channel = first.until_serving().await;
    let api_key = onboard(&channel, &twilio).await;
    let consumer = "+14155550800";

    crash_while_twilio_holds(
        &channel,
        &twilio,
        &api_key,
        request(consumer, "crash-1"),
        first,
    )
    .await;

    let second = start(&db, &redis, &env).await;
    let channel = second.until_serving().await;
    let handoff = retry_until_answered(&channel, &api_key, request(consumer, "crash-1")).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32],
        "the provider never answered: unconfirmed until its reports come"
    );
    assert_eq!(twilio.sent().len(), 1, "one message");

    // Retrievable, and the same answer again.
    let again = retry_until_answered(&channel, &api_key, request(consumer, "crash-1")).await;
    assert_eq!(again.handoff_id, handoff.handoff_id);
    let fetched = HandoffServiceClient::new(channel.clone())
        .get_handoff(authed(
            pb::GetHandoffRequest {
                account_id: "acme".into(),
                handoff_id: handoff.handoff_id.clone(),
            },
            &api_key,
        ))
        .await
        .expect("retrievable")
        .into_inner()
        .handoff
        .expect("handoff");
    assert_eq!(fetched.status, HandoffStatus::Sent as i32);
    assert_eq!(twilio.sent().len(), 1, "still one message");
}

/// The same crash on the embedded default: `c2m dev` with nothing configured, its data in SQLite
/// files, killed with SIGKILL while Twilio holds the message and started again on the same data
/// directory. The retry finishes the handoff the files kept, and the consumer has one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_crash_while_the_provider_holds_the_message_does_not_send_it_twice() {
    let twilio = TwilioEmulator::start().await;
    let data = tempfile::tempdir().expect("a data directory");
    let env = environment(&twilio);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = support::dev::Dev::embedded(data.path(), &env).await;
    let channel = first.until_serving().await;
    let api_key = onboard(&channel, &twilio).await;
    let consumer = "+14155550801";

    crash_while_twilio_holds(
        &channel,
        &twilio,
        &api_key,
        request(consumer, "crash-embedded"),
        first,
    )
    .await;

    let second = support::dev::Dev::embedded(data.path(), &env).await;
    let channel = second.until_serving().await;
    let handoff =
        retry_until_answered(&channel, &api_key, request(consumer, "crash-embedded")).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32],
        "the provider never answered: unconfirmed until its reports come"
    );
    assert_eq!(twilio.sent().len(), 1, "one message");
    // Another consumer after the restart: sent, on the same files.
    let other =
        retry_until_answered(&channel, &api_key, request("+14155550802", "after-crash")).await;
    assert_eq!(other.status, HandoffStatus::Sent as i32, "{other:?}");
    assert_eq!(twilio.sent().len(), 2);
}

/// The five roles as separate processes; the gateway, killed with SIGKILL while Twilio holds a
/// message it took, is started again on its address. The IVR hears UNAVAILABLE (the handoff is
/// not finished), not FAILED, and its retry under the same key answers that handoff,
/// unconfirmed, with one message: the gateway's claim on the message id outlived it. Before,
/// the IVR heard FAILED, and its next step (a new key) sent a second SMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_after_the_provider_took_the_message_does_not_send_it_twice() {
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let mut mesh = Mesh::start(&db, &redis, environment(&twilio)).await;
    let channels = mesh.channels.clone();
    let (handoff, gateway, config) = (&channels[0], &channels[2], &channels[3]);
    let api_key = onboard_on(config, gateway, &twilio).await;
    let consumer = "+14155550810";

    twilio.stall_next();
    let call = {
        let mut client = HandoffServiceClient::new(handoff.clone());
        let request = authed(request(consumer, "gw-crash-1"), &api_key);
        tokio::spawn(async move { client.create_handoff(request).await })
    };
    eventually(
        "twilio has the message",
        Duration::from_secs(10),
        || async { twilio.sent().len() == 1 },
    )
    .await;
    mesh.kill(2).await;
    let refused = call.await.expect("joins").expect_err("not finished");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.get_details_error_info().expect("ErrorInfo").reason,
        "HANDOFF_UNFINISHED"
    );

    mesh.start_again(2, &db, &redis).await;
    let handoff = retry_until_answered(handoff, &api_key, request(consumer, "gw-crash-1")).await;
    assert_eq!(handoff.status, HandoffStatus::Sent as i32, "{handoff:?}");
    assert_eq!(
        handoff
            .attempts
            .iter()
            .map(|a| a.outcome)
            .collect::<Vec<_>>(),
        [AttemptOutcome::Unconfirmed as i32],
        "Twilio never answered: unconfirmed until its reports come"
    );
    assert_eq!(twilio.sent().len(), 1, "one message");
}

/// Routing, Config, Reporting and Handoff itself are each killed with SIGKILL and started again,
/// one after another, while an IVR keeps deflecting callers (retrying under the same key while
/// told to, as an IVR does). Every caller gets exactly one message, counted at the provider, and
/// once every role is back the funnel counts each handoff once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_killed_in_turn_under_handoffs_costs_no_message_and_no_count() {
    const CALLERS: usize = 40;
    let (db, redis, twilio) = (
        TestDatabase::create().await,
        TestRedis::new().await,
        TwilioEmulator::start().await,
    );
    let mut mesh = Mesh::start(&db, &redis, environment(&twilio)).await;
    let channels = mesh.channels.clone();
    let api_key = onboard_on(&channels[3], &channels[2], &twilio).await;
    let phone = |i: usize| format!("+1415555{:04}", 4000 + i);

    let refusals = Arc::new(AtomicUsize::new(0));
    let ivr = {
        let (handoff, api_key) = (channels[0].clone(), api_key.clone());
        let refusals = refusals.clone();
        tokio::spawn(async move {
            let mut calls = Vec::new();
            for i in 0..CALLERS {
                let request = request(&phone(i), &format!("killed-{i}"));
                calls.push(answered(&handoff, &api_key, request, &refusals).await);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            calls
        })
    };
    // Roles by their place in the mesh: routing, config, reporting, then handoff. Routing and
    // Handoff stay down until the IVR has been told to retry (it needs both for every call);
    // Handoff answers from its caches while Config is down, and Reporting is on no call's path.
    for (turn, role) in [1, 3, 4, 0].into_iter().enumerate() {
        let progress = (turn + 1) * CALLERS / 5;
        eventually(
            "the ivr gets on with its calls",
            Duration::from_secs(60),
            || async { twilio.sent().len() >= progress },
        )
        .await;
        let refused = refusals.load(Ordering::Relaxed);
        mesh.kill(role).await;
        if role == 0 || role == 1 {
            eventually(
                "the ivr told to retry while a role is down",
                Duration::from_secs(30),
                || async { refusals.load(Ordering::Relaxed) > refused },
            )
            .await;
        }
        mesh.start_again(role, &db, &redis).await;
    }
    let answered = ivr.await.expect("the ivr's calls end");
    assert!(
        answered
            .iter()
            .all(|h| h.status == HandoffStatus::Sent as i32),
        "{answered:?}"
    );
    let mut to: Vec<String> = twilio
        .sent()
        .iter()
        .map(|m| m.field("To").to_owned())
        .collect();
    to.sort();
    let expected: Vec<String> = (0..CALLERS).map(phone).collect();
    assert_eq!(to, expected, "one message for each caller, no more");

    // The funnel, once the outboxes have shipped what the outages held back.
    let admin = support::acme::token(c2m_runtime::auth::Role::Admin, Some("acme"));
    let count = |stage: pb::FunnelStage| {
        let (reporting, admin) = (channels[4].clone(), admin.clone());
        async move {
            let funnel =
                c2m_proto::v1::reporting_service_client::ReportingServiceClient::new(reporting)
                    .get_funnel(authed(
                        pb::GetFunnelRequest {
                            account_id: "acme".into(),
                            start_time: Some(c2m_proto::timestamp(
                                chrono::Utc::now() - chrono::Duration::hours(1),
                            )),
                            end_time: Some(c2m_proto::timestamp(
                                chrono::Utc::now() + chrono::Duration::hours(1),
                            )),
                            group_by: pb::FunnelGrouping::Unspecified as i32,
                        },
                        &admin,
                    ))
                    .await;
            funnel
                .ok()
                .into_iter()
                .flat_map(|f| f.into_inner().rows)
                .flat_map(|r| r.counts)
                .filter(|c| c.stage == stage as i32)
                .map(|c| c.count)
                .sum::<u64>()
        }
    };
    eventually(
        "every handoff counted once",
        Duration::from_secs(30),
        || async {
            count(pb::FunnelStage::Attempted).await == CALLERS as u64
                && count(pb::FunnelStage::Sent).await == CALLERS as u64
        },
    )
    .await;
}
