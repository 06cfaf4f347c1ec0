//! The coordination contract (`c2m_storage::coordination`), one suite run against every backend:
//! Redis (a test prefix on the shared server), a Redis Cluster of three primaries (the test's
//! own), and this process's memory. A backend that passes
//! here can sit behind Handoff's gate and Routing's leases.

use std::{sync::Arc, time::Duration};

use c2m_storage::{
    Coordination, InProcess, RedisCoordination, RedisHandle, RedisSettings,
    coordination::{Admitted, Ask, Decision, Held, Passage, Terms},
};
use c2m_test_support::{RedisCluster, RedisServer, TestRedis, eventually};

/// A backend under test, with what it needs kept alive.
struct Backend {
    coordination: Arc<dyn Coordination>,
    lose: Box<dyn Fn() + Send + Sync>,
    _redis: Option<TestRedis>,
    _cluster: Option<RedisCluster>,
}

impl Backend {
    async fn redis() -> Self {
        let redis = TestRedis::new().await;
        let settings = redis.settings();
        let handle = RedisHandle::new(&settings).expect("redis url");
        Self {
            coordination: Arc::new(RedisCoordination::new(handle)),
            lose: Box::new(move || delete_keys(&settings)),
            _redis: Some(redis),
            _cluster: None,
        }
    }

    async fn redis_cluster() -> Self {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start)
            .await
            .expect("the cluster starts");
        let settings = cluster.settings("c2mtest");
        let handle = RedisHandle::new(&settings).expect("cluster nodes");
        let nodes = cluster.nodes();
        Self {
            coordination: Arc::new(RedisCoordination::new(handle)),
            lose: Box::new(move || {
                for node in &nodes {
                    let url = RedisSettings {
                        url: node.clone(),
                        key_prefix: "c2mtest".into(),
                        ..RedisSettings::default()
                    };
                    delete_keys(&url);
                }
            }),
            _redis: None,
            _cluster: Some(cluster),
        }
    }

    fn in_process() -> Self {
        let memory = InProcess::new();
        Self {
            coordination: Arc::new(memory.clone()),
            lose: Box::new(move || memory.forget()),
            _redis: None,
            _cluster: None,
        }
    }
}

/// What a Redis that lost its data looks like to this test: none of its keys.
fn delete_keys(settings: &RedisSettings) {
    let client = redis::Client::open(settings.url.as_str()).expect("url");
    let mut connection = client.get_connection().expect("connects");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", settings.key_prefix))
        .query(&mut connection)
        .expect("keys");
    if !keys.is_empty() {
        redis::cmd("DEL")
            .arg(keys)
            .exec(&mut connection)
            .expect("deleted");
    }
}

/// Every test runs once per backend.
macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::redis().await).await;
                }
            )*
        }
        mod on_redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::redis_cluster().await).await;
                }
            )*
        }
        mod in_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::in_process()).await;
                }
            )*
        }
    };
}

conformance!(
    an_unknown_window_decides_nothing_until_filled_in,
    forty_at_once_under_a_limit_of_thirty_admit_exactly_thirty,
    no_window_admits_more_than_the_limit_and_none_refuses_with_room_left,
    an_idempotency_key_and_a_consumer_pass_once,
    an_open_conversation_is_named_and_holds_no_consumer_lease,
    a_release_frees_only_what_the_handoff_still_holds,
    what_the_store_knew_counts_once_filled_in,
    claims_and_leases_expire,
    a_lost_window_is_unknown_again,
    an_admission_filled_in_again_counts_once,
);

const TERMS: Terms = Terms {
    window: Duration::from_secs(1),
    claim_ttl: Duration::from_secs(60),
    consumer_lease: Duration::from_secs(10),
    known_for: Duration::from_secs(3600),
};

fn ask<'a>(account_id: &'a str, handoff_id: &'a str, key: &'a str, consumer: &'a str) -> Ask<'a> {
    Ask {
        account_id,
        handoff_id,
        idempotency_key: key,
        consumer,
        limit: 10,
    }
}

/// The decision for a known window (filled in with nothing first when it is not known).
async fn admit(c: &dyn Coordination, ask: Ask<'_>, terms: Terms) -> Passage {
    if let Some(decision) = c.admit(ask, terms).await.expect("answers") {
        return decision.passage;
    }
    c.fill_in(ask.account_id, terms, &[], &[])
        .await
        .expect("fills in");
    c.admit(ask, terms)
        .await
        .expect("answers")
        .expect("known once filled in")
        .passage
}

fn admitted() -> Passage {
    Passage::Admitted {
        open_conversation: None,
    }
}

