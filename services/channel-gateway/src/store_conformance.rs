//! The gateway's storage contract, one suite run against every backend: PostgreSQL (a database of
//! the test's own) and SQLite (a file of the test's own, as the embedded default keeps it). The
//! rules that keep a message id to one send (`messages::Claims`, `Records`, `advance`) run here
//! over each, as the gateway runs them.

use std::sync::Arc;

use c2m_proto::v1::{Channel, DevicePlatform, FunnelStage, LineType, Provider};
use c2m_storage::batch::Statement;
use c2m_test_support::Kept;
use chrono::{DateTime, Utc};

use crate::messages::{Claim, Claims, Records, StatusReport, advance};
use crate::store::{GatewayStore, Outbound, PgGatewayStore, SqliteGatewayStore};

struct Backend {
    store: Arc<dyn GatewayStore>,
    kept: Kept,
}

impl Backend {
    async fn postgres() -> Self {
        let (db, kept) = Kept::postgres(crate::SCHEMA, &crate::MIGRATOR).await;
        Self {
            store: Arc::new(PgGatewayStore::new(db)),
            kept,
        }
    }

    async fn sqlite() -> Self {
        let (pool, kept) = Kept::sqlite("gateway.db").await;
        Self {
            store: Arc::new(SqliteGatewayStore::new(pool).await.expect("migrated")),
            kept,
        }
    }

    /// A `SELECT count(*) …` of the backend's own tables.
    async fn count(&self, sql: &'static str) -> i64 {
        self.kept.count(sql).await
    }
}

c2m_test_support::conformance!(
    an_id_is_claimed_once_and_a_repeat_gets_the_first_send_as_it_stands,
    two_sends_of_one_id_in_one_batch_claim_it_once,
    an_outcome_recorded_after_the_providers_report_keeps_the_report,
    a_claim_no_message_left_for_is_taken_back_by_its_sender_only,
    reports_move_a_message_forward_once_and_write_what_they_passed,
    a_delivery_is_processed_once_however_often_it_comes,
    credentials_are_replaced_and_deleted,
    a_device_token_belongs_to_the_consumer_who_registered_it_last,
    the_last_message_of_a_consumer_and_a_numbers_line_type_are_kept,
);

/// A claim of `message_id` by `account_id`, its sender at the provider for `secs` more.
fn claim(account_id: &str, message_id: &str, secs: i64) -> Arc<Outbound> {
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("a time");
    Arc::new(Outbound {
        message_id: message_id.into(),
        account_id: account_id.into(),
        channel: Channel::Sms,
        handoff_id: "ho_1".into(),
        handoff_config_id: "default".into(),
        skill_id: "billing".into(),
        conversation_id: String::new(),
        provider_message_id: None,
        stage: FunnelStage::Sent,
        error_code: None,
        error_message: None,
        sent_at: now,
        updated_at: now,
        delivered_at: None,
        read_at: None,
        sending_until: Some(now + chrono::Duration::seconds(secs)),
        claimed_by: Some(uuid::Uuid::new_v4().to_string()),
    })
}

/// The outcome `stage` of the send `claim` made.
fn outcome(claim: &Arc<Outbound>, stage: FunnelStage) -> Arc<Outbound> {
    Arc::new(Outbound {
        provider_message_id: (stage == FunnelStage::Sent)
            .then(|| format!("SM{}", claim.message_id)),
        stage,
        error_code: (stage == FunnelStage::Failed).then(|| "30003".to_owned()),
        sending_until: None,
        ..Outbound::clone(claim)
    })
}

fn report<'a>(message_id: &'a str, stage: Option<FunnelStage>) -> StatusReport<'a> {
    StatusReport {
        account_id: "acme",
        channel: Channel::Sms,
        // The provider's id for it: unique per channel, as a provider's is.
        provider_message_id: message_id,
        message_id: Some(message_id),
        stage,
        error_code: None,
        source: "test",
    }
}

