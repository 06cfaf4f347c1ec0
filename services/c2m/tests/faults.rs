//! Faults on a real `c2m dev` process: killed with SIGKILL in the middle of a handoff, then
//! started again on the same PostgreSQL and Redis. Sends are counted at the provider emulator.

mod support;

use std::time::{Duration, Instant};

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

/// The IVR's retries under one key while the answer says "retry", after the delay it carries,
/// for up to 30 s.
async fn retry_until_answered(
    channel: &Channel,
    api_key: &str,
    request: pb::CreateHandoffRequest,
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
                if matches!(
                    status.code(),
                    tonic::Code::Aborted | tonic::Code::Unavailable
                ) && Instant::now() < until =>
            {
                let wait = status
                    .get_details_retry_info()
                    .and_then(|r| r.retry_delay)
                    .unwrap_or(Duration::from_millis(200));
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

    twilio.stall_next();
    let mut client = HandoffServiceClient::new(channel.clone());
    let call = {
        let request = authed(request(consumer, "crash-1"), &api_key);
        tokio::spawn(async move { client.create_handoff(request).await })
    };
    eventually(
        "twilio has the message",
        Duration::from_secs(10),
        || async { twilio.sent().len() == 1 },
    )
    .await;
    first.kill9().await;
    assert!(
        call.await.expect("joins").is_err(),
        "the IVR's call broke off"
    );

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
    mesh.servers[2].take().expect("the gateway").kill9().await;
    let refused = call.await.expect("joins").expect_err("not finished");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        refused.get_details_error_info().expect("ErrorInfo").reason,
        "HANDOFF_UNFINISHED"
    );

    let gateway = mesh.restart(2, &db, &redis).await;
    gateway
        .until_serving_only(&["c2m.v1.ChannelGatewayService"])
        .await;
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