async fn an_unknown_window_decides_nothing_until_filled_in(b: Backend) {
    let c = &*b.coordination;
    let first = ask("acme", "h1", "k1", "+14155550001");
    assert_eq!(c.admit(first, TERMS).await.expect("answers"), None);
    assert_eq!(
        c.admit(first, TERMS).await.expect("answers"),
        None,
        "asking again claims nothing"
    );
    c.fill_in("acme", TERMS, &[], &[]).await.expect("fills in");
    let decision = c
        .admit(first, TERMS)
        .await
        .expect("answers")
        .expect("known");
    assert_eq!(decision.passage, admitted());
    assert!(!decision.local);
    assert_eq!(
        c.admit(ask("globex", "h2", "k2", "+14155550002"), TERMS)
            .await
            .expect("answers"),
        None,
        "another account's window is its own"
    );
}

async fn forty_at_once_under_a_limit_of_thirty_admit_exactly_thirty(b: Backend) {
    b.coordination
        .fill_in("acme", TERMS, &[], &[])
        .await
        .expect("fills in");
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let c = b.coordination.clone();
            tokio::spawn(async move {
                let (id, consumer) = (format!("h{i}"), format!("+1415555{i:04}"));
                let ask = Ask {
                    limit: 30,
                    ..ask("acme", &id, &id, &consumer)
                };
                c.admit(ask, TERMS).await.expect("answers").expect("known")
            })
        })
        .collect();
    let mut passages = Vec::new();
    for task in tasks {
        passages.push(task.await.expect("task").passage);
    }
    let count = |f: fn(&Passage) -> bool| passages.iter().filter(|p| f(p)).count();
    assert_eq!(count(|p| matches!(p, Passage::Admitted { .. })), 30);
    assert_eq!(count(|p| matches!(p, Passage::Limited { .. })), 10);
}

/// A small deterministic generator (SplitMix64): the schedules are random but reproducible.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

/// Requests arrive in bursts and lulls over about three windows of 200 ms, limit 7; every
/// admission and refusal is checked against the admissions around it, on the backend's clock.
async fn no_window_admits_more_than_the_limit_and_none_refuses_with_room_left(b: Backend) {
    const LIMIT: u32 = 7;
    let terms = Terms {
        window: Duration::from_millis(200),
        ..TERMS
    };
    for seed in [1, 2, 3, 42, 1234] {
        let account = format!("acct-{seed}");
        b.coordination
            .fill_in(&account, terms, &[], &[])
            .await
            .expect("fills in");
        let mut rng = Rng(seed);
        let mut offset = Duration::ZERO;
        let mut tasks = Vec::new();
        for i in 0..60u64 {
            // Mostly bursts (0–3 ms apart), sometimes a lull of up to a window.
            let gap = if rng.below(8) == 0 {
                rng.below(200)
            } else {
                rng.below(4)
            };
            offset += Duration::from_millis(gap);
            let (c, account) = (b.coordination.clone(), account.clone());
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let (id, consumer) = (format!("h{i}"), format!("+1415555{i:04}"));
                let ask = Ask {
                    limit: LIMIT,
                    ..ask(&account, &id, &id, &consumer)
                };
                c.admit(ask, terms).await.expect("answers").expect("known")
            }));
        }
        let mut decisions: Vec<Decision> = Vec::new();
        for task in tasks {
            decisions.push(task.await.expect("task"));
        }
        let admitted: Vec<i64> = decisions
            .iter()
            .filter(|d| matches!(d.passage, Passage::Admitted { .. }))
            .map(|d| d.at_us)
            .collect();
        let window = terms.window.as_micros() as i64;
        let in_window = |t: i64| {
            admitted
                .iter()
                .filter(move |a| **a > t - window && **a <= t)
        };
        assert!(!admitted.is_empty(), "seed {seed}: nothing admitted");
        for decision in &decisions {
            let at = decision.at_us;
            match decision.passage {
                // Never more than the limit in any window ending at an admission...
                Passage::Admitted { .. } => assert!(
                    in_window(at).count() <= LIMIT as usize,
                    "seed {seed}: {} admitted in the window ending at {at}",
                    in_window(at).count(),
                ),
                // ...and a refusal only when the window was full, with the wait until it is not.
                Passage::Limited { retry_after } => {
                    assert_eq!(
                        in_window(at).count(),
                        LIMIT as usize,
                        "seed {seed}: refused at {at} with room left"
                    );
                    let oldest = in_window(at).min().expect("a full window has an oldest");
                    assert_eq!(retry_after.as_micros() as i64, oldest + window - at);
                }
                ref other => panic!("seed {seed}: unexpected {other:?}"),
            }
        }
        assert!(
            decisions.len() > admitted.len(),
            "seed {seed}: the schedule never hit the limit"
        );
    }
}

