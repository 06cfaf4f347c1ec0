//! Handoff's storage contract (`HandoffStore`), one suite run against every backend: PostgreSQL
//! (a database of the test's own) and SQLite (a file of the test's own, as the embedded default
//! keeps it). What makes a handoff send one message and no more lives here: an idempotency key
//! holds one handoff, a consumer's lease one handoff, and a fallback is recorded once.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use c2m_handoff::store::{
    Attempt, Fallback, Fell, HandoffStore, Intended, Intent, PgHandoffStore, Save, Saved,
    SqliteHandoffStore, StoredHandoff,
};
use c2m_proto::v1::{self as pb, AttemptOutcome, Channel, FunnelStage, HandoffStatus};
use c2m_storage::outbox;
use c2m_test_support::Kept;
use chrono::{DateTime, Utc};

struct Backend {
    store: Arc<dyn HandoffStore>,
    kept: Kept,
}

impl Backend {
    async fn postgres() -> Self {
        let (db, kept) = Kept::postgres(c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR).await;
        Self {
            store: Arc::new(PgHandoffStore::new(db)),
            kept,
        }
    }

    async fn sqlite() -> Self {
        let (pool, kept) = Kept::sqlite("handoff.db").await;
        Self {
            store: Arc::new(SqliteHandoffStore::new(pool).await.expect("migrated")),
            kept,
        }
    }

    /// A `SELECT count(*) …` of the backend's own tables.
    async fn count(&self, sql: &'static str) -> i64 {
        self.kept.count(sql).await
    }
}

c2m_test_support::conformance!(
    a_handoff_is_saved_whole_or_not_at_all,
    twins_of_a_key_save_one_handoff,
    a_handoff_finished_by_several_carriers_at_once_is_finished_once,
    a_key_replays_its_handoff_with_the_fingerprint_it_was_made_with,
    an_intent_holds_its_key_and_its_consumer_until_it_sends_nothing,
    one_of_many_intents_for_a_consumer_holds_them,
    handoffs_left_in_progress_are_found_and_recent_ones_counted,
    a_fallback_is_claimed_by_one_round_and_recorded_once,
    a_fallback_is_looked_at_again_by_its_deadline,
    a_late_report_confirms_an_unanswered_send,
);

const PHONE: &str = "+447700900123";

/// Now, in whole microseconds (as both backends keep times).
fn now() -> DateTime<Utc> {
    DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).expect("a time")
}

fn stored(handoff_id: &str, status: HandoffStatus) -> StoredHandoff {
    StoredHandoff {
        handoff_id: handoff_id.into(),
        account_id: "acme".into(),
        handoff_config_id: "default".into(),
        consumer_phone: PHONE.into(),
        status,
        channel: Some(Channel::Sms),
        skill_id: "billing".into(),
        ivr_call_id: "call-1".into(),
        ivr_number: "+18005550100".into(),
        attempts: vec![Attempt {
            channel: Channel::Sms,
            outcome: AttemptOutcome::Sent,
            message_id: format!("{handoff_id}-1"),
            provider_message_id: "SM123".into(),
            error_code: String::new(),
            error_message: String::new(),
            at: now(),
        }],
        duplicate_of: None,
        created_at: now(),
    }
}

fn save(handoff_id: &str, key: &str, fallback: bool) -> Arc<Save> {
    Arc::new(save_of(handoff_id, key, fallback))
}

