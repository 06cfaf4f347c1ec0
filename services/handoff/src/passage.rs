//! What a handoff asks the gate and what the gate decides, whichever decides it: Redis (`gate`)
//! or this replica's memory while Redis is away (`local_gate`).

use std::time::Duration;

/// What the gate decided for one handoff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Passage {
    /// Admitted; the consumer's open conversation, if the lease names one.
    Admitted { open_conversation: Option<String> },
    /// The idempotency key was claimed before by this handoff (in flight or done).
    Duplicate { handoff_id: String },
    /// Another handoff holds this consumer's lease.
    ConsumerBusy { handoff_id: String },
    /// Over the account's limit: a slot frees after `retry_after`.
    Limited { retry_after: Duration },
}

/// One gate decision, with the Redis server's time it was made at (microseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub passage: Passage,
    pub at_us: i64,
    /// Made in this replica's memory (Redis away): its consumer lease holds in this replica only.
    pub local: bool,
}

/// What one handoff asks the gate.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub account_id: &'a str,
    pub handoff_id: &'a str,
    pub idempotency_key: &'a str,
    pub consumer: &'a str,
    pub limit: u32,
}