async fn an_idempotency_key_and_a_consumer_pass_once(b: Backend) {
    let c = &*b.coordination;
    let passage = |id, key, consumer| admit(c, ask("acme", id, key, consumer), TERMS);
    assert_eq!(passage("h1", "k1", "+14155550001").await, admitted());
    assert_eq!(
        passage("h2", "k1", "+14155550009").await,
        Passage::Duplicate {
            handoff_id: "h1".into()
        }
    );
    assert_eq!(
        passage("h3", "k3", "+14155550001").await,
        Passage::ConsumerBusy {
            handoff_id: "h1".into()
        }
    );
    assert_eq!(passage("h4", "k4", "+14155550002").await, admitted());
}

async fn an_open_conversation_is_named_and_holds_no_consumer_lease(b: Backend) {
    let c = &*b.coordination;
    let consumer = "+14155550001";
    c.set_conversation("acme", consumer, Some("conv-1"), Duration::from_secs(60))
        .await
        .expect("written");
    let open = Passage::Admitted {
        open_conversation: Some("conv-1".into()),
    };
    assert_eq!(
        admit(c, ask("acme", "h1", "k1", consumer), TERMS).await,
        open
    );
    assert_eq!(
        admit(c, ask("acme", "h2", "k2", consumer), TERMS).await,
        open,
        "a handoff that joins an open conversation does not hold the consumer"
    );
    assert_eq!(
        admit(c, ask("globex", "h3", "k3", consumer), TERMS).await,
        admitted(),
        "the lease is the account's"
    );
    c.set_conversation("acme", consumer, None, Duration::from_secs(60))
        .await
        .expect("removed");
    assert_eq!(
        admit(c, ask("acme", "h4", "k4", consumer), TERMS).await,
        admitted()
    );
    assert_eq!(
        admit(c, ask("acme", "h5", "k5", consumer), TERMS).await,
        Passage::ConsumerBusy {
            handoff_id: "h4".into()
        }
    );
}

async fn a_release_frees_only_what_the_handoff_still_holds(b: Backend) {
    let c = &*b.coordination;
    let consumer = "+14155550001";
    assert_eq!(
        admit(c, ask("acme", "h1", "k1", consumer), TERMS).await,
        admitted()
    );
    // Another handoff's release takes nothing of h1's.
    c.release("acme", "h2", Some("k1"), consumer)
        .await
        .expect("released");
    assert_eq!(
        admit(c, ask("acme", "h3", "k1", "+14155550002"), TERMS).await,
        Passage::Duplicate {
            handoff_id: "h1".into()
        }
    );
    assert_eq!(
        admit(c, ask("acme", "h3", "k3", consumer), TERMS).await,
        Passage::ConsumerBusy {
            handoff_id: "h1".into()
        }
    );
    // The lease alone: the key stays claimed.
    c.release("acme", "h1", None, consumer)
        .await
        .expect("released");
    assert_eq!(
        admit(c, ask("acme", "h4", "k1", "+14155550002"), TERMS).await,
        Passage::Duplicate {
            handoff_id: "h1".into()
        }
    );
    assert_eq!(
        admit(c, ask("acme", "h5", "k5", consumer), TERMS).await,
        admitted()
    );
    // Both, for a handoff that ends before it sends.
    c.release("acme", "h5", Some("k5"), consumer)
        .await
        .expect("released");
    assert_eq!(
        admit(c, ask("acme", "h6", "k5", consumer), TERMS).await,
        admitted()
    );
}

/// What the store knew (Redis lost it, or the process restarted) holds once filled in: the
/// consumer a handoff messaged is busy, the window's admissions count, and what the backend
/// admitted meanwhile is kept.
async fn what_the_store_knew_counts_once_filled_in(b: Backend) {
    let c = &*b.coordination;
    assert_eq!(
        admit(c, ask("acme", "h0", "k0", "+14155550100"), TERMS).await,
        admitted()
    );
    let ids: Vec<String> = (1..=8).map(|i| format!("ho_{i}")).collect();
    let known: Vec<Admitted> = ids
        .iter()
        .map(|id| Admitted {
            handoff_id: id,
            age: Duration::from_millis(100),
        })
        .collect();
    let held = [Held {
        consumer: "+14155550123",
        handoff_id: "ho_1",
        left: Duration::from_secs(5),
    }];
    c.fill_in("acme", TERMS, &known, &held)
        .await
        .expect("fills in");
    assert_eq!(
        admit(c, ask("acme", "h1", "k1", "+14155550123"), TERMS).await,
        Passage::ConsumerBusy {
            handoff_id: "ho_1".into()
        }
    );
    assert_eq!(
        admit(c, ask("acme", "h2", "k2", "+14155550124"), TERMS).await,
        admitted()
    );
    assert!(
        matches!(
            admit(c, ask("acme", "h3", "k3", "+14155550125"), TERMS).await,
            Passage::Limited { .. }
        ),
        "one admitted before, eight filled in and one after fill a limit of ten"
    );
}

