-- An outbox as the services have it (Handoff's migrations 0001, 0004 and 0008).
CREATE TABLE outbox (
    seq        bigserial PRIMARY KEY,
    event_id   uuid NOT NULL,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE outbox_dead_letters (
    outbox  text NOT NULL,
    seq     bigint NOT NULL,
    payload bytea NOT NULL,
    error   text NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (outbox, seq)
);
