//! Routing's storage contract, one suite run against every backend: PostgreSQL (a database of the
//! test's own) and SQLite (a file of the test's own, as the embedded default keeps it). The rules
//! of each change are the callers' (`conversations::route` is one, run here as Routing runs it);
//! what this holds the backends to is what they read back, what they refuse, and the log's
//! positions.

use std::{sync::Arc, time::Duration};

use c2m_proto::v1::{self as pb, Channel, FunnelStage, conversation_event::Kind};
use c2m_test_support::Kept;
use chrono::{DateTime, Utc};

use crate::conversations::{self, Inbound};
use crate::store::{
    Change, Deflection, Listing, NewConversation, NewEntry, PgRoutingStore, RoutingStore,
    SqliteRoutingStore,
};

struct Backend {
    store: Arc<dyn RoutingStore>,
    kept: Kept,
}

impl Backend {
    async fn postgres() -> Self {
        let (db, kept) = Kept::postgres(crate::SCHEMA, &crate::MIGRATOR).await;
        Self {
            store: Arc::new(PgRoutingStore::new(db)),
            kept,
        }
    }

    async fn sqlite() -> Self {
        let (pool, kept) = Kept::sqlite("routing.db").await;
        Self {
            store: Arc::new(SqliteRoutingStore::new(pool).await.expect("migrated")),
            kept,
        }
    }

    /// A `SELECT count(*) …` of the backend's own tables.
    async fn count(&self, sql: &'static str) -> i64 {
        self.kept.count(sql).await
    }
}

c2m_test_support::conformance!(
    a_reply_opens_a_conversation_from_the_latest_deflection_then_joins_it,
    a_message_a_provider_delivers_again_is_routed_once,
    one_conversation_is_open_per_consumer,
    a_consumer_check_sees_the_open_conversation_opt_outs_and_pending_invites,
    listings_filter_and_page_newest_first,
    an_answer_moves_through_its_stages_and_counts_the_first_answer,
    consent_changes_are_recorded_once_each_and_listed,
    log_positions_have_no_gaps_while_writers_race,
    the_log_is_read_by_position_and_time_and_forgets_old_events,
    a_committed_log_append_is_noticed_and_a_rolled_back_one_is_not,
);

const PHONE: &str = "+447700900123";

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000 + seconds, 0).expect("a time")
}