async fn claims_and_leases_expire(b: Backend) {
    let c = &*b.coordination;
    let terms = Terms {
        claim_ttl: Duration::from_millis(300),
        consumer_lease: Duration::from_millis(300),
        ..TERMS
    };
    assert_eq!(
        admit(c, ask("acme", "h1", "k1", "+14155550001"), terms).await,
        admitted()
    );
    assert_eq!(
        admit(c, ask("acme", "h2", "k2", "+14155550001"), terms).await,
        Passage::ConsumerBusy {
            handoff_id: "h1".into()
        },
        "held at first"
    );
    let mut n = 2;
    eventually("the lease and the claim to expire", Duration::from_secs(5), || {
        n += 1;
        let id = format!("h{n}");
        async move {
            admit(c, ask("acme", &id, "k1", "+14155550001"), terms).await == admitted()
        }
    })
    .await;
}

async fn a_lost_window_is_unknown_again(b: Backend) {
    let c = &*b.coordination;
    assert_eq!(
        admit(c, ask("acme", "h1", "k1", "+14155550001"), TERMS).await,
        admitted()
    );
    (b.lose)();
    assert_eq!(
        c.admit(ask("acme", "h2", "k1", "+14155550001"), TERMS)
            .await
            .expect("answers"),
        None,
        "after a loss nothing is decided until the window is filled in again"
    );
}

/// The store's recent handoffs include those the backend admitted itself (a window filled in
/// after a replica decided from memory): each counts once.
async fn an_admission_filled_in_again_counts_once(b: Backend) {
    let c = &*b.coordination;
    let limited = |id| Ask {
        limit: 2,
        ..ask("acme", id, id, id)
    };
    assert_eq!(admit(c, limited("h1"), TERMS).await, admitted());
    let again = [Admitted {
        handoff_id: "h1",
        age: Duration::from_millis(1),
    }];
    c.fill_in("acme", TERMS, &again, &[])
        .await
        .expect("fills in");
    assert_eq!(
        admit(c, limited("h2"), TERMS).await,
        admitted(),
        "h1 once and h2 fill a limit of two"
    );
    assert!(matches!(
        admit(c, limited("h3"), TERMS).await,
        Passage::Limited { .. }
    ));
}

/// Redis only: its script cache can be emptied under it (a restart, `SCRIPT FLUSH`).
#[tokio::test]
async fn the_script_is_reloaded_after_the_cache_is_emptied() {
    let server = RedisServer::start();
    let settings = RedisSettings {
        url: server.url(),
        ..RedisSettings::default()
    };
    let c = RedisCoordination::new(RedisHandle::new(&settings).expect("url"));
    assert_eq!(
        admit(&c, ask("acme", "a", "a", "+14155550001"), TERMS).await,
        admitted()
    );
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
    assert_eq!(
        admit(&c, ask("acme", "b", "b", "+14155550002"), TERMS).await,
        admitted()
    );
}

