//! The hot-path gate against real Redis: the rate limit is exact over random arrival schedules with
//! two gate instances (two replicas) sharing Redis, and the script survives an emptied script cache.

use std::time::Duration;

use c2m_handoff::{
    gate::{Ask, Decision, Gate, Passage},
    store::PgHandoffStore,
};
use c2m_storage::{RedisHandle, RedisSettings, ServiceDb};
use c2m_test_support::{RedisServer, TestDatabase, TestRedis};

const WINDOW: Duration = Duration::from_millis(200);
const LIMIT: u32 = 7;

/// A small deterministic generator (SplitMix64): the schedules are random but reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A gate on `settings`, filling lost windows in from `db` (Handoff's schema).
fn gate(settings: &RedisSettings, db: &ServiceDb) -> Gate {
    Gate::new(
        RedisHandle::new(settings).expect("redis url"),
        std::sync::Arc::new(PgHandoffStore::new(db.clone())),
        WINDOW,
        Duration::from_secs(10),
        1,
    )
}

/// Requests arrive in bursts and lulls over about three windows, alternating between the gates.
async fn run_schedule(gates: &[Gate; 2], seed: u64, account: &str) -> Vec<Decision> {
    let mut rng = Rng(seed);
    let mut tasks = Vec::new();
    let mut offset = Duration::ZERO;
    for i in 0..60u64 {
        // Mostly bursts (0–3 ms apart), sometimes a lull of up to a window.
        let gap = if rng.below(8) == 0 {
            rng.below(200)
        } else {
            rng.below(4)
        };
        offset += Duration::from_millis(gap);
        let gate = gates[(i % 2) as usize].clone();
        let account = account.to_owned();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let id = format!("h{i}");
            gate.decide_exactly(Ask {
                account_id: &account,
                handoff_id: &id,
                idempotency_key: &id,
                consumer: &format!("+1415555{i:04}"),
                limit: LIMIT,
            })
            .await
            .expect("redis answers")
        }));
    }
    let mut decisions = Vec::new();
    for task in tasks {
        decisions.push(task.await.expect("task"));
    }
    decisions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_window_admits_more_than_the_limit_and_none_refuses_with_room_left() {
    let database = TestDatabase::create().await;
    let db = database
        .migrated(c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR)
        .await;
    let redis = TestRedis::new().await;
    let gates = [gate(&redis.settings(), &db), gate(&redis.settings(), &db)];
    for seed in [1, 2, 3, 42, 1234] {
        let account = format!("acct-{seed}");
        let decisions = run_schedule(&gates, seed, &account).await;
        let admitted: Vec<i64> = decisions
            .iter()
            .filter(|d| matches!(d.passage, Passage::Admitted { .. }))
            .map(|d| d.at_us)
            .collect();
        let window = WINDOW.as_micros() as i64;
        let in_window = |t: i64| {
            admitted
                .iter()
                .filter(|a| **a > t - window && **a <= t)
                .count()
        };
        assert!(!admitted.is_empty(), "seed {seed}: nothing admitted");
        for decision in &decisions {
            match decision.passage {
                // Never more than the limit in any window ending at an admission...
                Passage::Admitted { .. } => assert!(
                    in_window(decision.at_us) <= LIMIT as usize,
                    "seed {seed}: {} admitted in the window ending at {}",
                    in_window(decision.at_us),
                    decision.at_us
                ),
                // ...and a refusal only when the window was full, with the wait until it is not.
                Passage::Limited { retry_after } => {
                    assert_eq!(
                        in_window(decision.at_us),
                        LIMIT as usize,
                        "seed {seed}: refused at {} with room left",
                        decision.at_us
                    );
                    let oldest = admitted
                        .iter()
                        .filter(|a| **a > decision.at_us - window && **a <= decision.at_us)
                        .min()
                        .expect("a full window has an oldest admission");
                    assert_eq!(
                        retry_after.as_micros() as i64,
                        oldest + window - decision.at_us
                    );
                }
                ref other => panic!("seed {seed}: unexpected {other:?}"),
            }
        }
        let limited = decisions.len() - admitted.len();
        assert!(limited > 0, "seed {seed}: the schedule never hit the limit");
    }
}

#[tokio::test]
async fn an_idempotency_key_and_a_consumer_pass_once() {
    let database = TestDatabase::create().await;
    let db = database
        .migrated(c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR)
        .await;
    let redis = TestRedis::new().await;
    let gate = gate(&redis.settings(), &db);
    let ask = |handoff_id: &'static str, key: &'static str, consumer: &'static str| Ask {
        account_id: "acme",
        handoff_id,
        idempotency_key: key,
        consumer,
        limit: 100,
    };
    let first = gate
        .decide_exactly(ask("h1", "k1", "+14155550001"))
        .await
        .expect("redis");
    assert_eq!(
        first.passage,
        Passage::Admitted {
            open_conversation: None
        }
    );
    let again = gate
        .decide_exactly(ask("h2", "k1", "+14155550001"))
        .await
        .expect("redis");
    assert_eq!(
        again.passage,
        Passage::Duplicate {
            handoff_id: "h1".into()
        }
    );
    let same_consumer = gate
        .decide_exactly(ask("h3", "k3", "+14155550001"))
        .await
        .expect("redis");
    assert_eq!(
        same_consumer.passage,
        Passage::ConsumerBusy {
            handoff_id: "h1".into()
        }
    );
    let other_consumer = gate
        .decide_exactly(ask("h4", "k4", "+14155550002"))
        .await
        .expect("redis");
    assert_eq!(
        other_consumer.passage,
        Passage::Admitted {
            open_conversation: None
        }
    );
}

#[tokio::test]
async fn the_script_is_reloaded_after_the_cache_is_emptied() {
    let database = TestDatabase::create().await;
    let db = database
        .migrated(c2m_handoff::SCHEMA, &c2m_handoff::MIGRATOR)
        .await;
    let server = RedisServer::start();
    let settings = RedisSettings {
        url: server.url(),
        ..RedisSettings::default()
    };
    let gate = gate(&settings, &db);
    let ask = |id: &'static str| Ask {
        account_id: "acme",
        handoff_id: id,
        idempotency_key: id,
        consumer: id,
        limit: 100,
    };
    assert!(matches!(
        gate.decide_exactly(ask("a")).await.expect("redis").passage,
        Passage::Admitted { .. }
    ));
    let client = redis::Client::open(server.url()).expect("url");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects");
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .exec_async(&mut connection)
        .await
        .expect("flushed");
    assert!(matches!(
        gate.decide_exactly(ask("b"))
            .await
            .expect("redis after NOSCRIPT")
            .passage,
        Passage::Admitted { .. }
    ));
}
