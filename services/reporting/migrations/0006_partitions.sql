-- The event log, partitioned by month of occurred_at, so that retention (reporting.retention_days)
-- drops whole months. An event is still stored once: a re-sent event is the same row with the same
-- time, so (event_id, occurred_at) de-duplicates as event_id alone did. Positions stay unique per
-- account by construction (taken under the account's head row); the index that checked it cannot
-- be unique across partitions.
--
-- The events logged so far become one partition, up to the first of the month after the latest
-- of them (or of now); the service makes the months after it as they come, and a default
-- partition takes whatever falls outside them until their month is made.
ALTER TABLE events RENAME TO events_before_partitions;
ALTER TABLE events_before_partitions DROP CONSTRAINT events_pkey,
    ADD CONSTRAINT events_before_partitions_pkey PRIMARY KEY (event_id, occurred_at);
ALTER INDEX events_by_account_time RENAME TO events_before_partitions_by_account_time;
ALTER INDEX events_by_handoff RENAME TO events_before_partitions_by_handoff;
ALTER INDEX events_by_position RENAME TO events_before_partitions_by_position;
ALTER INDEX events_attempts_by_consumer RENAME TO events_before_partitions_attempts_by_consumer;

CREATE TABLE events (
    event_id          text NOT NULL,
    account_id        text NOT NULL,
    stage             text NOT NULL,
    occurred_at       timestamptz NOT NULL,
    handoff_id        text NOT NULL DEFAULT '',
    handoff_config_id text NOT NULL DEFAULT '',
    channel           text NOT NULL DEFAULT '',
    skill_id          text NOT NULL DEFAULT '',
    conversation_id   text NOT NULL DEFAULT '',
    ivr_number        text NOT NULL DEFAULT '',
    error_code        text NOT NULL DEFAULT '',
    source            text NOT NULL DEFAULT '',
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    response_delay_ms bigint,
    position          bigint,
    consumer_id       text NOT NULL DEFAULT '',
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX events_by_account_time ON events (account_id, occurred_at);
-- A handoff's events by account too: with only the handoff id, a plan made while an account's
-- statistics were young read all its events by account instead (100 ms a batch, measured).
CREATE INDEX events_by_handoff ON events (account_id, handoff_id) WHERE handoff_id <> '';
CREATE INDEX events_by_position ON events (account_id, position) WHERE position IS NOT NULL;
CREATE INDEX events_attempts_by_consumer ON events (account_id, consumer_id, occurred_at)
    WHERE stage = 'FUNNEL_STAGE_ATTEMPTED' AND consumer_id <> '';
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- The range partitions: this one and those the service makes, for it to find which to drop.
CREATE TABLE event_months (
    name   text PRIMARY KEY,
    -- NULL: from the beginning.
    starts timestamptz,
    ends   timestamptz NOT NULL
);

DO $$
DECLARE
    upto timestamptz;
BEGIN
    SELECT (date_trunc('month', greatest(now(), max(occurred_at)) AT TIME ZONE 'UTC')
            + interval '1 month') AT TIME ZONE 'UTC'
        INTO upto FROM events_before_partitions;
    EXECUTE format('ALTER TABLE events_before_partitions ADD CONSTRAINT events_before_partitions_upto '
        'CHECK (occurred_at < %L)', upto);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_before_partitions '
        'FOR VALUES FROM (MINVALUE) TO (%L)', upto);
    ALTER TABLE events_before_partitions DROP CONSTRAINT events_before_partitions_upto;
    INSERT INTO event_months (name, starts, ends) VALUES ('events_before_partitions', NULL, upto);
END $$;

