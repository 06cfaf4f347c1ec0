//! The gate every handoff passes before anything is sent: one step on the shared coordination
//! backend (Redis in production: one script, one round trip; this process's memory in `c2m dev`)
//! that claims the idempotency key, takes the consumer's handoff lease, applies the account's
//! rate limit (an exact sliding window) and reads the consumer's open-conversation lease. The
//! contract and both backends are in `c2m_storage::coordination`.
//!
//! What this module adds is what happens around the backend:
//! - **A window the backend does not know** (Redis lost its data, a `c2m dev` restarted) is first
//!   filled in from PostgreSQL's handoffs of the last window, and their consumers' leases; so is
//!   an account this replica admitted from memory while Redis was unreachable, once it answers
//!   again. The limit then holds across the loss, except for handoffs admitted in the moment
//!   before it that had not yet been written (at most the account's handoffs in flight then).
//! - **A backend that does not answer**: the replica decides in its own memory (the same
//!   decisions, with its share of each account's limit), having first taken in PostgreSQL's view
//!   of the account. The consumer's lease and the idempotency key have their own record in
//!   PostgreSQL (see `store`).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub use c2m_storage::coordination::{Ask, Decision, Passage};
use c2m_storage::{
    coordination::{Admitted, Coordination, CoordinationError, Held, InProcess, Terms},
    redis::Breaker,
};

use crate::store::{HandoffStore, Recent};

/// How long an account's window stays known after its last admission.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// How long an idempotency claim lasts. PostgreSQL keeps idempotency records for 24 hours; the
/// gate only has to cover the moments before the first request commits (which includes a save
/// retried while PostgreSQL was away: see `Service::commit`).
pub const CLAIM_TTL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Gate {
    shared: Arc<dyn Coordination>,
    /// Where the handoffs of the last window are read from when the backend does not know them.
    store: Arc<dyn HandoffStore>,
    terms: Terms,
    /// How many replicas share an account's limit while each decides alone.
    replicas: u32,
    /// Accounts this replica admitted from memory, and when it last did: the shared backend does
    /// not know of those admissions, so their windows are filled in once it answers again.
    decided_here: Arc<Mutex<HashMap<String, Instant>>>,
    /// Accounts whose recent handoffs this replica took in from PostgreSQL since the backend
    /// went away; forgotten when it answers again (the next outage takes them in afresh).
    seeded: Arc<Mutex<HashSet<String>>>,
    /// One lock per account, held while it is taken in, so that the account's decisions that
    /// come meanwhile wait for it rather than pass on a memory that does not yet know what the
    /// backend admitted. Per account: another account's decisions do not wait behind it (with
    /// PostgreSQL down too, each taking-in waits out a connection timeout).
    seeding: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// This replica's own decisions while the shared backend is away.
    local: InProcess,
    /// After the backend fails, the gate decides locally for a second before trying it again.
    breaker: Breaker,
}

impl Gate {
    /// `replicas`: how many Handoff replicas share the account limits, for the local fallback.
    pub fn new(
        shared: Arc<dyn Coordination>,
        store: Arc<dyn HandoffStore>,
        window: Duration,
        consumer_lease: Duration,
        replicas: u32,
    ) -> Self {
        Self {
            shared,
            store,
            terms: Terms {
                window,
                claim_ttl: CLAIM_TTL,
                consumer_lease,
                known_for: KNOWN_FOR,
            },
            replicas: replicas.max(1),
            decided_here: Arc::default(),
            seeded: Arc::default(),
            seeding: Arc::default(),
            local: InProcess::new(),
            breaker: Breaker::new("handoff"),
        }
    }

    /// The decision for one handoff: from the shared backend, or from this replica's memory
    /// while it is unreachable.
    pub async fn decide(&self, ask: Ask<'_>) -> Decision {
        if !self.breaker.is_open() {
            match self.decide_exactly(ask).await {
                Ok(decision) => {
                    if self.breaker.succeeded() {
                        tracing::info!("redis is back: exact limits again");
                        lock(&self.seeded).clear();
                        lock(&self.seeding).clear();
                    }
                    return decision;
                }
                Err(error) => {
                    if self.breaker.failed() {
                        tracing::warn!(%error, "redis unavailable: deciding in this replica (degraded)");
                    }
                }
            }
        }
        lock(&self.decided_here).insert(ask.account_id.to_owned(), Instant::now());
        if !self.seeded(ask.account_id) {
            let account = lock(&self.seeding)
                .entry(ask.account_id.to_owned())
                .or_default()
                .clone();
            let _seeding = account.lock().await;
            if !self.seeded(ask.account_id) {
                self.seed_local(ask.account_id).await;
                lock(&self.seeded).insert(ask.account_id.to_owned());
            }
        }
        let share = Ask {
            limit: ask.limit.div_ceil(self.replicas).max(1),
            ..ask
        };
        let now = Instant::now();
        let decision = match self.local.admit_at(share, self.terms, now) {
            Some(decision) => decision,
            None => {
                // Known a day after the last admission: an account that passed none since.
                self.local
                    .fill_in_at(ask.account_id, self.terms, &[], &[], now);
                self.local
                    .admit_at(share, self.terms, now)
                    .expect("an account just filled in is known")
            }
        };
        Decision {
            local: true,
            ..decision
        }
    }

    /// Whether this replica took in PostgreSQL's view of the account since the backend went away.
    fn seeded(&self, account_id: &str) -> bool {
        lock(&self.seeded).contains(account_id)
    }

