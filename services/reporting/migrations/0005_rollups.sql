-- Rollups: every handoff's funnel tallied per local day of its attempt, per time zone asked for
-- (see store/rollup.rs), so that a series over months reads days, not events.
--
-- A zone is asked for by a query in it (or configured for every account). Asking takes the
-- account's log head, so the log splits at that position: events up to it are tallied by the
-- builder, in chunks of attempts; every later event by the append that adds it. Neither counts
-- what the other does, so every event is in a zone's rollups exactly once.
CREATE TABLE funnel_zones (
    account_id   text NOT NULL,
    time_zone    text NOT NULL,
    -- The log's head when the zone was asked for: the builder's events are those up to it.
    split_position bigint NOT NULL,
    -- The builder's cursor: the last attempt (time, handoff id) tallied; none yet when NULL.
    built_at     timestamptz,
    built_handoff text NOT NULL DEFAULT '',
    ready        boolean NOT NULL DEFAULT false,
    asked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, time_zone)
);
CREATE INDEX funnel_zones_building ON funnel_zones (account_id) WHERE NOT ready;

-- One row per account, zone, grouping set (rollup::SETS), local day and group values; `tally` is
-- a rollup::Tally (protobuf), read and written under the account's log head lock.
CREATE TABLE funnel_days (
    account_id text NOT NULL,
    time_zone  text NOT NULL,
    grouping   smallint NOT NULL,
    day        date NOT NULL,
    group1     text NOT NULL,
    group2     text NOT NULL,
    tally      bytea NOT NULL,
    PRIMARY KEY (account_id, time_zone, grouping, day, group1, group2)
);
