-- Config's schema on SQLite, the embedded default: PostgreSQL's migrations 0001 to 0007 as one.
-- Times are microseconds since the Unix epoch; lists (channels, event types, scopes) and the
-- messages per channel are JSON text; booleans are 0 or 1.

CREATE TABLE accounts (
    account_id             TEXT PRIMARY KEY,
    display_name           TEXT NOT NULL,
    deflection_enabled     INTEGER NOT NULL DEFAULT 0,
    landline_check_enabled INTEGER NOT NULL DEFAULT 0,
    rate_limit_per_second  INTEGER NOT NULL DEFAULT 30 CHECK (rate_limit_per_second > 0),
    enabled_channels       TEXT NOT NULL DEFAULT '[]',
    reply_lookback_hours   INTEGER NOT NULL DEFAULT 24
        CHECK (reply_lookback_hours BETWEEN 1 AND 720),
    created_at             INTEGER NOT NULL,
    idle_close_minutes     INTEGER NOT NULL DEFAULT 0
        CHECK (idle_close_minutes BETWEEN 0 AND 10080),
    help_text              TEXT NOT NULL DEFAULT '' CHECK (length(help_text) <= 320),
    time_zone              TEXT NOT NULL DEFAULT '' CHECK (length(time_zone) <= 64)
) STRICT;

CREATE TABLE whatsapp_templates (
    account_id  TEXT NOT NULL REFERENCES accounts (account_id),
    template_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    language    TEXT NOT NULL,
    category    TEXT NOT NULL,
    body        TEXT NOT NULL,
    status      TEXT NOT NULL,
    PRIMARY KEY (account_id, template_id),
    UNIQUE (account_id, name, language)
) STRICT;

CREATE TABLE handoff_configs (
    account_id                TEXT NOT NULL REFERENCES accounts (account_id),
    handoff_config_id         TEXT NOT NULL,
    name                      TEXT NOT NULL,
    skill_id                  TEXT NOT NULL,
    channel_priority          TEXT NOT NULL CHECK (json_array_length(channel_priority) > 0),
    messages                  TEXT NOT NULL DEFAULT '{}',
    whatsapp_template_id      TEXT,
    apple_business_id         TEXT NOT NULL DEFAULT '',
    apple_intent_id           TEXT NOT NULL DEFAULT '',
    apple_group_id            TEXT NOT NULL DEFAULT '',
    apple_body                TEXT NOT NULL DEFAULT '',
    delivery_deadline_seconds INTEGER NOT NULL DEFAULT 0,
    version                   INTEGER NOT NULL DEFAULT 1,
    updated_at                INTEGER NOT NULL,
    PRIMARY KEY (account_id, handoff_config_id),
    UNIQUE (account_id, name),
    -- A template in use cannot be deleted.
    FOREIGN KEY (account_id, whatsapp_template_id)
        REFERENCES whatsapp_templates (account_id, template_id)
) STRICT;

CREATE TABLE api_keys (
    api_key_id   TEXT PRIMARY KEY,
    account_id   TEXT NOT NULL REFERENCES accounts (account_id),
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    -- SHA-256 of the key; the plaintext is shown once and never stored.
    key_hash     BLOB NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER,
    scopes       TEXT NOT NULL DEFAULT '["API_KEY_SCOPE_HANDOFFS"]'
) STRICT;

CREATE TABLE audit_events (
    audit_event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id     TEXT NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    resource       TEXT NOT NULL,
    before         TEXT,
    after          TEXT,
    at             INTEGER NOT NULL
) STRICT;
CREATE INDEX audit_events_by_account_time ON audit_events (account_id, at);

CREATE TABLE webhook_endpoints (
    webhook_endpoint_id TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL REFERENCES accounts (account_id),
    url                 TEXT NOT NULL,
    description         TEXT NOT NULL DEFAULT '',
    event_types         TEXT NOT NULL DEFAULT '[]',
    enabled             INTEGER NOT NULL DEFAULT 1,
    disabled_reason     TEXT NOT NULL DEFAULT '',
    secret              BLOB NOT NULL,
    previous_secret     BLOB,
    previous_until      INTEGER,
    cursor              TEXT NOT NULL DEFAULT '',
    handoff_position    INTEGER,
    failing_since       INTEGER,
    lease_owner         TEXT,
    lease_until         INTEGER,
    version             INTEGER NOT NULL DEFAULT 1,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
) STRICT;
CREATE INDEX webhook_endpoints_by_account ON webhook_endpoints (account_id, webhook_endpoint_id);

CREATE TABLE webhook_deliveries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_endpoint_id TEXT NOT NULL
        REFERENCES webhook_endpoints (webhook_endpoint_id) ON DELETE CASCADE,
    webhook_id          TEXT NOT NULL,
    event_type          TEXT NOT NULL,
    attempt             INTEGER NOT NULL,
    http_status         INTEGER NOT NULL,
    error               TEXT NOT NULL DEFAULT '',
    duration_ms         INTEGER NOT NULL,
    succeeded           INTEGER NOT NULL,
    at                  INTEGER NOT NULL
) STRICT;
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (webhook_endpoint_id, id DESC);
