-- A handoff that will send is written before its first message goes, with its idempotency record
-- and status HANDOFF_STATUS_IN_PROGRESS; its outcome is written over it. A crash, or a gateway
-- that does not answer, leaves a row that a retry with the same key finishes (its message ids
-- are the handoff's, and the gateway never sends an id twice) instead of a new handoff that
-- would message the consumer again.
CREATE INDEX handoffs_in_progress ON handoffs (created_at)
    WHERE status = 'HANDOFF_STATUS_IN_PROGRESS';

-- The consumer's lease (`handoff.consumer_lease_ms`), held here as well as in Redis: a Redis
-- that lost its data, or cannot be reached, does not let a second handoff message the consumer.
-- Taken only by a handoff that will send, and given back by one that sent nothing.
CREATE TABLE consumer_leases (
    account_id     text NOT NULL,
    consumer_phone text NOT NULL,
    handoff_id     text NOT NULL,
    until          timestamptz NOT NULL,
    PRIMARY KEY (account_id, consumer_phone)
);
