-- Webhook endpoints, the position of each in the conversation stream, and its recent deliveries.
CREATE TABLE webhook_endpoints (
    webhook_endpoint_id text PRIMARY KEY,
    account_id          text NOT NULL REFERENCES accounts (account_id),
    url                 text NOT NULL,
    description         text NOT NULL DEFAULT '',
    event_types         text[] NOT NULL DEFAULT '{}',
    enabled             boolean NOT NULL DEFAULT true,
    disabled_reason     text NOT NULL DEFAULT '',
    -- The signing secret (the bytes a `whsec_` secret stands for), and the one before a rotation
    -- while deliveries still carry it.
    secret              bytea NOT NULL,
    previous_secret     bytea,
    previous_until      timestamptz,
    -- The last conversation event posted (or passed over), a WatchConversations cursor; empty:
    -- from the endpoint's creation on.
    cursor              text NOT NULL DEFAULT '',
    failing_since       timestamptz,
    -- Which Config replica delivers for it, until when.
    lease_owner         text,
    lease_until         timestamptz,
    -- Bumped by every change an admin makes, so a delivering replica picks the change up.
    version             bigint NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_by_account ON webhook_endpoints (account_id, webhook_endpoint_id);

CREATE TABLE webhook_deliveries (
    id                  bigserial PRIMARY KEY,
    webhook_endpoint_id text NOT NULL REFERENCES webhook_endpoints (webhook_endpoint_id) ON DELETE CASCADE,
    webhook_id          text NOT NULL,
    event_type          text NOT NULL,
    attempt             integer NOT NULL,
    http_status         integer NOT NULL,
    error               text NOT NULL DEFAULT '',
    duration_ms         integer NOT NULL,
    succeeded           boolean NOT NULL,
    at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (webhook_endpoint_id, id DESC);