/// In one batch: a new id is claimed; an id claimed before is returned as it stands (in flight
/// while its sender is at the provider, unconfirmed once that sender's time is past, its outcome
/// once recorded); an id another account holds is not this account's.
async fn an_id_is_claimed_once_and_a_repeat_gets_the_first_send_as_it_stands(b: &Backend) {
    let (claims, records) = (Claims(b.store.clone()), Records(b.store.clone()));
    let first = [
        claim("acme", "m-failed", 10),
        claim("acme", "m-flying", 10),
        claim("acme", "m-abandoned", -1),
        claim("globex", "m-theirs", 10),
    ];
    let claimed = claims.run(&first).await.expect("claims");
    assert!(claimed.iter().all(|c| *c == Claim::Mine), "{claimed:?}");
    let recorded = records
        .run(&[outcome(&first[0], FunnelStage::Failed)])
        .await
        .expect("records");
    assert_eq!(
        recorded[0].as_ref().map(|m| (m.stage, m.sending_until)),
        Some((FunnelStage::Failed, None))
    );

    let again = claims
        .run(&[
            claim("acme", "m-new", 10),
            claim("acme", "m-failed", 10),
            claim("acme", "m-flying", 10),
            claim("acme", "m-abandoned", 10),
            claim("acme", "m-theirs", 10),
        ])
        .await
        .expect("claims");
    let now = Utc::now();
    let seen: Vec<_> = again
        .iter()
        .map(|c| match c {
            Claim::Mine => "mine",
            Claim::Foreign => "foreign",
            Claim::Earlier(m) if m.stage == FunnelStage::Failed => "failed",
            Claim::Earlier(m) if m.in_flight(now) => "in flight",
            Claim::Earlier(m) if m.unconfirmed() => "unconfirmed",
            Claim::Earlier(_) => "other",
        })
        .collect();
    assert_eq!(
        seen,
        ["mine", "failed", "in flight", "unconfirmed", "foreign"]
    );
    // The claim's own statement run again (its acknowledgement lost): still this send's.
    let rerun = claims
        .run(std::slice::from_ref(&first[1]))
        .await
        .expect("claims");
    assert_eq!(rerun, [Claim::Mine]);
    let looked_up = b
        .store
        .messages(&["m-flying".into(), "m-nothing".into()])
        .await
        .expect("read");
    assert_eq!(looked_up[0].as_ref(), Some(&*first[1]));
    assert_eq!(looked_up[1], None);
}

/// Two sends of one message id that reach the store in the same batch (two requests carrying
/// on one handoff at once): the first claims it, the second finds it at the provider. Both once
/// read as the batch's one written id, and both called the provider.
async fn two_sends_of_one_id_in_one_batch_claim_it_once(b: &Backend) {
    let claims = Claims(b.store.clone());
    let twins = [claim("acme", "m-twin", 10), claim("acme", "m-twin", 10)];
    let claimed = claims.run(&twins).await.expect("claims");
    match &claimed[..] {
        [Claim::Mine, Claim::Earlier(first)] => {
            assert_eq!(first.claimed_by, twins[0].claimed_by);
            assert!(first.in_flight(Utc::now()), "{first:?}");
        }
        other => panic!("one of the twins claims the id, the other waits on it: {other:?}"),
    }
    assert_eq!(
        b.count("SELECT count(*) FROM outbound_messages WHERE message_id = 'm-twin'")
            .await,
        1
    );
}

