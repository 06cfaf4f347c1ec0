-- Consumers' opaque ids on ATTEMPTED events, as in PostgreSQL's migration 0004.
ALTER TABLE events ADD COLUMN consumer_id TEXT NOT NULL DEFAULT '';
CREATE INDEX events_attempts_by_consumer ON events (account_id, consumer_id, occurred_at)
    WHERE stage = 'FUNNEL_STAGE_ATTEMPTED' AND consumer_id <> '';