fn save_of(handoff_id: &str, key: &str, fallback: bool) -> Save {
    let handoff = stored(handoff_id, HandoffStatus::Sent);
    Save {
        events: [FunnelStage::Attempted, FunnelStage::Sent]
            .into_iter()
            .map(|stage| pb::Event {
                handoff_id: handoff_id.into(),
                ..outbox::event("acme", stage)
            })
            .collect(),
        fallback: fallback.then(|| Fallback {
            message_id: format!("{handoff_id}-1"),
            remaining: serde_json::json!([{"channel": "CHANNEL_SMS"}]),
            deadline: None,
            window_seconds: Some(60),
            confirm_by: None,
        }),
        deflection: Some(pb::Deflection {
            account_id: "acme".into(),
            handoff_id: handoff_id.into(),
            consumer_phone: PHONE.into(),
            channel: Channel::Sms.into(),
            skill_id: "billing".into(),
            ..Default::default()
        }),
        handoff,
        idempotency_key: key.into(),
        fingerprint: format!("fp-{key}").into_bytes(),
        intended: false,
        release_consumer: false,
    }
}

fn intent(handoff_id: &str, key: &str, phone: &str) -> Arc<Intent> {
    Arc::new(intent_of(handoff_id, key, phone))
}

fn intent_of(handoff_id: &str, key: &str, phone: &str) -> Intent {
    Intent {
        handoff: StoredHandoff {
            consumer_phone: phone.into(),
            channel: None,
            attempts: Vec::new(),
            ..stored(handoff_id, HandoffStatus::InProgress)
        },
        idempotency_key: key.into(),
        fingerprint: key.as_bytes().to_vec(),
        lease: Duration::from_secs(10),
        request: b"request".to_vec(),
        take_lease: true,
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

async fn a_handoff_is_saved_whole_or_not_at_all(b: &Backend) {
    let store = &b.store;
    let first = save("ho_first", "k-taken", false);
    assert!(matches!(
        store.save(first.clone(), soon()).await,
        Ok(Saved::Saved)
    ));
    assert!(matches!(
        store
            .save(save("ho_fallback", "k-fallback", true), soon())
            .await,
        Ok(Saved::Saved)
    ));
    // Another handoff with a key a live record holds: nothing of it is written.
    assert!(matches!(
        store.save(save("ho_late", "k-taken", true), soon()).await,
        Ok(Saved::Raced)
    ));
    assert_eq!(
        store.load("acme", "ho_first").await.expect("read"),
        Some(first.handoff.clone())
    );
    assert_eq!(store.load("acme", "ho_late").await.expect("read"), None);
    assert_eq!(store.load("other", "ho_first").await.expect("read"), None);
    assert_eq!(b.count("SELECT count(*) FROM handoffs").await, 2);
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 4);
    assert_eq!(b.count("SELECT count(*) FROM deflection_outbox").await, 2);
    assert_eq!(b.count("SELECT count(*) FROM fallbacks").await, 1);
}

async fn twins_of_a_key_save_one_handoff(b: &Backend) {
    // Twenty requests with one key at once, each its own handoff: one is written.
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let store = b.store.clone();
            tokio::spawn(async move {
                store
                    .save(save(&format!("ho_twin_{n}"), "k-twin", true), soon())
                    .await
                    .expect("answered")
            })
        })
        .collect();
    let mut saved = 0;
    for task in tasks {
        if matches!(task.await.expect("ran"), Saved::Saved) {
            saved += 1;
        }
    }
    assert_eq!(saved, 1);
    assert_eq!(b.count("SELECT count(*) FROM handoffs").await, 1);
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 2);
    assert_eq!(b.count("SELECT count(*) FROM deflection_outbox").await, 1);
    assert_eq!(b.count("SELECT count(*) FROM fallbacks").await, 1);
}

