-- ATTEMPTED events carry the consumer's opaque id (a keyed digest, never the number), so a
-- handoff whose consumer was deflected shortly before counts as a repeat.
ALTER TABLE events ADD COLUMN consumer_id text NOT NULL DEFAULT '';
CREATE INDEX events_attempts_by_consumer ON events (account_id, consumer_id, occurred_at)
    WHERE stage = 'FUNNEL_STAGE_ATTEMPTED' AND consumer_id <> '';