fn deflection(handoff_id: &str, channel: Channel, second: i64) -> Deflection {
    Deflection {
        handoff_id: handoff_id.into(),
        account_id: "acme".into(),
        handoff_config_id: "default".into(),
        ivr_number: "+18005550100".into(),
        consumer_phone: PHONE.into(),
        channel: channel.as_str_name().into(),
        skill_id: "billing".into(),
        first_message: format!("Hi, text us here ({})", channel.as_str_name()),
        engagement_attributes: prost::Message::encode_to_vec(&pb::EngagementAttributes {
            customer_info: Some(pb::CustomerInfo {
                customer_id: "cust-42".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sent_at: at(second),
    }
}

fn inbound<'a>(text: &'a str, provider_message_id: &'a str, second: i64) -> Inbound<'a> {
    Inbound {
        account_id: "acme",
        consumer: PHONE,
        channel: Channel::Sms,
        text,
        provider_message_id,
        received_at: at(second),
        lookback_hours: 24,
        any_channel: false,
    }
}

async fn route(b: &Backend, m: &Inbound<'_>) -> conversations::Routed {
    let mut tx = b.store.begin().await.expect("begins");
    let routed = conversations::route(&mut *tx, m).await.expect("routed");
    tx.commit().await.expect("commits");
    routed
}

async fn a_reply_opens_a_conversation_from_the_latest_deflection_then_joins_it(b: &Backend) {
    // WhatsApp first, then its fallback on SMS: one row, the latest send's.
    b.store
        .record_deflections(vec![
            deflection("ho_1", Channel::Whatsapp, 0),
            deflection("ho_1", Channel::Sms, 30),
        ])
        .await
        .expect("recorded");
    // Shipped again later: older, so it changes nothing.
    b.store
        .record_deflections(vec![deflection("ho_1", Channel::Whatsapp, 0)])
        .await
        .expect("recorded");
    let opened = route(b, &inbound("yes please", "SM-in-1", 60)).await;
    assert!(opened.opened);
    assert_eq!(opened.handoff_id, "ho_1");
    let joined = route(b, &inbound("my bill is wrong", "SM-in-2", 90)).await;
    assert!(!joined.opened);
    assert_eq!(joined.conversation_id, opened.conversation_id);

    let conversation = b
        .store
        .conversation("acme", &opened.conversation_id)
        .await
        .expect("read")
        .expect("there");
    assert_eq!(conversation.channel, Channel::Sms as i32);
    assert_eq!(conversation.state, pb::ConversationState::Open as i32);
    assert_eq!(
        conversation
            .engagement_attributes
            .and_then(|a| a.customer_info)
            .map(|c| c.customer_id),
        Some("cust-42".to_owned())
    );
    let transcript: Vec<(String, String, i64)> = conversation
        .transcript
        .iter()
        .map(|e| (e.author.clone(), e.text.clone(), e.seq))
        .collect();
    assert_eq!(
        transcript,
        [
            (
                "deflection".into(),
                "Hi, text us here (CHANNEL_SMS)".into(),
                1
            ),
            ("consumer".into(), "yes please".into(), 2),
            ("consumer".into(), "my bill is wrong".into(), 3),
        ]
    );
    let last = conversation
        .last_message_at
        .as_ref()
        .and_then(c2m_proto::from_timestamp)
        .expect("a last message time");
    assert!(last >= at(90), "the last message's time or later: {last}");
    // RESPONDED and CONVERSATION_OPENED for Reporting; Opened, then a Message, in the log.
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 2);
    let logged = b.store.log_after("acme", 0, 10).await.expect("read");
    let kinds: Vec<_> = logged
        .iter()
        .map(|(position, payload)| {
            let event: pb::ConversationEvent =
                prost::Message::decode(payload.as_slice()).expect("decodes");
            let kind = match event.kind {
                Some(Kind::Opened(_)) => "opened",
                Some(Kind::Message(_)) => "message",
                _ => "other",
            };
            (*position, kind)
        })
        .collect();
    assert_eq!(kinds, [(1, "opened"), (2, "message")]);
}

async fn a_message_a_provider_delivers_again_is_routed_once(b: &Backend) {
    b.store
        .record_deflections(vec![deflection("ho_1", Channel::Sms, 0)])
        .await
        .expect("recorded");
    let first = route(b, &inbound("yes", "SM-in-1", 60)).await;
    let again = route(b, &inbound("yes", "SM-in-1", 61)).await;
    assert_eq!(again.conversation_id, first.conversation_id);
    assert!(!again.opened);
    assert_eq!(b.count("SELECT count(*) FROM transcript_entries").await, 2);
    // No deflection within the lookback: nothing to route to.
    let late = inbound("hello?", "SM-in-9", 60 + 25 * 3600);
    let mut tx = b.store.begin().await.expect("begins");
    let closed = tx.open_conversation("acme", PHONE).await.expect("read");
    assert!(closed.is_some());
    tx.close(&first.conversation_id, "resolved")
        .await
        .expect("closed");
    tx.commit().await.expect("commits");
    let mut tx = b.store.begin().await.expect("begins");
    assert!(matches!(
        conversations::route(&mut *tx, &late).await,
        Err(conversations::RouteError::NoDeflection(_))
    ));
}

async fn one_conversation_is_open_per_consumer(b: &Backend) {
    let open = |id: &'static str| NewConversation {
        conversation_id: id,
        account_id: "acme",
        consumer_address: PHONE,
        channel: "CHANNEL_SMS",
        skill_id: "billing",
        handoff_id: "ho_1",
        handoff_config_id: "default",
        engagement_attributes: &[],
        opened_at: at(0),
    };
    let mut tx = b.store.begin().await.expect("begins");
    tx.open(&open("conv_1")).await.expect("opened");
    tx.commit().await.expect("commits");
    let mut tx = b.store.begin().await.expect("begins");
    match tx.open(&open("conv_2")).await {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {}
        other => panic!("a second open conversation for the consumer: {other:?}"),
    }
    drop(tx);
    let mut tx = b.store.begin().await.expect("begins");
    tx.close("conv_1", "resolved").await.expect("closed");
    tx.open(&open("conv_2"))
        .await
        .expect("opened once the first closed");
    tx.commit().await.expect("commits");
    let closed = b
        .store
        .conversation("acme", "conv_1")
        .await
        .expect("read")
        .expect("there");
    assert_eq!(closed.state, pb::ConversationState::Closed as i32);
    assert_eq!(closed.close_reason, "resolved");
    assert!(closed.closed_at.is_some());
}

async fn a_consumer_check_sees_the_open_conversation_opt_outs_and_pending_invites(b: &Backend) {
    let now = Utc::now();
    let recent = |handoff_id: &str, channel, phone: &str| Deflection {
        consumer_phone: phone.into(),
        sent_at: now - chrono::Duration::minutes(5),
        ..deflection(handoff_id, channel, 0)
    };
    b.store
        .record_deflections(vec![
            recent("ho_apple", Channel::AppleMessages, "+447700900456"),
            recent("ho_sms", Channel::Sms, PHONE),
        ])
        .await
        .expect("recorded");
    let opened = route(
        b,
        &Inbound {
            received_at: now,
            ..inbound("yes", "SM-1", 0)
        },
    )
    .await;
    let mut tx = b.store.begin().await.expect("begins");
    for channel in [Channel::Whatsapp, Channel::Rcs] {
        tx.consent(&Change {
            account_id: "acme",
            consumer_phone: PHONE,
            channel,
            source: "keyword:STOP",
            opted_in: false,
        })
        .await
        .expect("recorded");
    }
    tx.commit().await.expect("commits");
    let checked = b
        .store
        .check_consumers(&[
            ("acme".into(), PHONE.into(), 24),
            ("acme".into(), "+447700900456".into(), 24),
            ("acme".into(), "+447700900456".into(), 0),
            ("globex".into(), PHONE.into(), 24),
        ])
        .await
        .expect("checked");
    assert_eq!(checked[0].conversation, Some(opened.conversation_id));
    let mut opted_out = checked[0].opted_out.clone();
    opted_out.sort();
    assert_eq!(opted_out, ["CHANNEL_RCS", "CHANNEL_WHATSAPP"]);
    assert_eq!(checked[0].pending_invite, None);
    assert_eq!(checked[1].pending_invite, Some("ho_apple".into()));
    assert_eq!(checked[2].pending_invite, None, "no invite looked for");
    assert_eq!(checked[3].conversation, None, "another account's consumer");
}

async fn listings_filter_and_page_newest_first(b: &Backend) {
    let mut tx = b.store.begin().await.expect("begins");
    for (n, skill, channel) in [
        (1, "billing", "CHANNEL_SMS"),
        (2, "sales", "CHANNEL_SMS"),
        (3, "billing", "CHANNEL_WHATSAPP"),
        (4, "support", "CHANNEL_SMS"),
    ] {
        let id = format!("conv_{n}");
        let phone = format!("+44770090010{n}");
        tx.open(&NewConversation {
            conversation_id: &id,
            account_id: "acme",
            consumer_address: &phone,
            channel,
            skill_id: skill,
            handoff_id: "",
            handoff_config_id: "default",
            engagement_attributes: &[],
            opened_at: at(n),
        })
        .await
        .expect("opened");
    }
    tx.assign("conv_3", Some("agent:ann"), "billing")
        .await
        .expect("assigned");
    tx.close("conv_1", "resolved").await.expect("closed");
    tx.commit().await.expect("commits");
    let ids = |listing: Listing| {
        let store = b.store.clone();
        async move {
            store
                .conversations(&listing)
                .await
                .expect("listed")
                .into_iter()
                .map(|c| c.conversation_id)
                .collect::<Vec<_>>()
        }
    };
    let all = || Listing {
        account_id: "acme".into(),
        limit: 10,
        ..Listing::default()
    };
    assert_eq!(ids(all()).await, ["conv_4", "conv_3", "conv_2", "conv_1"]);
    assert_eq!(
        ids(Listing {
            open: Some(true),
            ..all()
        })
        .await,
        ["conv_4", "conv_3", "conv_2"]
    );
    assert_eq!(
        ids(Listing {
            skills: Some(vec!["billing".into(), "sales".into()]),
            ..all()
        })
        .await,
        ["conv_3", "conv_2", "conv_1"]
    );
    assert_eq!(
        ids(Listing {
            channel: Some(Channel::Whatsapp),
            assignee: Some("agent:ann".into()),
            ..all()
        })
        .await,
        ["conv_3"]
    );
    assert_eq!(
        ids(Listing {
            after: Some((at(3), "conv_3".into())),
            limit: 1,
            ..all()
        })
        .await,
        ["conv_2"]
    );
    assert_eq!(
        ids(Listing {
            opened_after: Some(at(3)),
            consumer: Some("+447700900104".into()),
            ..all()
        })
        .await,
        ["conv_4"]
    );
}

async fn an_answer_moves_through_its_stages_and_counts_the_first_answer(b: &Backend) {
    b.store
        .record_deflections(vec![deflection("ho_1", Channel::Sms, 0)])
        .await
        .expect("recorded");
    let opened = route(b, &inbound("yes", "SM-in-1", 60)).await;
    let mut tx = b.store.begin().await.expect("begins");
    let until = Utc::now() + chrono::Duration::seconds(10);
    let media = vec!["https://cdn.example.com/a.png".to_owned()];
    let entry = tx
        .append(
            &opened.conversation_id,
            &NewEntry {
                direction: "OUTBOUND",
                author: "agent:ann",
                text: "Hello, Ann here",
                message_id: Some("msg_1"),
                client_message_id: Some("c-1"),
                media_urls: &media,
                at: at(70),
                sending_until: Some(until),
                ..NewEntry::default()
            },
        )
        .await
        .expect("appended");
    assert_eq!(entry.seq, 3);
    assert_eq!(entry.media_urls, media);
    tx.commit().await.expect("commits");

    let mut tx = b.store.begin().await.expect("begins");
    let (earlier, sending) = tx
        .earlier(&opened.conversation_id, "c-1")
        .await
        .expect("read")
        .expect("the client id was used");
    assert_eq!(earlier, entry);
    assert_eq!(
        sending.map(|t| t.timestamp_micros()),
        Some(until.timestamp_micros())
    );
    assert!(
        tx.earlier(&opened.conversation_id, "c-2")
            .await
            .expect("read")
            .is_none()
    );
    assert_eq!(
        tx.last_inbound(&opened.conversation_id)
            .await
            .expect("read"),
        Some(at(60))
    );
    let sent = tx
        .sent("acme", "msg_1")
        .await
        .expect("read")
        .expect("the message is the account's");
    assert_eq!(
        (
            sent.conversation_id.as_str(),
            sent.channel,
            sent.handoff_id.as_str()
        ),
        (opened.conversation_id.as_str(), Channel::Sms, "ho_1")
    );
    assert!(tx.sent("globex", "msg_1").await.expect("read").is_none());
    assert!(
        !tx.answered_before(&opened.conversation_id, entry.seq)
            .await
            .expect("read")
    );
    let delivered = tx
        .set_stage("msg_1", FunnelStage::Delivered, "")
        .await
        .expect("set");
    assert_eq!(delivered.stage, FunnelStage::Delivered as i32);
    tx.commit().await.expect("commits");
    // Another answer: the first one has gone out.
    let mut tx = b.store.begin().await.expect("begins");
    assert!(
        tx.answered_before(&opened.conversation_id, entry.seq + 1)
            .await
            .expect("read")
    );
    let failed = tx
        .set_stage("msg_1", FunnelStage::Failed, "30006")
        .await
        .expect("set");
    assert_eq!(failed.error_code, "30006");
}

async fn consent_changes_are_recorded_once_each_and_listed(b: &Backend) {
    let change = |channel, opted_in| Change {
        account_id: "acme",
        consumer_phone: PHONE,
        channel,
        source: if opted_in {
            "keyword:START"
        } else {
            "keyword:STOP"
        },
        opted_in,
    };
    let mut outcomes = Vec::new();
    for (channel, opted_in) in [
        (Channel::Sms, false),
        (Channel::Sms, false),
        (Channel::Whatsapp, false),
        (Channel::Sms, true),
        (Channel::Sms, true),
    ] {
        let mut tx = b.store.begin().await.expect("begins");
        outcomes.push(
            tx.consent(&change(channel, opted_in))
                .await
                .expect("recorded"),
        );
        tx.commit().await.expect("commits");
    }
    assert_eq!(outcomes, [true, false, true, true, false]);
    let all = b
        .store
        .consent_changes("acme", None, None, 0, 10)
        .await
        .expect("listed");
    let summary: Vec<_> = all
        .iter()
        .map(|(_, c)| (c.channel, c.opted_in, c.source.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (Channel::Sms as i32, false, "keyword:STOP"),
            (Channel::Whatsapp as i32, false, "keyword:STOP"),
            (Channel::Sms as i32, true, "keyword:START"),
        ]
    );
    let sms_after_first = b
        .store
        .consent_changes("acme", Some(PHONE), Some(Channel::Sms), all[0].0, 10)
        .await
        .expect("listed");
    assert_eq!(sms_after_first.len(), 1);
    assert!(sms_after_first[0].1.opted_in);
    assert!(
        b.store
            .consent_changes("acme", Some("+447700900999"), None, 0, 10)
            .await
            .expect("listed")
            .is_empty()
    );
}

fn log_event(conversation_id: &str) -> pb::ConversationEvent {
    conversations::event(
        "acme",
        conversation_id,
        "billing",
        Kind::Closed(pb::ConversationClosed::default()),
    )
}

async fn log_positions_have_no_gaps_while_writers_race(b: &Backend) {
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = b.store.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let mut tx = store.begin().await.expect("begins");
                    let events = [log_event(&format!("conv_{w}_{i}"))];
                    tx.log("acme", &events).await.expect("logged");
                    tx.commit().await.expect("commits");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("wrote");
    }
    assert_eq!(b.store.log_head("acme").await.expect("read"), 200);
    let mut positions = Vec::new();
    let mut after = 0;
    loop {
        let page = b.store.log_after("acme", after, 64).await.expect("read");
        let Some(last) = page.last() else { break };
        after = last.0;
        positions.extend(page.iter().map(|(p, _)| *p));
    }
    assert_eq!(positions, (1..=200).collect::<Vec<_>>());
    assert_eq!(b.store.log_head("globex").await.expect("read"), 0);
}

async fn the_log_is_read_by_position_and_time_and_forgets_old_events(b: &Backend) {
    assert_eq!(b.store.log_oldest_kept("acme").await.expect("read"), 1);
    let mut tx = b.store.begin().await.expect("begins");
    tx.log("acme", &[log_event("conv_1"), log_event("conv_2")])
        .await
        .expect("logged");
    tx.commit().await.expect("commits");
    let now = Utc::now();
    let past = now - chrono::Duration::hours(1);
    let future = now + chrono::Duration::hours(1);
    assert_eq!(b.store.log_before("acme", past).await.expect("read"), 0);
    assert_eq!(b.store.log_before("acme", future).await.expect("read"), 2);
    assert_eq!(b.store.log_oldest_kept("acme").await.expect("read"), 1);
    assert_eq!(b.store.prune_log(past).await.expect("pruned"), 0);
    assert_eq!(b.store.prune_log(future).await.expect("pruned"), 2);
    // Nothing kept: the next event is the oldest a cursor can still expect.
    assert_eq!(b.store.log_oldest_kept("acme").await.expect("read"), 3);
    assert_eq!(b.store.log_head("acme").await.expect("read"), 2);
}

async fn a_committed_log_append_is_noticed_and_a_rolled_back_one_is_not(b: &Backend) {
    let mut notices = b.store.listen().await.expect("listens");
    let mut tx = b.store.begin().await.expect("begins");
    tx.log("globex", &[log_event("conv_0")])
        .await
        .expect("logged");
    drop(tx);
    let mut tx = b.store.begin().await.expect("begins");
    tx.log("acme", &[log_event("conv_1")])
        .await
        .expect("logged");
    tx.commit().await.expect("commits");
    let heard = tokio::time::timeout(Duration::from_secs(10), notices.recv())
        .await
        .expect("a notice within 10 s")
        .expect("listening");
    assert_eq!(heard, "acme", "the rolled-back append is not heard of");
    assert_eq!(b.store.log_head("globex").await.expect("read"), 0);
}