/// A provider's report that arrives before the sender records the send's outcome is kept: the
/// outcome fills in only what is missing.
async fn an_outcome_recorded_after_the_providers_report_keeps_the_report(b: &Backend) {
    let claimed = claim("acme", "m-raced", 10);
    Claims(b.store.clone())
        .run(std::slice::from_ref(&claimed))
        .await
        .expect("claims");
    let mut tx = b.store.begin().await.expect("begins");
    let events = advance(
        &mut *tx,
        &StatusReport {
            provider_message_id: "SMm-raced",
            ..report("m-raced", Some(FunnelStage::Delivered))
        },
    )
    .await
    .expect("advances");
    tx.commit().await.expect("commits");
    assert_eq!(events, 1);
    let recorded = Records(b.store.clone())
        .run(&[outcome(&claimed, FunnelStage::Sent)])
        .await
        .expect("records");
    let recorded = recorded[0].as_ref().expect("recorded");
    assert_eq!(recorded.stage, FunnelStage::Delivered);
    assert_eq!(recorded.provider_message_id.as_deref(), Some("SMm-raced"));
    assert!(recorded.delivered_at.is_some());
    assert!(!recorded.in_flight(Utc::now()));
}

async fn a_claim_no_message_left_for_is_taken_back_by_its_sender_only(b: &Backend) {
    let mine = claim("acme", "m-1", 10);
    Claims(b.store.clone())
        .run(std::slice::from_ref(&mine))
        .await
        .expect("claims");
    b.store
        .take_back("m-1", Some("another send"))
        .await
        .expect("answered");
    assert!(b.store.messages(&["m-1".into()]).await.expect("read")[0].is_some());
    b.store
        .take_back("m-1", mine.claimed_by.as_deref())
        .await
        .expect("taken back");
    assert!(b.store.messages(&["m-1".into()]).await.expect("read")[0].is_none());
    // Once a provider has answered, the claim stays.
    let sent = claim("acme", "m-2", 10);
    Claims(b.store.clone())
        .run(std::slice::from_ref(&sent))
        .await
        .expect("claims");
    Records(b.store.clone())
        .run(&[outcome(&sent, FunnelStage::Sent)])
        .await
        .expect("records");
    b.store
        .take_back("m-2", sent.claimed_by.as_deref())
        .await
        .expect("answered");
    assert!(b.store.messages(&["m-2".into()]).await.expect("read")[0].is_some());
}

async fn reports_move_a_message_forward_once_and_write_what_they_passed(b: &Backend) {
    let deflection = claim("acme", "m-deflection", 10);
    let answer = Arc::new(Outbound {
        conversation_id: "conv_1".into(),
        ..Outbound::clone(&claim("acme", "m-answer", 10))
    });
    Claims(b.store.clone())
        .run(&[deflection.clone(), answer.clone()])
        .await
        .expect("claims");
    let advance_to = |id: &'static str, stage| {
        let store = b.store.clone();
        async move {
            let mut tx = store.begin().await.expect("begins");
            let written = advance(&mut *tx, &report(id, stage))
                .await
                .expect("advances");
            tx.commit().await.expect("commits");
            written
        }
    };
    // READ first counts DELIVERED too; DELIVERED after it changes nothing.
    assert_eq!(advance_to("m-deflection", Some(FunnelStage::Read)).await, 2);
    assert_eq!(
        advance_to("m-deflection", Some(FunnelStage::Delivered)).await,
        0
    );
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 2);
    // A conversation's message: its stages go to Routing, not to Reporting.
    assert_eq!(
        advance_to("m-answer", Some(FunnelStage::Delivered)).await,
        1
    );
    assert_eq!(b.count("SELECT count(*) FROM conversation_outbox").await, 1);
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 2);
    let stands = b
        .store
        .messages(&["m-deflection".into()])
        .await
        .expect("read")
        .remove(0)
        .expect("there");
    assert_eq!(stands.stage, FunnelStage::Read);
    assert!(stands.read_at.is_some() && stands.delivered_at.is_some());
    // Another account's report finds nothing.
    let mut tx = b.store.begin().await.expect("begins");
    let theirs = StatusReport {
        account_id: "globex",
        ..report("m-deflection", Some(FunnelStage::Failed))
    };
    assert_eq!(advance(&mut *tx, &theirs).await.expect("answered"), 0);
}

