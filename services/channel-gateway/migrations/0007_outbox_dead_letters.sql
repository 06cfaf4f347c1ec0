-- Outbox rows that can never be delivered (they cannot be decoded, or the destination refuses
-- them on their own for what they hold) are set aside here, so that the rows behind them flow.
-- Kept for an operator to look at; logged once and counted (c2m_outbox_dead_letters_total).
CREATE TABLE outbox_dead_letters (
    -- The outbox table the row came from.
    outbox  text NOT NULL,
    seq     bigint NOT NULL,
    payload bytea NOT NULL,
    -- Why it cannot be delivered.
    error   text NOT NULL,
    dead_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (outbox, seq)
);
