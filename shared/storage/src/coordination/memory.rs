//! [`Coordination`] in this process's memory: the same decisions as the Redis script, exact for
//! the callers that share one [`InProcess`] (every service of a `c2m dev` process; one Handoff
//! replica deciding alone while Redis is away).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use c2m_runtime::Probe;

use super::{Admitted, Ask, Coordination, CoordinationError, Decision, Held, Passage, Terms};

/// Entries a map of an account's holds before expired ones are first swept.
const SWEEP_AT: usize = 1_000;

/// Something held until a moment, naming who holds it.
type Hold = (Instant, String);

#[derive(Debug, Default)]
struct Account {
    /// Until when the window is known; never filled in, or forgotten: `None`.
    known_until: Option<Instant>,
    /// Admissions, oldest first: when, in microseconds on the backend's clock (as Redis scores
    /// them: the same arithmetic, the same answers), and the handoff (each counts once).
    window: VecDeque<(i64, String)>,
    claims: HashMap<String, Hold>,
    leases: HashMap<String, Hold>,
    conversations: HashMap<String, Hold>,
    /// The size past which the maps are swept next (see [`Account::sweep`]).
    sweep_at: usize,
}

impl Account {
    fn live<'a>(map: &'a HashMap<String, Hold>, key: &str, now: Instant) -> Option<&'a str> {
        map.get(key)
            .filter(|(until, _)| *until > now)
            .map(|(_, holder)| holder.as_str())
    }

    /// Drops expired entries once a map has grown past `sweep_at`, then lets it grow to twice
    /// what is left before the next sweep: the cost stays constant per entry however many are
    /// live (at 1,000 handoffs a second an account holds 60,000 live one-minute claims, which a
    /// sweep on every admission would walk every time).
    fn sweep(&mut self, now: Instant) {
        let sweep_at = self.sweep_at.max(SWEEP_AT);
        let maps = [&mut self.claims, &mut self.leases, &mut self.conversations];
        if maps.iter().all(|map| map.len() <= sweep_at) {
            return;
        }
        let mut largest = 0;
        for map in maps {
            map.retain(|_, (until, _)| *until > now);
            largest = largest.max(map.len());
        }
        self.sweep_at = (2 * largest).max(SWEEP_AT);
    }
}

fn micros(duration: Duration) -> i64 {
    duration.as_micros().try_into().unwrap_or(i64::MAX)
}

/// What the backend holds, behind one lock.
#[derive(Debug, Default)]
struct Memory {
    accounts: HashMap<String, Account>,
    /// The latest time a decision was made at: decisions are made in the order they take the
    /// lock, and their times must follow that order (as Redis reads its clock inside the
    /// script), or an admission made later could carry an earlier time than one in the window.
    clock: Option<Instant>,
}

/// The in-process backend. Cloning shares the memory.
#[derive(Debug, Clone)]
pub struct InProcess {
    memory: Arc<Mutex<Memory>>,
    /// Where its clock (`Decision::at_us`) starts.
    epoch: Instant,
}

impl Default for InProcess {
    fn default() -> Self {
        Self {
            memory: Arc::default(),
            epoch: Instant::now(),
        }
    }
}

impl InProcess {
    pub fn new() -> Self {
        Self::default()
    }

    /// `at` on this backend's clock, in microseconds.
    fn micros(&self, at: Instant) -> i64 {
        micros(at.duration_since(self.epoch))
    }

    /// Runs `f` on the account under the lock, with the time it runs at: `now`, or the latest
    /// time already used if `now` is earlier (a caller that read the clock, then waited for the
    /// lock behind a later one).
    fn with_account<T>(
        &self,
        account_id: &str,
        now: Instant,
        f: impl FnOnce(&mut Account, Instant) -> T,
    ) -> T {
        let mut memory = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let now = memory.clock.map_or(now, |latest| latest.max(now));
        memory.clock = Some(now);
        f(
            memory.accounts.entry(account_id.to_owned()).or_default(),
            now,
        )
    }

    /// [`Coordination::admit`] at `now`.
    pub fn admit_at(&self, ask: Ask<'_>, terms: Terms, now: Instant) -> Option<Decision> {
        self.with_account(ask.account_id, now, |account, now| {
            let at_us = self.micros(now);
            let decided = |passage| {
                Some(Decision {
                    passage,
                    at_us,
                    local: false,
                })
            };
            if account.known_until.is_none_or(|until| until <= now) {
                return None;
            }
            if let Some(holder) = Account::live(&account.claims, ask.idempotency_key, now) {
                let handoff_id = holder.to_owned();
                return decided(Passage::Duplicate { handoff_id });
            }
            let conversation =
                Account::live(&account.conversations, ask.consumer, now).map(str::to_owned);
            if conversation.is_none()
                && let Some(holder) = Account::live(&account.leases, ask.consumer, now)
            {
                let handoff_id = holder.to_owned();
                return decided(Passage::ConsumerBusy { handoff_id });
            }
            let window = micros(terms.window);
            while account
                .window
                .front()
                .is_some_and(|(at, _)| *at <= at_us - window)
            {
                account.window.pop_front();
            }
            if account.window.len() >= ask.limit as usize {
                let oldest = account.window.front().map_or(at_us, |(at, _)| *at);
                let wait = (oldest + window - at_us).max(1);
                let retry_after = Duration::from_micros(wait as u64);
                return decided(Passage::Limited { retry_after });
            }
            account.known_until = Some(now + terms.known_for);
            let handoff_id = ask.handoff_id.to_owned();
            account.window.push_back((at_us, handoff_id.clone()));
            if conversation.is_none() {
                let lease = (now + terms.consumer_lease, handoff_id.clone());
                account.leases.insert(ask.consumer.to_owned(), lease);
            }
            let claim = (now + terms.claim_ttl, handoff_id);
            account.claims.insert(ask.idempotency_key.to_owned(), claim);
            account.sweep(now);
            decided(Passage::Admitted {
                open_conversation: conversation,
            })
        })
    }

