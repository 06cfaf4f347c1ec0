//! What the services coordinate through besides their databases: the one-step gate a handoff
//! passes (idempotency claim, consumer lease, rate limit, open-conversation lease) and the
//! open-conversation leases Routing writes for it.
//!
//! Two backends, one contract ([`Coordination`]), checked by one conformance suite
//! (`tests/coordination.rs`) run against both:
//! - [`RedisCoordination`]: one Lua script per handoff on a Redis shared by every replica; what
//!   production runs.
//! - [`InProcess`]: the same decisions in this process's memory, for a single process (`c2m dev`
//!   without Redis), and for a Handoff replica deciding alone while Redis is unreachable.
//!
//! Both start out not knowing an account's window (Redis after a loss, memory after a restart):
//! [`Coordination::admit`] answers `None` until the window is filled in from the store's recent
//! handoffs ([`Coordination::fill_in`]), so a restart or a loss never resets a rate limit.

mod memory;
mod redis;

use std::{sync::Arc, time::Duration};

use c2m_runtime::Probe;

pub use memory::InProcess;
pub use redis::RedisCoordination;

/// What one handoff asks the gate.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub account_id: &'a str,
    pub handoff_id: &'a str,
    pub idempotency_key: &'a str,
    /// The consumer's phone number, E.164.
    pub consumer: &'a str,
    /// The account's limit: admissions per window.
    pub limit: u32,
}

/// What the gate decided for one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passage {
    /// Admitted; the consumer's open conversation, if its lease names one.
    Admitted { open_conversation: Option<String> },
    /// The idempotency key was claimed before, by this handoff (in flight or done).
    Duplicate { handoff_id: String },
    /// Another handoff holds this consumer's lease.
    ConsumerBusy { handoff_id: String },
    /// Over the account's limit: a slot frees after `retry_after`.
    Limited { retry_after: Duration },
}

/// One gate decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub passage: Passage,
    /// When it was decided, in microseconds on the backend's clock (the Redis server's; this
    /// process's): comparable between decisions of one backend, and the clock the window uses.
    pub at_us: i64,
    /// Made in one replica's memory while the shared backend was away: its consumer lease and
    /// idempotency claim hold in that replica only.
    pub local: bool,
}

/// The gate's durations, the same for every handoff of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    /// The sliding rate-limit window.
    pub window: Duration,
    /// How long an idempotency claim lasts (the store's record covers the rest).
    pub claim_ttl: Duration,
    /// How long an admitted handoff holds its consumer.
    pub consumer_lease: Duration,
    /// How long an account's window stays known after its last admission.
    pub known_for: Duration,
}

/// An admission the store knows of: its handoff, and how long ago it was admitted.
#[derive(Debug, Clone, Copy)]
pub struct Admitted<'a> {
    pub handoff_id: &'a str,
    pub age: Duration,
}

/// A consumer lease the store knows of: the consumer, the handoff holding it, and what is left.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    pub consumer: &'a str,
    pub handoff_id: &'a str,
    pub left: Duration,
}

/// Why a backend could not answer (the caller then decides without it).
#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// The contract both backends keep (see the module's documentation).
#[async_trait::async_trait]
pub trait Coordination: std::fmt::Debug + Send + Sync + 'static {
    /// Decides one handoff in one step, in this order: an idempotency key claimed before is a
    /// duplicate; a consumer held by another handoff (and with no open conversation) is busy; a
    /// full window is limited (with the time until its oldest admission leaves it); otherwise
    /// the handoff is admitted: it joins the window, claims the key for `claim_ttl` and, unless
    /// the consumer has an open conversation, holds the consumer for `consumer_lease`. `None`
    /// when the account's window is not known: nothing was decided; fill it in, then ask again.
    async fn admit(
        &self,
        ask: Ask<'_>,
        terms: Terms,
    ) -> Result<Option<Decision>, CoordinationError>;

    /// Takes in what the store knows of an account's last window and its consumers' leases,
    /// and marks the window known for `terms.known_for`. Admissions and leases already held
    /// are kept.
    async fn fill_in(
        &self,
        account_id: &str,
        terms: Terms,
        admitted: &[Admitted<'_>],
        leases: &[Held<'_>],
    ) -> Result<(), CoordinationError>;

    /// Gives back the idempotency claim (when a key is given) and the consumer's lease, each
    /// only where it still names `handoff_id`. The rate-limit slot stays taken.
    async fn release(
        &self,
        account_id: &str,
        handoff_id: &str,
        idempotency_key: Option<&str>,
        consumer: &str,
    ) -> Result<(), CoordinationError>;

    /// Writes the consumer's open-conversation lease for `ttl`, or removes it (`None`).
    async fn set_conversation(
        &self,
        account_id: &str,
        consumer: &str,
        conversation_id: Option<&str>,
        ttl: Duration,
    ) -> Result<(), CoordinationError>;

    /// A health probe, for a backend that can be unreachable.
    fn probe(&self) -> Option<Arc<dyn Probe>>;
}
