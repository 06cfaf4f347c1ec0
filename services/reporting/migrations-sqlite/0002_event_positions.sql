-- Positions in each account's log, as in PostgreSQL's migration 0003. SQLite has one writer at a
-- time, so an account's events commit in position order by construction.
CREATE TABLE event_log_heads (
    account_id TEXT PRIMARY KEY,
    position   INTEGER NOT NULL
) STRICT;
ALTER TABLE events ADD COLUMN position INTEGER;
CREATE UNIQUE INDEX events_by_position ON events (account_id, position) WHERE position IS NOT NULL;