async fn a_delivery_is_processed_once_however_often_it_comes(b: &Backend) {
    // Stored, then lost with its transaction: still to be processed.
    let mut tx = b.store.begin().await.expect("begins");
    assert!(
        tx.store("twilio:SM1:delivered", b"body")
            .await
            .expect("stored")
    );
    drop(tx);
    let mut tx = b.store.begin().await.expect("begins");
    assert!(
        tx.store("twilio:SM1:delivered", b"body")
            .await
            .expect("stored")
    );
    tx.processed("twilio:SM1:delivered").await.expect("marked");
    tx.commit().await.expect("commits");
    let mut tx = b.store.begin().await.expect("begins");
    assert!(
        !tx.store("twilio:SM1:delivered", b"body again")
            .await
            .expect("stored")
    );
    assert!(
        tx.store("twilio:SM2:delivered", b"body")
            .await
            .expect("stored")
    );
    tx.commit().await.expect("commits");
    assert_eq!(b.count("SELECT count(*) FROM webhook_inbox").await, 2);
}

async fn credentials_are_replaced_and_deleted(b: &Backend) {
    let store = &b.store;
    assert_eq!(
        store
            .credentials("acme", Provider::Twilio)
            .await
            .expect("read"),
        None
    );
    store
        .put_credentials("acme", Provider::Twilio, b"sealed-1")
        .await
        .expect("stored");
    store
        .put_credentials("acme", Provider::Twilio, b"sealed-2")
        .await
        .expect("replaced");
    assert_eq!(
        store
            .credentials("acme", Provider::Twilio)
            .await
            .expect("read"),
        Some(b"sealed-2".to_vec())
    );
    assert_eq!(
        store
            .credentials("globex", Provider::Twilio)
            .await
            .expect("read"),
        None
    );
    assert!(
        store
            .delete_credentials("acme", Provider::Twilio)
            .await
            .expect("deleted")
    );
    assert!(
        !store
            .delete_credentials("acme", Provider::Twilio)
            .await
            .expect("answered")
    );
}

async fn a_device_token_belongs_to_the_consumer_who_registered_it_last(b: &Backend) {
    let store = &b.store;
    let tokens = |consumer: &'static str| {
        let store = store.clone();
        async move {
            store
                .devices("acme", consumer)
                .await
                .expect("listed")
                .into_iter()
                .map(|d| (d.platform, d.token))
                .collect::<Vec<_>>()
        }
    };
    store
        .register_device("acme", "cust-1", DevicePlatform::Android, "tok-a")
        .await
        .expect("registered");
    store
        .register_device("acme", "cust-1", DevicePlatform::Ios, "tok-b")
        .await
        .expect("registered");
    let both = tokens("cust-1").await;
    assert_eq!(both.len(), 2);
    // tok-a changes hands.
    store
        .register_device("acme", "cust-2", DevicePlatform::Android, "tok-a")
        .await
        .expect("registered");
    assert_eq!(
        tokens("cust-1").await,
        [(DevicePlatform::Ios, "tok-b".to_owned())]
    );
    assert_eq!(
        tokens("cust-2").await,
        [(DevicePlatform::Android, "tok-a".to_owned())]
    );
    assert!(
        !store
            .remove_device("acme", "cust-1", "tok-a")
            .await
            .expect("answered")
    );
    assert!(
        store
            .remove_device("acme", "cust-1", "tok-b")
            .await
            .expect("removed")
    );
    store
        .forget_device("acme", "tok-a")
        .await
        .expect("forgotten");
    assert!(tokens("cust-2").await.is_empty());
}

