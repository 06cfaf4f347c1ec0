-- Handoffs, their idempotency records, and the outbox that ships their events to reporting.

CREATE TABLE handoffs (
    handoff_id        text PRIMARY KEY,
    account_id        text NOT NULL,
    handoff_config_id text NOT NULL,
    -- E.164. Never logged unmasked.
    consumer_phone    text NOT NULL,
    status            text NOT NULL,
    channel           text,
    skill_id          text NOT NULL DEFAULT '',
    ivr_call_id       text NOT NULL DEFAULT '',
    ivr_number        text NOT NULL DEFAULT '',
    -- Every channel tried, in order: [{channel, outcome, provider_message_id, error_code, at}].
    attempts          jsonb NOT NULL DEFAULT '[]',
    -- SKIPPED_RECENT_HANDOFF: the handoff that held the consumer's lease.
    duplicate_of      text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX handoffs_by_account_time ON handoffs (account_id, created_at);

CREATE TABLE idempotency_keys (
    account_id      text NOT NULL,
    idempotency_key text NOT NULL,
    -- Hash of the request's parameters: the same key with other parameters is rejected.
    request_hash    bytea NOT NULL,
    handoff_id      text NOT NULL REFERENCES handoffs (handoff_id),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (account_id, idempotency_key)
);

CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    -- An encoded c2m.v1.Event.
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