    /// [`Coordination::fill_in`] at `now`.
    pub fn fill_in_at(
        &self,
        account_id: &str,
        terms: Terms,
        admitted: &[Admitted<'_>],
        leases: &[Held<'_>],
        now: Instant,
    ) {
        self.with_account(account_id, now, |account, now| {
            let now_us = self.micros(now);
            let mut window: Vec<(i64, String)> = account.window.drain(..).collect();
            let known: HashSet<String> = window.iter().map(|(_, id)| id.clone()).collect();
            window.extend(
                admitted
                    .iter()
                    .filter(|a| !known.contains(a.handoff_id))
                    .map(|a| (now_us - micros(a.age), a.handoff_id.to_owned())),
            );
            window.sort();
            account.window.extend(window);
            for held in leases {
                if Account::live(&account.leases, held.consumer, now).is_none() {
                    account.leases.insert(
                        held.consumer.to_owned(),
                        (now + held.left, held.handoff_id.to_owned()),
                    );
                }
            }
            account.known_until = Some(now + terms.known_for);
        });
    }

    /// [`Coordination::release`].
    pub fn release_now(
        &self,
        account_id: &str,
        handoff_id: &str,
        idempotency_key: Option<&str>,
        consumer: &str,
    ) {
        let held_by = |map: &mut HashMap<String, Hold>, key: &str| {
            if map.get(key).is_some_and(|(_, holder)| holder == handoff_id) {
                map.remove(key);
            }
        };
        self.with_account(account_id, Instant::now(), |account, _| {
            held_by(&mut account.leases, consumer);
            if let Some(key) = idempotency_key {
                held_by(&mut account.claims, key);
            }
        });
    }

    /// Forgets every account's window (what Redis does when it loses its data); leases and
    /// claims go with it.
    pub fn forget(&self) {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accounts
            .clear();
    }
}

#[async_trait::async_trait]
impl Coordination for InProcess {
    async fn admit(
        &self,
        ask: Ask<'_>,
        terms: Terms,
    ) -> Result<Option<Decision>, CoordinationError> {
        Ok(self.admit_at(ask, terms, Instant::now()))
    }

    async fn fill_in(
        &self,
        account_id: &str,
        terms: Terms,
        admitted: &[Admitted<'_>],
        leases: &[Held<'_>],
    ) -> Result<(), CoordinationError> {
        self.fill_in_at(account_id, terms, admitted, leases, Instant::now());
        Ok(())
    }

    async fn release(
        &self,
        account_id: &str,
        handoff_id: &str,
        idempotency_key: Option<&str>,
        consumer: &str,
    ) -> Result<(), CoordinationError> {
        self.release_now(account_id, handoff_id, idempotency_key, consumer);
        Ok(())
    }

    async fn set_conversation(
        &self,
        account_id: &str,
        consumer: &str,
        conversation_id: Option<&str>,
        ttl: Duration,
    ) -> Result<(), CoordinationError> {
        self.with_account(
            account_id,
            Instant::now(),
            |account, now| match conversation_id {
                Some(id) => {
                    account
                        .conversations
                        .insert(consumer.to_owned(), (now + ttl, id.to_owned()));
                    account.sweep(now);
                }
                None => {
                    account.conversations.remove(consumer);
                }
            },
        );
        Ok(())
    }

    fn probe(&self) -> Option<Arc<dyn Probe>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERMS: Terms = Terms {
        window: Duration::from_secs(1),
        claim_ttl: Duration::from_secs(60),
        consumer_lease: Duration::from_secs(60),
        known_for: Duration::from_secs(3600),
    };

    /// Expired claims and leases go, live ones stay, and the maps are walked once per doubling,
    /// not once per admission, while thousands are live.
    #[test]
    fn expired_holds_are_swept_and_live_ones_kept() {
        let memory = InProcess::new();
        let start = Instant::now();
        memory.fill_in_at("acme", TERMS, &[], &[], start);
        let ids: Vec<String> = (0..3_000).map(|i| format!("h{i}")).collect();
        let admit = |i: usize, at: Instant| {
            let ask = Ask {
                account_id: "acme",
                handoff_id: &ids[i],
                idempotency_key: &ids[i],
                consumer: &ids[i],
                limit: u32::MAX,
            };
            memory.admit_at(ask, TERMS, at)
        };
        for i in 0..1_500 {
            assert!(admit(i, start).is_some());
        }
        let sizes = |m: &InProcess| {
            let memory = m.memory.lock().expect("lock");
            let account = &memory.accounts["acme"];
            (account.claims.len(), account.sweep_at)
        };
        // The first sweep, past 1,000, found all of them live: the next waits for twice as many.
        assert_eq!(sizes(&memory), (1_500, 2_002));
        // A minute later those have expired. Past 2,002 the sweep drops them (503 live are
        // left), then lets the map grow again to twice what it keeps.
        let later = start + Duration::from_secs(61);
        for i in 1_500..3_000 {
            assert!(admit(i, later).is_some());
        }
        assert_eq!(sizes(&memory), (1_500, 2_014), "only the live ones kept");
        assert!(
            admit(0, later).is_some(),
            "an expired claim no longer holds its key"
        );
        assert_eq!(sizes(&memory).0, 1_501);
    }
}
