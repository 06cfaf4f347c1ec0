-- Routing's schema on SQLite, the embedded default: PostgreSQL's migrations 0001 to 0005 as one.
-- Times are microseconds since the Unix epoch; an entry's media URLs are JSON text.

CREATE TABLE deflections (
    handoff_id            TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL,
    handoff_config_id     TEXT NOT NULL,
    ivr_number            TEXT NOT NULL DEFAULT '',
    consumer_phone        TEXT NOT NULL,
    channel               TEXT NOT NULL,
    skill_id              TEXT NOT NULL,
    first_message         TEXT NOT NULL,
    engagement_attributes BLOB NOT NULL DEFAULT x'',
    sent_at               INTEGER NOT NULL
) STRICT;
CREATE INDEX deflections_by_consumer ON deflections (account_id, consumer_phone, sent_at DESC);

CREATE TABLE conversations (
    conversation_id       TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL,
    consumer_address      TEXT NOT NULL,
    channel               TEXT NOT NULL,
    skill_id              TEXT NOT NULL,
    handoff_id            TEXT,
    handoff_config_id     TEXT NOT NULL DEFAULT '',
    engagement_attributes BLOB NOT NULL DEFAULT x'',
    opened_at             INTEGER NOT NULL,
    closed_at             INTEGER,
    assignee              TEXT,
    close_reason          TEXT,
    last_message_at       INTEGER NOT NULL
) STRICT;
-- The open-conversation fact: at most one open conversation per account and consumer.
CREATE UNIQUE INDEX conversations_one_open_per_consumer
    ON conversations (account_id, consumer_address) WHERE closed_at IS NULL;
CREATE INDEX conversations_by_handoff ON conversations (handoff_id) WHERE handoff_id IS NOT NULL;
CREATE INDEX conversations_newest ON conversations (account_id, opened_at DESC, conversation_id DESC);

CREATE TABLE transcript_entries (
    conversation_id     TEXT NOT NULL REFERENCES conversations (conversation_id),
    seq                 INTEGER NOT NULL,
    direction           TEXT NOT NULL,
    text                TEXT NOT NULL,
    provider_message_id TEXT,
    at                  INTEGER NOT NULL,
    author              TEXT NOT NULL DEFAULT '',
    message_id          TEXT,
    client_message_id   TEXT,
    stage               TEXT,
    error_code          TEXT,
    media_urls          TEXT NOT NULL DEFAULT '[]',
    sending_until       INTEGER,
    PRIMARY KEY (conversation_id, seq)
) STRICT;
CREATE UNIQUE INDEX transcript_entries_provider_id
    ON transcript_entries (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE UNIQUE INDEX transcript_entries_message_id
    ON transcript_entries (message_id) WHERE message_id IS NOT NULL;
CREATE UNIQUE INDEX transcript_entries_client_message_id
    ON transcript_entries (conversation_id, client_message_id) WHERE client_message_id IS NOT NULL;

CREATE TABLE opt_outs (
    account_id     TEXT NOT NULL,
    consumer_phone TEXT NOT NULL,
    channel        TEXT NOT NULL,
    source         TEXT NOT NULL,
    opted_out_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, consumer_phone, channel)
) STRICT;

CREATE TABLE consent_changes (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id     TEXT NOT NULL,
    consumer_phone TEXT NOT NULL,
    channel        TEXT NOT NULL,
    opted_in       INTEGER NOT NULL,
    source         TEXT NOT NULL,
    at             INTEGER NOT NULL
) STRICT;
CREATE INDEX consent_changes_by_account ON consent_changes (account_id, id);

CREATE TABLE conversation_log_heads (
    account_id TEXT PRIMARY KEY,
    position   INTEGER NOT NULL
) STRICT;

CREATE TABLE conversation_events (
    account_id      TEXT NOT NULL,
    position        INTEGER NOT NULL,
    conversation_id TEXT NOT NULL,
    payload         BLOB NOT NULL,
    at              INTEGER NOT NULL,
    PRIMARY KEY (account_id, position)
) STRICT;
CREATE INDEX conversation_events_by_time ON conversation_events (account_id, at);

CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
CREATE TABLE outbox_dead_letters (
    outbox  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    payload BLOB NOT NULL,
    error   TEXT NOT NULL,
    dead_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    PRIMARY KEY (outbox, seq)
) STRICT;