/// Twenty carriers of one handoff written in progress (retries that took it over at once) each
/// write its outcome: one finishes it. The others write nothing, not even their events, though
/// most of them share a batch with the one that finished it.
async fn a_handoff_finished_by_several_carriers_at_once_is_finished_once(b: &Backend) {
    let intended = b
        .store
        .intend(intent("ho_carried", "k-carried", PHONE))
        .await
        .expect("written");
    assert_eq!(intended, Intended::Holding);
    // Another handoff's save goes first, alone: the twenty wait for it, and leave together.
    let ahead = {
        let store = b.store.clone();
        tokio::spawn(async move { store.save(save("ho_ahead", "k-ahead", false), soon()).await })
    };
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = b.store.clone();
            let finish = Arc::new(Save {
                intended: true,
                // No fallback: its row's key would fail a batch of twins on its own.
                ..save_of("ho_carried", "k-carried", false)
            });
            tokio::spawn(async move { store.save(finish, soon()).await.expect("answered") })
        })
        .collect();
    assert!(matches!(ahead.await.expect("ran"), Ok(Saved::Saved)));
    let mut saved = 0;
    for task in tasks {
        if matches!(task.await.expect("ran"), Saved::Saved) {
            saved += 1;
        }
    }
    assert_eq!(saved, 1);
    let loaded = b.store.load("acme", "ho_carried").await.expect("read");
    assert_eq!(loaded.map(|h| h.status), Some(HandoffStatus::Sent));
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, 2 + 2);
    assert_eq!(
        b.count("SELECT count(*) FROM deflection_outbox").await,
        1 + 1
    );
}

async fn a_key_replays_its_handoff_with_the_fingerprint_it_was_made_with(b: &Backend) {
    let store = &b.store;
    let saved = save("ho_1", "k-1", false);
    store.save(saved.clone(), soon()).await.expect("saved");
    let (fingerprint, handoff) = store
        .replay("acme", "k-1")
        .await
        .expect("looked up")
        .expect("the key holds a handoff");
    assert_eq!(fingerprint, b"fp-k-1");
    assert_eq!(handoff, saved.handoff);
    assert!(
        store
            .replay("acme", "k-2")
            .await
            .expect("looked up")
            .is_none()
    );
    assert!(
        store
            .replay("other", "k-1")
            .await
            .expect("looked up")
            .is_none()
    );
}

async fn an_intent_holds_its_key_and_its_consumer_until_it_sends_nothing(b: &Backend) {
    let store = &b.store;
    let first = store
        .intend(intent("ho_first", "k-first", PHONE))
        .await
        .expect("written");
    assert_eq!(first, Intended::Holding);
    assert_eq!(
        store
            .intend(intent("ho_second", "k-second", PHONE))
            .await
            .expect("written"),
        Intended::ConsumerHeld("ho_first".into())
    );
    assert_eq!(
        store
            .intend(intent("ho_twin", "k-first", "+447700900999"))
            .await
            .expect("answered"),
        Intended::KeyTaken
    );
    assert_eq!(
        store
            .intend(intent("ho_first", "k-first", PHONE))
            .await
            .expect("written"),
        Intended::Holding,
        "its own retry"
    );
    assert_eq!(
        b.count("SELECT count(*) FROM handoffs WHERE status = 'HANDOFF_STATUS_IN_PROGRESS'")
            .await,
        2,
        "ho_first and ho_second (to be skipped); not the twin"
    );

    // ho_first's every channel failed: written over its row, the consumer given back.
    let finished = |status, release_consumer| {
        Arc::new(Save {
            handoff: StoredHandoff {
                status,
                ..intent("ho_first", "k-first", PHONE).handoff.clone()
            },
            idempotency_key: "k-first".into(),
            fingerprint: b"k-first".to_vec(),
            events: Vec::new(),
            fallback: None,
            deflection: None,
            intended: true,
            release_consumer,
        })
    };
    assert!(matches!(
        store
            .save(finished(HandoffStatus::Failed, true), soon())
            .await,
        Ok(Saved::Saved)
    ));
    assert!(
        matches!(
            store
                .save(finished(HandoffStatus::Sent, false), soon())
                .await,
            Ok(Saved::Raced)
        ),
        "a finished handoff is not finished twice"
    );
    let loaded = store.load("acme", "ho_first").await.expect("read");
    assert_eq!(loaded.map(|h| h.status), Some(HandoffStatus::Failed));
    assert_eq!(
        store
            .intend(intent("ho_third", "k-third", PHONE))
            .await
            .expect("written"),
        Intended::Holding,
        "the consumer is free again"
    );
}

