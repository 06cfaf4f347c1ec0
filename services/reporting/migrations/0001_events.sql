-- The append-only event log. The primary key de-duplicates re-sent events.

CREATE TABLE events (
    event_id          text PRIMARY KEY,
    account_id        text NOT NULL,
    stage             text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    handoff_id        text NOT NULL DEFAULT '',
    handoff_config_id text NOT NULL DEFAULT '',
    channel           text NOT NULL DEFAULT '',
    skill_id          text NOT NULL DEFAULT '',
    conversation_id   text NOT NULL DEFAULT '',
    ivr_number        text NOT NULL DEFAULT '',
    error_code        text NOT NULL DEFAULT '',
    source            text NOT NULL DEFAULT '',
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_by_account_time ON events (account_id, occurred_at);
CREATE INDEX events_by_handoff ON events (handoff_id) WHERE handoff_id <> '';
