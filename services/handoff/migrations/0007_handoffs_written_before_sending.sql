-- A handoff that will send is written before its first message goes, with its idempotency record
-- and status HANDOFF_STATUS_IN_PROGRESS; its outcome is written over it. A crash, or a gateway
-- that does not answer, leaves a row that a retry with the same key finishes (its message ids
-- are the handoff's, and the gateway never sends an id twice) instead of a new handoff that
-- would message the consumer again.

-- Found by the sweep that finishes handoffs no retry came for (rows leave the index as their
-- outcome is written).
CREATE INDEX handoffs_in_progress ON handoffs (created_at)
    WHERE status = 'HANDOFF_STATUS_IN_PROGRESS';
-- The handoff's CreateHandoffRequest (encoded) while it is in progress: if the IVR never retries
-- (the call ended with the crash), c2m finishes it from this itself. Cleared with the outcome.
ALTER TABLE handoffs ADD COLUMN request bytea;

-- The consumer's lease (`handoff.consumer_lease_ms`) while Redis cannot be reached: handoffs the
-- replicas admit from memory take it here, so a consumer is not messaged twice through two
-- replicas. Given back by a handoff that sent nothing. (A Redis that lost its data has its leases
-- filled in from the handoffs themselves.)
CREATE TABLE consumer_leases (
    account_id     text NOT NULL,
    consumer_phone text NOT NULL,
    handoff_id     text NOT NULL,
    until          timestamptz NOT NULL,
    PRIMARY KEY (account_id, consumer_phone)
);
