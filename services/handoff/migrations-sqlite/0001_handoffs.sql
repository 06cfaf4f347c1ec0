-- Handoff's schema on SQLite, the embedded default: PostgreSQL's migrations 0001 to 0009 as one.
-- Times are microseconds since the Unix epoch; attempts and a fallback's remaining steps are
-- JSON text.

CREATE TABLE handoffs (
    handoff_id        TEXT PRIMARY KEY,
    account_id        TEXT NOT NULL,
    handoff_config_id TEXT NOT NULL,
    -- E.164. Never logged unmasked.
    consumer_phone    TEXT NOT NULL,
    status            TEXT NOT NULL,
    channel           TEXT,
    skill_id          TEXT NOT NULL DEFAULT '',
    ivr_call_id       TEXT NOT NULL DEFAULT '',
    ivr_number        TEXT NOT NULL DEFAULT '',
    -- Every channel tried, in order: [{channel, outcome, provider_message_id, error_code, at}].
    attempts          TEXT NOT NULL DEFAULT '[]',
    -- SKIPPED_RECENT_HANDOFF: the handoff that held the consumer's lease.
    duplicate_of      TEXT,
    created_at        INTEGER NOT NULL,
    -- The request, while the handoff is written but not finished.
    request           BLOB
) STRICT;
CREATE INDEX handoffs_by_account_time ON handoffs (account_id, created_at);
CREATE INDEX handoffs_in_progress ON handoffs (created_at)
    WHERE status = 'HANDOFF_STATUS_IN_PROGRESS';

CREATE TABLE idempotency_keys (
    account_id      TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    -- Hash of the request's parameters: the same key with other parameters is rejected.
    request_hash    BLOB NOT NULL,
    -- Checked at commit: a key is claimed before its handoff's row is written.
    handoff_id      TEXT NOT NULL REFERENCES handoffs (handoff_id) DEFERRABLE INITIALLY DEFERRED,
    expires_at      INTEGER NOT NULL,
    PRIMARY KEY (account_id, idempotency_key)
) STRICT;

CREATE TABLE consumer_leases (
    account_id     TEXT NOT NULL,
    consumer_phone TEXT NOT NULL,
    handoff_id     TEXT NOT NULL,
    until          INTEGER NOT NULL,
    PRIMARY KEY (account_id, consumer_phone)
) STRICT;

CREATE TABLE fallbacks (
    handoff_id     TEXT PRIMARY KEY REFERENCES handoffs (handoff_id),
    account_id     TEXT NOT NULL,
    -- The message on its way.
    message_id     TEXT NOT NULL,
    -- The channels still to try, in order: [{channel, text, template}].
    remaining      TEXT NOT NULL,
    -- Past it an undelivered message counts as failed; NULL: only a reported failure does.
    deadline       INTEGER,
    -- The configuration's delivery deadline, for the next channel's message.
    window_seconds INTEGER,
    -- The send went unanswered: past this, with no report from the provider, the next channel.
    confirm_by     INTEGER,
    next_check     INTEGER NOT NULL,
    watched_since  INTEGER NOT NULL,
    -- A round is looking at it until then.
    claimed_until  INTEGER
) STRICT;
CREATE INDEX fallbacks_due ON fallbacks (next_check);

-- Funnel events to Reporting, deflections to Routing, and the rows neither can ever take.
CREATE TABLE outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL,
    payload    BLOB NOT NULL,
    created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
) STRICT;
CREATE TABLE deflection_outbox (
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