/// Redis Cluster only: the primary holding an account's window dies and its replica takes over.
/// The client finds the new primary, and the limit holds across the failover: what the replica
/// had not received yet is filled in again from what the store knows (here, the test's own list
/// of admissions, as Handoff's gate fills it in from PostgreSQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_when_a_primary_fails_over_to_its_replica() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start_with_replicas)
        .await
        .expect("the cluster starts");
    let settings = cluster.settings("c2mtest");
    let c = RedisCoordination::new(RedisHandle::new(&settings).expect("nodes"));
    let terms = Terms {
        window: Duration::from_secs(120),
        ..TERMS
    };
    let ids: Vec<String> = (0..20).map(|i| format!("h{i:02}")).collect();
    let phones: Vec<String> = (0..20).map(|i| format!("+1415555{i:04}")).collect();
    let ask = |i: usize| Ask {
        limit: 8,
        ..ask("acme", &ids[i], &ids[i], &phones[i])
    };
    c.fill_in("acme", terms, &[], &[]).await.expect("fills in");
    for i in 0..5 {
        assert_eq!(admit(&c, ask(i), terms).await, admitted());
    }
    let port = cluster.primary_of("c2mtest:{acme}:rl");
    let mut cluster = cluster;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.kill_and_fail_over(port);
        cluster
    })
    .await
    .expect("fails over");
    assert_ne!(
        cluster.primary_of("c2mtest:{acme}:rl"),
        port,
        "a new primary"
    );

    let known: Vec<Admitted> = ids[..5]
        .iter()
        .map(|id| Admitted {
            handoff_id: id,
            age: Duration::from_secs(1),
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut passages = Vec::new();
    for i in 5..12 {
        let passage = loop {
            match c.admit(ask(i), terms).await {
                Ok(Some(decision)) => break decision.passage,
                // The replica had not received the window's marker: fill it in, as the gate does.
                Ok(None) => c
                    .fill_in("acme", terms, &known, &[])
                    .await
                    .expect("fills in"),
                // The client has not found the new primary yet.
                Err(error) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no answer after the failover: {error}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        passages.push(passage);
    }
    let admitted_after = passages
        .iter()
        .filter(|p| matches!(p, Passage::Admitted { .. }))
        .count();
    assert_eq!(
        admitted_after, 3,
        "five before the failover and three after fill the limit of eight: {passages:?}"
    );
    drop(cluster);
}

/// Redis Cluster only: the slot of an account's window moves to another primary while handoffs
/// are being admitted, as `redis-cli --cluster reshard` moves it. Half-way (one of the slot's keys
/// moved, the source answering ASK and TRYAGAIN) no decision is made on part of the window: the
/// caller is turned away (the client times out retrying) and tries again; once the slot has
/// moved the client follows it, and the limit of eight holds exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_holds_while_the_accounts_slot_moves_to_another_primary() {
    use std::sync::atomic::{AtomicU64, Ordering};

    fn ask<'a>(i: usize, ids: &'a [String], phones: &'a [String]) -> Ask<'a> {
        Ask {
            limit: 8,
            ..crate::ask("acme", &ids[i], &ids[i], &phones[i])
        }
    }

    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .expect("the cluster starts");
    let settings = cluster.settings("c2mtest");
    let c = Arc::new(RedisCoordination::new(
        RedisHandle::new(&settings).expect("nodes"),
    ));
    let terms = Terms {
        window: Duration::from_secs(120),
        ..TERMS
    };
    let ids: Arc<Vec<String>> = Arc::new((0..20).map(|i| format!("h{i:02}")).collect());
    let phones: Arc<Vec<String>> = Arc::new((0..20).map(|i| format!("+1415555{i:04}")).collect());
    c.fill_in("acme", terms, &[], &[]).await.expect("fills in");
    for i in 0..3 {
        assert_eq!(admit(&*c, ask(i, &ids, &phones), terms).await, admitted());
    }
    let key = "c2mtest:{acme}:rl";
    let cluster = Arc::new(cluster);
    let migration = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start_migrating(key))
            .await
            .expect("half-way")
    };
    let (source, target) = (migration.source, migration.target);
    assert!(
        !migration.keys_left().is_empty(),
        "keys left on the source, one moved"
    );

    // Nine more callers, one after another, each trying again until Redis decides.
    let refusals = Arc::new(AtomicU64::new(0));
    let callers = {
        let (c, ids, phones, refusals) = (c.clone(), ids.clone(), phones.clone(), refusals.clone());
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut passages = Vec::new();
            for i in 3..12 {
                let passage = loop {
                    match c.admit(ask(i, &ids, &phones), terms).await {
                        Ok(Some(decision)) => break decision.passage,
                        Ok(None) => panic!("the window is known on whichever node holds it"),
                        Err(error) => {
                            refusals.fetch_add(1, Ordering::SeqCst);
                            assert!(
                                std::time::Instant::now() < deadline,
                                "no answer during the migration: {error}"
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                passages.push(passage);
            }
            passages
        })
    };
    // The slot stays half-way until a caller has been turned away by it.
    eventually(
        "a caller turned away half-way",
        Duration::from_secs(30),
        || {
            let refusals = refusals.clone();
            async move { refusals.load(Ordering::SeqCst) > 0 }
        },
    )
    .await;
    tokio::task::spawn_blocking(move || migration.finish())
        .await
        .expect("the slot moved");
    let passages = callers.await.expect("the callers finish");
    let admitted_after = passages
        .iter()
        .filter(|p| matches!(p, Passage::Admitted { .. }))
        .count();
    assert_eq!(
        admitted_after, 5,
        "three before the migration and five during and after it fill the limit of eight: {passages:?}"
    );
    assert_eq!(cluster.primary_of(key), target, "moved from {source}");
}