    /// The first decision from memory for an account since the backend went away: the handoffs
    /// it admitted until then are only there and in PostgreSQL, so this replica takes them in
    /// from PostgreSQL (its window, and the consumers they hold), or a second handoff for a
    /// consumer admitted a moment ago would message them again. Marked known whatever came of
    /// it: a PostgreSQL that does not answer is not asked again on every decision.
    async fn seed_local(&self, account_id: &str) {
        let recent = match self.recent(account_id).await {
            Ok(recent) => recent,
            Err(error) => {
                tracing::warn!(account_id, %error, "deciding from memory without postgresql's recent handoffs");
                Vec::new()
            }
        };
        let (admitted, leases) = self.known(&recent);
        tracing::info!(
            account_id,
            admissions = admitted.len(),
            leases = leases.len(),
            "deciding from memory: window and consumer leases taken in from postgresql"
        );
        self.local
            .fill_in_at(account_id, self.terms, &admitted, &leases, Instant::now());
    }

    /// The decision from the shared backend, the account's window filled in first where the
    /// backend lacks admissions: ones this replica made from memory lately, or all of them (it
    /// lost them, or never knew them). An error when the backend (or PostgreSQL, to fill a
    /// window in) cannot be reached.
    pub async fn decide_exactly(&self, ask: Ask<'_>) -> Result<Decision, GateError> {
        let here_lately = lock(&self.decided_here)
            .remove(ask.account_id)
            .is_some_and(|at| at.elapsed() < self.terms.window);
        if here_lately {
            self.fill_in(ask.account_id).await?;
        }
        if let Some(decision) = self.shared.admit(ask, self.terms).await? {
            return Ok(decision);
        }
        self.fill_in(ask.account_id).await?;
        Ok(self
            .shared
            .admit(ask, self.terms)
            .await?
            .unwrap_or(Decision {
                // Lost again at once (a flush in between): a moment's wait, not a guess.
                passage: Passage::Limited {
                    retry_after: Duration::from_millis(10),
                },
                at_us: 0,
                local: false,
            }))
    }

    /// Fills the account's window and its consumers' leases in from the handoffs PostgreSQL has
    /// of the last window and lease.
    async fn fill_in(&self, account_id: &str) -> Result<(), GateError> {
        let recent = self.recent(account_id).await?;
        let (admitted, leases) = self.known(&recent);
        tracing::info!(
            account_id,
            admissions = admitted.len(),
            leases = leases.len(),
            "rate-limit window and consumer leases filled in from postgresql"
        );
        self.shared
            .fill_in(account_id, self.terms, &admitted, &leases)
            .await?;
        Ok(())
    }

    /// The account's handoffs of the last window or lease, whichever is longer.
    async fn recent(&self, account_id: &str) -> Result<Vec<Recent>, sqlx::Error> {
        let span = self.terms.window.max(self.terms.consumer_lease);
        self.store.recent(account_id, span).await
    }

    /// Among `recent`, the window's admissions and the consumers' latest leases.
    fn known<'a>(&self, recent: &'a [Recent]) -> (Vec<Admitted<'a>>, Vec<Held<'a>>) {
        let admitted = recent
            .iter()
            .filter(|r| r.age < self.terms.window)
            .map(|r| Admitted {
                handoff_id: &r.handoff_id,
                age: r.age,
            })
            .collect();
        let lease = self.terms.consumer_lease;
        let leases = latest_leases(recent, lease)
            .into_iter()
            .map(|(consumer, held)| Held {
                consumer,
                handoff_id: &held.handoff_id,
                left: lease.saturating_sub(held.age),
            })
            .collect();
        (admitted, leases)
    }

    /// Gives back what admitting `ask` took, for a handoff that ends before anything is sent (a
    /// refused request, or a retry an earlier request's record answers): its idempotency claim,
    /// so the corrected request can use the key at once, and its consumer lease, so the next call
    /// for that consumer is not skipped in favour of a handoff that never was. Each only where it
    /// still names this handoff. The rate-limit slot stays taken: the request was made. A failed
    /// release is logged; the claim and the lease expire on their own.
    pub async fn release(&self, ask: Ask<'_>) {
        let key = Some(ask.idempotency_key);
        self.local
            .release_now(ask.account_id, ask.handoff_id, key, ask.consumer);
        if self.breaker.is_open() {
            return;
        }
        let released = self
            .shared
            .release(ask.account_id, ask.handoff_id, key, ask.consumer);
        if let Err(error) = released.await {
            tracing::warn!(%error, handoff_id = ask.handoff_id, "claim and lease not released; they expire on their own");
        }
    }

    /// Gives back the consumer's lease where it still names `handoff_id`: a handoff that sent
    /// nothing does not hold its consumer. A failed release is logged; the lease expires.
    pub async fn release_lease(&self, account_id: &str, consumer: &str, handoff_id: &str) {
        self.local
            .release_now(account_id, handoff_id, None, consumer);
        if self.breaker.is_open() {
            return;
        }
        let released = self.shared.release(account_id, handoff_id, None, consumer);
        if let Err(error) = released.await {
            tracing::warn!(%error, handoff_id, "consumer lease not released; it expires on its own");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the gate could not decide on the shared backend (it then decides in this replica).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Coordination(#[from] CoordinationError),
    #[error("reading the last window's handoffs: {0}")]
    Db(#[from] sqlx::Error),
}

/// The latest handoff that holds each consumer, among `recent`, within `lease`.
fn latest_leases(recent: &[Recent], lease: Duration) -> HashMap<&str, &Recent> {
    let mut leases: HashMap<&str, &Recent> = HashMap::new();
    for held in recent.iter().filter(|r| r.holds_consumer && r.age < lease) {
        let latest = leases.entry(held.consumer_phone.as_str()).or_insert(held);
        if held.age < latest.age {
            *latest = held;
        }
    }
    leases
}
