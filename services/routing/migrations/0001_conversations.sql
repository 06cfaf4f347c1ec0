-- Pending deflections, conversations with their transcripts, and opt-outs.

CREATE TABLE deflections (
    handoff_id            text PRIMARY KEY,
    account_id            text NOT NULL,
    handoff_config_id     text NOT NULL,
    ivr_number            text NOT NULL DEFAULT '',
    consumer_phone        text NOT NULL,
    channel               text NOT NULL,
    skill_id              text NOT NULL,
    first_message         text NOT NULL,
    engagement_attributes bytea NOT NULL DEFAULT '',
    sent_at               timestamptz NOT NULL
);
CREATE INDEX deflections_by_consumer ON deflections (account_id, consumer_phone, sent_at DESC);

CREATE TABLE conversations (
    conversation_id       text PRIMARY KEY,
    account_id            text NOT NULL,
    consumer_address      text NOT NULL,
    channel               text NOT NULL,
    skill_id              text NOT NULL,
    handoff_id            text,
    handoff_config_id     text NOT NULL DEFAULT '',
    engagement_attributes bytea NOT NULL DEFAULT '',
    opened_at             timestamptz NOT NULL DEFAULT now(),
    closed_at             timestamptz
);
-- The open-conversation fact: at most one open conversation per account and consumer. The Redis
-- lease is only the fast path in front of this.
CREATE UNIQUE INDEX conversations_one_open_per_consumer
    ON conversations (account_id, consumer_address) WHERE closed_at IS NULL;

CREATE TABLE transcript_entries (
    conversation_id     text NOT NULL REFERENCES conversations (conversation_id),
    seq                 integer NOT NULL,
    direction           text NOT NULL,
    text                text NOT NULL,
    provider_message_id text,
    at                  timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, seq)
);
CREATE UNIQUE INDEX transcript_entries_provider_id
    ON transcript_entries (provider_message_id) WHERE provider_message_id IS NOT NULL;

CREATE TABLE opt_outs (
    account_id     text NOT NULL,
    consumer_phone text NOT NULL,
    channel        text NOT NULL,
    source         text NOT NULL,
    opted_out_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, consumer_phone, channel)
);

CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   uuid NOT NULL UNIQUE,
    -- An encoded c2m.v1.Event.
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
