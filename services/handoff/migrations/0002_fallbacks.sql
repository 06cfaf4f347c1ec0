-- Delivery-driven fallback: a handoff whose message may still fail, with what to try next.

CREATE TABLE fallbacks (
    handoff_id text PRIMARY KEY REFERENCES handoffs (handoff_id),
    account_id text NOT NULL,
    -- The message on its way.
    message_id text NOT NULL,
    -- The channels still to try, in order: [{channel, text, template}].
    remaining  jsonb NOT NULL,
    -- Past it an undelivered message counts as failed; NULL: only a reported failure does.
    deadline   timestamptz,
    -- The configuration's delivery deadline, for the next channel's message.
    window_seconds integer,
    next_check timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fallbacks_due ON fallbacks (next_check);
