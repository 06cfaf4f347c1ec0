-- Messages agents and bots send in conversations: their stages go to Routing, for the transcript,
-- through an outbox of their own (`c2m.v1.MessageStage`, encoded), instead of the funnel.
ALTER TABLE outbound_messages ADD COLUMN conversation_id text NOT NULL DEFAULT '';

CREATE TABLE conversation_outbox (
    seq        bigserial PRIMARY KEY,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
