-- Provider credentials, outbound messages, the number-lookup cache and the webhook inbox.

CREATE TABLE provider_credentials (
    account_id text NOT NULL,
    provider   text NOT NULL,
    -- Encrypted with the key from configuration; never returned by any RPC.
    ciphertext bytea NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, provider)
);

CREATE TABLE outbound_messages (
    message_id          text PRIMARY KEY,
    account_id          text NOT NULL,
    channel             text NOT NULL,
    -- The handoff it belongs to, carried on its delivery events.
    handoff_id          text NOT NULL DEFAULT '',
    handoff_config_id   text NOT NULL DEFAULT '',
    skill_id            text NOT NULL DEFAULT '',
    provider_message_id text,
    -- The furthest stage reached; it only moves forward.
    stage               text NOT NULL,
    error_code          text,
    error_message       text,
    sent_at             timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX outbound_messages_provider_id
    ON outbound_messages (channel, provider_message_id) WHERE provider_message_id IS NOT NULL;

CREATE TABLE number_lookups (
    phone      text PRIMARY KEY,
    line_type  text NOT NULL,
    looked_up_at timestamptz NOT NULL DEFAULT now()
);

-- Every verified webhook is stored before it is acknowledged, then processed once.
CREATE TABLE webhook_inbox (
    seq          bigserial PRIMARY KEY,
    provider     text NOT NULL,
    -- The provider's id for the delivery (message id and status), for de-duplication.
    dedup_key    text NOT NULL UNIQUE,
    body         bytea NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz
);

CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    -- An encoded c2m.v1.Event.
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
