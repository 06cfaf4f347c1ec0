-- The append-only event log, as in PostgreSQL's migrations 0001 and 0002. Times are
-- microseconds since the Unix epoch (exact, ordered, compared as integers).

CREATE TABLE events (
    event_id          TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    stage             TEXT NOT NULL,
    occurred_at       INTEGER NOT NULL,
    handoff_id        TEXT NOT NULL DEFAULT '',
    handoff_config_id TEXT NOT NULL DEFAULT '',
    channel           TEXT NOT NULL DEFAULT '',
    skill_id          TEXT NOT NULL DEFAULT '',
    conversation_id   TEXT NOT NULL DEFAULT '',
    ivr_number        TEXT NOT NULL DEFAULT '',
    error_code        TEXT NOT NULL DEFAULT '',
    source            TEXT NOT NULL DEFAULT '',
    response_delay_ms INTEGER,
    recorded_at       INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
CREATE INDEX events_by_account_time ON events (account_id, occurred_at);
CREATE INDEX events_by_handoff ON events (handoff_id) WHERE handoff_id <> '';