async fn one_of_many_intents_for_a_consumer_holds_them(b: &Backend) {
    let tasks: Vec<_> = (0..20)
        .map(|n| {
            let store = b.store.clone();
            tokio::spawn(async move {
                let id = format!("ho_{n}");
                let outcome = store
                    .intend(intent(&id, &format!("k-{n}"), PHONE))
                    .await
                    .expect("written");
                (id, outcome)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.expect("ran"));
    }
    let holders: Vec<&String> = outcomes
        .iter()
        .filter(|(_, o)| *o == Intended::Holding)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(holders.len(), 1, "{outcomes:?}");
    for (id, outcome) in &outcomes {
        if id != holders[0] {
            assert_eq!(*outcome, Intended::ConsumerHeld(holders[0].clone()));
        }
    }
}

async fn handoffs_left_in_progress_are_found_and_recent_ones_counted(b: &Backend) {
    let store = &b.store;
    let old = |id: &str, key: &str, phone: &str| {
        let mut written = intent_of(id, key, phone);
        written.handoff.created_at = now() - chrono::Duration::seconds(30);
        Arc::new(written)
    };
    store
        .intend(old("ho_stuck", "k-stuck", PHONE))
        .await
        .expect("written");
    store
        .intend(old("ho_done", "k-done", "+447700900456"))
        .await
        .expect("written");
    store
        .intend(intent("ho_new", "k-new", "+447700900789"))
        .await
        .expect("written");
    store
        .save(
            Arc::new(Save {
                intended: true,
                release_consumer: true,
                handoff: StoredHandoff {
                    status: HandoffStatus::Failed,
                    ..old("ho_done", "k-done", "+447700900456").handoff.clone()
                },
                ..save_of("ho_done", "k-done", false)
            }),
            soon(),
        )
        .await
        .expect("saved");
    let abandoned = store
        .abandoned(Duration::from_secs(10), 10)
        .await
        .expect("listed");
    assert_eq!(
        abandoned
            .iter()
            .map(|(id, _, request)| (id.as_str(), request.as_slice()))
            .collect::<Vec<_>>(),
        [("ho_stuck", b"request".as_slice())],
        "left in progress for longer than 10 s, with the request to finish it from"
    );
    let mut recent: Vec<_> = store
        .recent("acme", Duration::from_secs(3600))
        .await
        .expect("listed")
        .into_iter()
        .map(|r| {
            (
                r.handoff_id,
                r.holds_consumer,
                r.age >= Duration::from_secs(29),
            )
        })
        .collect();
    recent.sort();
    assert_eq!(
        recent,
        [
            ("ho_done".to_owned(), false, true),
            ("ho_new".to_owned(), true, false),
            ("ho_stuck".to_owned(), true, true),
        ]
    );
    let last_ten = store
        .recent("acme", Duration::from_secs(10))
        .await
        .expect("listed");
    assert_eq!(last_ten.len(), 1);
}

async fn a_fallback_is_claimed_by_one_round_and_recorded_once(b: &Backend) {
    let store = &b.store;
    store
        .save(save("ho_fb", "k-fb", true), soon())
        .await
        .expect("saved");
    let lease = Duration::from_secs(30);
    let first = store.claim_fallbacks(10, lease).await.expect("claims");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].message_id, "ho_fb-1");
    assert_eq!(first[0].window_seconds, Some(60));
    assert_eq!(
        first[0].remaining,
        serde_json::json!([{"channel": "CHANNEL_SMS"}])
    );
    assert!(
        store
            .claim_fallbacks(10, lease)
            .await
            .expect("claims")
            .is_empty()
    );

    // The first round's lease runs out (it died mid-send): another takes the row over.
    store
        .retry_fallback_in("ho_fb", Duration::ZERO)
        .await
        .expect("rescheduled");
    let second = store.claim_fallbacks(10, lease).await.expect("claims");
    assert_eq!(second.len(), 1);

    let fell = |due| {
        let mut handoff = save("ho_fb", "k-fb", false).handoff.clone();
        handoff.status = HandoffStatus::Failed;
        Fell {
            events: vec![pb::Event {
                handoff_id: "ho_fb".into(),
                ..outbox::event("acme", FunnelStage::Failed)
            }],
            due,
            attempts_before: 1,
            handoff,
            deflection: None,
            next: None,
        }
    };
    let before = b.count("SELECT count(*) FROM outbox").await;
    assert!(
        store
            .record_fallback(&fell(second.into_iter().next().expect("one")))
            .await
            .expect("recorded")
    );
    assert!(
        !store
            .record_fallback(&fell(first.into_iter().next().expect("one")))
            .await
            .expect("checked")
    );
    assert_eq!(b.count("SELECT count(*) FROM outbox").await, before + 1);
    assert_eq!(b.count("SELECT count(*) FROM fallbacks").await, 0);
    let loaded = store.load("acme", "ho_fb").await.expect("read");
    assert_eq!(loaded.map(|h| h.status), Some(HandoffStatus::Failed));
}