async fn the_last_message_of_a_consumer_and_a_numbers_line_type_are_kept(b: &Backend) {
    let store = &b.store;
    let at = |s: i64| DateTime::from_timestamp(1_790_000_000 + s, 0).expect("a time");
    assert_eq!(
        store
            .last_inbound("acme", "+447700900123")
            .await
            .expect("read"),
        None
    );
    store
        .inbound("acme", "+447700900123", at(100))
        .await
        .expect("kept");
    store
        .inbound("acme", "+447700900123", at(50))
        .await
        .expect("kept");
    assert_eq!(
        store
            .last_inbound("acme", "+447700900123")
            .await
            .expect("read"),
        Some(at(100)),
        "an earlier message does not move the window back"
    );
    assert_eq!(
        store
            .last_inbound("globex", "+447700900123")
            .await
            .expect("read"),
        None
    );
    store
        .remember_line_type("+14155550100", LineType::Landline)
        .await
        .expect("kept");
    store
        .remember_line_type("+14155550100", LineType::Mobile)
        .await
        .expect("replaced");
    let (kind, when) = store
        .line_type("+14155550100")
        .await
        .expect("read")
        .expect("known");
    assert_eq!(kind, LineType::Mobile);
    assert!((Utc::now() - when).num_seconds().abs() < 60);
}

/// PostgreSQL only: recording outcomes on a table that grew after the statement was first run
/// (on an empty table, as every deployment starts) finds the rows by their key instead of
/// scanning the table. A plan kept from the first run read the whole table for every batch, and a
/// soak spent most of PostgreSQL's CPU there. Read from the table's statistics, as PostgreSQL
/// counts rows read by sequential scans.
#[tokio::test]
async fn outcomes_are_recorded_by_key_on_a_table_that_grew_since_the_first_batch() {
    const GROWN: i64 = 20_000;
    let b = Backend::postgres().await;
    let Kept::Postgres { db, .. } = &b.kept else {
        unreachable!("a PostgreSQL backend")
    };
    // Both batch connections plan the statement while the table is empty, each more than the
    // five runs after which PostgreSQL may keep a plan.
    for round in 0..6 {
        let batch = |n: usize| {
            let store = b.store.clone();
            async move {
                let first = claim("acme", &format!("m-warm-{round}-{n}"), 10);
                store
                    .claim(std::slice::from_ref(&first))
                    .await
                    .expect("claims");
                store
                    .record(&[outcome(&first, FunnelStage::Sent)])
                    .await
                    .expect("records");
            }
        };
        tokio::join!(batch(0), batch(1));
    }
    sqlx::query(
        "INSERT INTO outbound_messages (message_id, account_id, channel, stage) \
         SELECT 'm-old-' || n, 'acme', 'CHANNEL_SMS', 'FUNNEL_STAGE_DELIVERED' \
         FROM generate_series(1, $1) AS n",
    )
    .bind(GROWN)
    .execute(db.pool())
    .await
    .expect("the table grows");
    let claims: Vec<Arc<Outbound>> = (0..8)
        .map(|n| claim("acme", &format!("m-new-{n}"), 10))
        .collect();
    b.store.claim(&claims).await.expect("claims");
    for _ in 0..2 {
        let recorded = b
            .store
            .record(
                &claims
                    .iter()
                    .map(|c| outcome(c, FunnelStage::Sent))
                    .collect::<Vec<_>>(),
            )
            .await
            .expect("records");
        assert_eq!(recorded.len(), claims.len());
    }
    // Statistics reach the shared counters some seconds after a connection goes idle, the
    // updates with the reads of the same statements: wait for the updates, then read the reads.
    let updated = 12 + 2 * claims.len() as i64;
    let stats = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT n_tup_upd, seq_tup_read FROM pg_stat_user_tables \
             WHERE relname = 'outbound_messages'",
        )
        .fetch_one(db.pool())
        .await
        .expect("statistics")
    };
    c2m_test_support::eventually(
        "the updates are counted",
        std::time::Duration::from_secs(30),
        || async { stats().await.0 >= updated },
    )
    .await;
    let (_, scanned) = stats().await;
    assert!(
        scanned < GROWN,
        "{scanned} rows read by sequential scans: a batch scanned the grown table"
    );
}
