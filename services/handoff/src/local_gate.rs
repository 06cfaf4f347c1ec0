//! The gate while Redis is unreachable: the same decisions, kept in this replica's memory.
//!
//! Documented bounds: each replica admits `limit / replicas` per window (rounded up), so the
//! account's total stays within its limit when `handoff.replicas` is right; the consumer lease and
//! idempotency claims here hold within one replica, and PostgreSQL's (the idempotency record and
//! the consumer lease a handoff writes before it sends) across replicas; open conversations come
//! from Routing's database.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::passage::{Ask, Decision, Passage};

/// Entries kept before expired ones are swept.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Default)]
struct State {
    admitted: HashMap<String, VecDeque<Instant>>,
    claims: HashMap<(String, String), (Instant, String)>,
    leases: HashMap<(String, String), (Instant, String)>,
}

#[derive(Debug)]
pub struct LocalGate {
    window: Duration,
    claim_ttl: Duration,
    lease: Duration,
    replicas: u32,
    started: Instant,
    state: Mutex<State>,
}

impl LocalGate {
    pub fn new(window: Duration, claim_ttl: Duration, lease: Duration, replicas: u32) -> Self {
        Self {
            window,
            claim_ttl,
            lease,
            replicas: replicas.max(1),
            started: Instant::now(),
            state: Mutex::new(State::default()),
        }
    }

    /// This replica's share of an account's limit.
    pub fn share(&self, limit: u32) -> u32 {
        limit.div_ceil(self.replicas).max(1)
    }

