-- Accounts and their settings, handoff configurations, WhatsApp templates, API keys, audit log.

CREATE TABLE accounts (
    account_id             text PRIMARY KEY,
    display_name           text NOT NULL,
    deflection_enabled     boolean NOT NULL DEFAULT false,
    landline_check_enabled boolean NOT NULL DEFAULT false,
    rate_limit_per_second  integer NOT NULL DEFAULT 30 CHECK (rate_limit_per_second > 0),
    enabled_channels       text[] NOT NULL DEFAULT '{}',
    reply_lookback_hours   integer NOT NULL DEFAULT 24
        CHECK (reply_lookback_hours BETWEEN 1 AND 720),
    created_at             timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE whatsapp_templates (
    account_id  text NOT NULL REFERENCES accounts (account_id),
    template_id text NOT NULL,
    name        text NOT NULL,
    language    text NOT NULL,
    category    text NOT NULL,
    body        text NOT NULL,
    status      text NOT NULL,
    PRIMARY KEY (account_id, template_id),
    UNIQUE (account_id, name, language)
);

CREATE TABLE handoff_configs (
    account_id               text NOT NULL REFERENCES accounts (account_id),
    handoff_config_id        text NOT NULL,
    name                     text NOT NULL,
    skill_id                 text NOT NULL,
    channel_priority         text[] NOT NULL CHECK (cardinality(channel_priority) > 0),
    -- {"CHANNEL_SMS": "Hi {{name}}…", …}
    messages                 jsonb NOT NULL DEFAULT '{}',
    whatsapp_template_id     text,
    apple_business_id        text NOT NULL DEFAULT '',
    apple_intent_id          text NOT NULL DEFAULT '',
    apple_group_id           text NOT NULL DEFAULT '',
    delivery_deadline_seconds integer NOT NULL DEFAULT 0,
    version                  bigint NOT NULL DEFAULT 1,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, handoff_config_id),
    UNIQUE (account_id, name),
    -- A template in use cannot be deleted.
    FOREIGN KEY (account_id, whatsapp_template_id)
        REFERENCES whatsapp_templates (account_id, template_id)
);

CREATE TABLE api_keys (
    api_key_id   text PRIMARY KEY,
    account_id   text NOT NULL REFERENCES accounts (account_id),
    name         text NOT NULL,
    prefix       text NOT NULL,
    -- SHA-256 of the key; the plaintext is shown once and never stored.
    key_hash     bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

CREATE TABLE audit_events (
    audit_event_id bigserial PRIMARY KEY,
    account_id     text NOT NULL,
    actor          text NOT NULL,
    action         text NOT NULL,
    resource       text NOT NULL,
    before         jsonb,
    after          jsonb,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_events_by_account_time ON audit_events (account_id, at);
