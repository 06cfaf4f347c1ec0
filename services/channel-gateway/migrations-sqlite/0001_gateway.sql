-- The gateway's schema on SQLite, the embedded default: PostgreSQL's migrations as one. Times
-- are microseconds since the Unix epoch.

CREATE TABLE provider_credentials (
    account_id TEXT NOT NULL,
    provider   TEXT NOT NULL,
    -- Sealed with the key from configuration; never returned by any RPC.
    ciphertext BLOB NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, provider)
) STRICT;

CREATE TABLE outbound_messages (
    message_id          TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL,
    channel             TEXT NOT NULL,
    handoff_id          TEXT NOT NULL DEFAULT '',
    handoff_config_id   TEXT NOT NULL DEFAULT '',
    skill_id            TEXT NOT NULL DEFAULT '',
    conversation_id     TEXT NOT NULL DEFAULT '',
    provider_message_id TEXT,
    -- The furthest stage reached; it only moves forward.
    stage               TEXT NOT NULL,
    error_code          TEXT,
    error_message       TEXT,
    sent_at             INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    delivered_at        INTEGER,
    read_at             INTEGER,
    sending_until       INTEGER,
    claimed_by          TEXT
) STRICT;
CREATE UNIQUE INDEX outbound_messages_provider_id
    ON outbound_messages (channel, provider_message_id) WHERE provider_message_id IS NOT NULL;

CREATE TABLE number_lookups (
    phone        TEXT PRIMARY KEY,
    line_type    TEXT NOT NULL,
    looked_up_at INTEGER NOT NULL
) STRICT;

CREATE TABLE webhook_inbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    provider     TEXT NOT NULL,
    dedup_key    TEXT NOT NULL UNIQUE,
    body         BLOB NOT NULL,
    received_at  INTEGER NOT NULL,
    processed_at INTEGER
) STRICT;

CREATE TABLE devices (
    account_id    TEXT NOT NULL,
    consumer_id   TEXT NOT NULL,
    platform      TEXT NOT NULL,
    device_token  TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, device_token)
) STRICT;
CREATE INDEX devices_by_consumer ON devices (account_id, consumer_id);

CREATE TABLE whatsapp_windows (
    account_id      TEXT NOT NULL,
    phone           TEXT NOT NULL,
    last_inbound_at INTEGER NOT NULL,
    PRIMARY KEY (account_id, phone)
) STRICT;

-- Funnel events to Reporting, stages of conversation messages to Routing, and the rows
-- neither can ever take.
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
CREATE TABLE conversation_outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
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