    pub fn pass(&self, ask: Ask<'_>, now: Instant) -> Decision {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let at_us = now.duration_since(self.started).as_micros() as i64;
        let claim = (ask.account_id.to_owned(), ask.idempotency_key.to_owned());
        let lease = (ask.account_id.to_owned(), ask.consumer.to_owned());
        if let Some((until, holder)) = state.claims.get(&claim)
            && *until > now
        {
            let handoff_id = holder.clone();
            return Decision {
                passage: Passage::Duplicate { handoff_id },
                at_us,
                local: true,
            };
        }
        if let Some((until, holder)) = state.leases.get(&lease)
            && *until > now
        {
            let handoff_id = holder.clone();
            return Decision {
                passage: Passage::ConsumerBusy { handoff_id },
                at_us,
                local: true,
            };
        }
        let share = self.share(ask.limit) as usize;
        let window = self.window;
        let log = state.admitted.entry(ask.account_id.to_owned()).or_default();
        while log
            .front()
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            log.pop_front();
        }
        if log.len() >= share {
            let oldest = *log.front().expect("a full log has a first entry");
            return Decision {
                passage: Passage::Limited {
                    retry_after: (oldest + window)
                        .saturating_duration_since(now)
                        .max(Duration::from_micros(1)),
                },
                at_us,
                local: true,
            };
        }
        log.push_back(now);
        state
            .claims
            .insert(claim, (now + self.claim_ttl, ask.handoff_id.to_owned()));
        state
            .leases
            .insert(lease, (now + self.lease, ask.handoff_id.to_owned()));
        if state.claims.len() > SWEEP_AT || state.leases.len() > SWEEP_AT {
            state.claims.retain(|_, (until, _)| *until > now);
            state.leases.retain(|_, (until, _)| *until > now);
            state
                .admitted
                .retain(|_, log| log.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        Decision {
            passage: Passage::Admitted {
                open_conversation: None,
            },
            at_us,
            local: true,
        }
    }

    /// What PostgreSQL knows of an account's last window and leases, taken in when this replica
    /// starts deciding for it from memory: the handoffs Redis admitted before it went away count
    /// against the window, and hold their consumers, here too. `admitted`: the ages of the
    /// window's admissions; `leases`: each held consumer, its handoff and what is left of its
    /// lease. What this replica decided itself is kept.
    pub fn seed(
        &self,
        account_id: &str,
        admitted: &[Duration],
        leases: &[(&str, &str, Duration)],
        now: Instant,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let log = state.admitted.entry(account_id.to_owned()).or_default();
        let mut at: Vec<Instant> = admitted
            .iter()
            .filter_map(|age| now.checked_sub(*age))
            .chain(log.drain(..))
            .collect();
        at.sort();
        log.extend(at);
        for (consumer, handoff_id, left) in leases {
            let key = (account_id.to_owned(), (*consumer).to_owned());
            let live = state
                .leases
                .get(&key)
                .is_some_and(|(until, _)| *until > now);
            if !live {
                state
                    .leases
                    .insert(key, (now + *left, (*handoff_id).to_owned()));
            }
        }
    }

    /// Forgets the claim and the lease `ask` took, where they still name its handoff.
    pub fn release(&self, ask: Ask<'_>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let claim = (ask.account_id.to_owned(), ask.idempotency_key.to_owned());
        if state
            .claims
            .get(&claim)
            .is_some_and(|(_, holder)| holder == ask.handoff_id)
        {
            state.claims.remove(&claim);
        }
        drop(state);
        self.release_lease(ask.account_id, ask.consumer, ask.handoff_id);
    }

    /// Forgets the consumer's lease where it still names `handoff_id`.
    pub fn release_lease(&self, account_id: &str, consumer: &str, handoff_id: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let lease = (account_id.to_owned(), consumer.to_owned());
        if state
            .leases
            .get(&lease)
            .is_some_and(|(_, holder)| holder == handoff_id)
        {
            state.leases.remove(&lease);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-second window, one-minute claims, ten-second leases, over `replicas` replicas.
    fn gate(replicas: u32) -> LocalGate {
        LocalGate::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(10),
            replicas,
        )
    }

    fn ask<'a>(id: &'a str, consumer: &'a str) -> Ask<'a> {
        Ask {
            account_id: "acme",
            handoff_id: id,
            idempotency_key: id,
            consumer,
            limit: 10,
        }
    }

    #[test]
    fn each_replica_admits_its_share_per_window() {
        let gate = gate(2);
        let start = Instant::now();
        let ids: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
        let admitted = ids
            .iter()
            .filter(|id| {
                matches!(
                    gate.pass(ask(id, id), start).passage,
                    Passage::Admitted { .. }
                )
            })
            .count();
        assert_eq!(admitted, 5, "half of 10");
        match gate
            .pass(ask("late", "late"), start + Duration::from_millis(400))
            .passage
        {
            Passage::Limited { retry_after } => assert_eq!(retry_after, Duration::from_millis(600)),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            gate.pass(ask("next", "next"), start + Duration::from_secs(1))
                .passage,
            Passage::Admitted { .. }
        ));
    }

    #[test]
    fn claims_and_leases_hold_until_they_expire() {
        let gate = gate(1);
        let start = Instant::now();
        assert!(matches!(
            gate.pass(ask("h1", "+1"), start).passage,
            Passage::Admitted { .. }
        ));
        assert_eq!(
            gate.pass(ask("h1", "+2"), start).passage,
            Passage::Duplicate {
                handoff_id: "h1".into()
            }
        );
        assert_eq!(
            gate.pass(ask("h2", "+1"), start).passage,
            Passage::ConsumerBusy {
                handoff_id: "h1".into()
            }
        );
        assert!(matches!(
            gate.pass(ask("h3", "+1"), start + Duration::from_secs(11))
                .passage,
            Passage::Admitted { .. }
        ));
    }

    #[test]
    fn a_release_frees_only_what_the_handoff_still_holds() {
        let gate = gate(1);
        let start = Instant::now();
        assert!(matches!(
            gate.pass(ask("h1", "+1"), start).passage,
            Passage::Admitted { .. }
        ));
        // Another handoff's release takes nothing of h1's.
        gate.release(ask("h2", "+1"));
        assert_eq!(
            gate.pass(ask("h3", "+1"), start).passage,
            Passage::ConsumerBusy {
                handoff_id: "h1".into()
            }
        );
        gate.release(ask("h1", "+1"));
        assert!(matches!(
            gate.pass(ask("h1", "+1"), start).passage,
            Passage::Admitted { .. }
        ));
    }

    /// What Redis admitted before it went away, taken in from PostgreSQL, holds here: the
    /// consumer a handoff messaged is busy, and the window's admissions count.
    #[test]
    fn what_postgresql_knew_counts_once_taken_in() {
        let gate = gate(1);
        let now = Instant::now();
        let admitted = vec![Duration::from_millis(100); 9];
        gate.seed(
            "acme",
            &admitted,
            &[("+14155550123", "ho_redis", Duration::from_secs(5))],
            now,
        );
        assert_eq!(
            gate.pass(ask("h1", "+14155550123"), now).passage,
            Passage::ConsumerBusy {
                handoff_id: "ho_redis".into()
            }
        );
        assert!(matches!(
            gate.pass(ask("h2", "+14155550124"), now).passage,
            Passage::Admitted { .. }
        ));
        assert!(
            matches!(
                gate.pass(ask("h3", "+14155550125"), now).passage,
                Passage::Limited { .. }
            ),
            "nine taken in and one here fill a limit of ten"
        );
    }
}