async fn a_fallback_is_looked_at_again_by_its_deadline(b: &Backend) {
    let store = &b.store;
    let late = save_of("ho_late", "k-late", true);
    let due_now = Arc::new(Save {
        fallback: Some(Fallback {
            deadline: Some(now() - chrono::Duration::seconds(1)),
            ..late.fallback.clone().expect("one")
        }),
        ..late
    });
    store.save(due_now, soon()).await.expect("saved");
    store
        .save(save("ho_open", "k-open", true), soon())
        .await
        .expect("saved");
    let claimed = store
        .claim_fallbacks(10, Duration::from_secs(30))
        .await
        .expect("claims");
    assert_eq!(claimed.len(), 2);
    // Nothing reported yet: both wait, but never past a deadline.
    store
        .wait_fallbacks(&["ho_late".into(), "ho_open".into()])
        .await
        .expect("waits");
    let again = store
        .claim_fallbacks(10, Duration::from_secs(30))
        .await
        .expect("claims");
    assert_eq!(
        again
            .iter()
            .map(|d| d.handoff_id.as_str())
            .collect::<Vec<_>>(),
        ["ho_late"],
        "the one past its deadline is due at once, the other after a pause"
    );
    store
        .drop_fallbacks(&["ho_late".into(), "ho_open".into()])
        .await
        .expect("dropped");
    assert_eq!(b.count("SELECT count(*) FROM fallbacks").await, 0);
}

async fn a_late_report_confirms_an_unanswered_send(b: &Backend) {
    let store = &b.store;
    let mut unanswered = save_of("ho_u", "k-u", true);
    unanswered.handoff.attempts[0].outcome = AttemptOutcome::Unconfirmed;
    unanswered.handoff.attempts[0].provider_message_id = String::new();
    if let Some(f) = unanswered.fallback.as_mut() {
        f.confirm_by = Some(now() + chrono::Duration::seconds(30));
    }
    store
        .save(Arc::new(unanswered), soon())
        .await
        .expect("saved");
    store
        .confirm_send("ho_u", "ho_u-1", "SM-late")
        .await
        .expect("confirmed");
    let attempt = store
        .load("acme", "ho_u")
        .await
        .expect("read")
        .expect("there")
        .attempts[0]
        .clone();
    assert_eq!(
        (attempt.outcome, attempt.provider_message_id.as_str()),
        (AttemptOutcome::Sent, "SM-late")
    );
    let due = store
        .claim_fallbacks(10, Duration::from_secs(30))
        .await
        .expect("claims");
    assert_eq!(due.len(), 1);
    assert_eq!(
        due[0].confirm_by, None,
        "no longer waiting for the provider"
    );
}
