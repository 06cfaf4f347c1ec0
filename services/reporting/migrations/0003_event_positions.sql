-- Every event recorded from now on gets a position in its account's log, so clients can follow
-- the log in the order it was written (ListEvents). Taking positions locks the account's head row
-- until the transaction ends: an account's events commit in position order, and a reader that has
-- seen position n has seen every event before it. A re-sent event takes a position and is dropped
-- (ON CONFLICT), so positions can skip numbers; they never go back. Events recorded before this
-- migration have none.
CREATE TABLE event_log_heads (
    account_id text PRIMARY KEY,
    position   bigint NOT NULL
);
ALTER TABLE events ADD COLUMN position bigint;
CREATE UNIQUE INDEX events_by_position ON events (account_id, position) WHERE position IS NOT NULL;
