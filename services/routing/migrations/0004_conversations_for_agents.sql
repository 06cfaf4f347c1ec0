-- Conversations for agents and bots: who holds one, why it closed and when its last message came;
-- who wrote each transcript entry and how far an outbound one got; and the durable event log that
-- WatchConversations streams resume from.

ALTER TABLE conversations
    ADD COLUMN assignee        text,
    ADD COLUMN close_reason    text,
    ADD COLUMN last_message_at timestamptz;
UPDATE conversations SET last_message_at = opened_at;
ALTER TABLE conversations ALTER COLUMN last_message_at SET NOT NULL,
    ALTER COLUMN last_message_at SET DEFAULT now();
-- Listings: an account's conversations, newest first.
CREATE INDEX conversations_newest ON conversations (account_id, opened_at DESC, conversation_id DESC);

ALTER TABLE transcript_entries
    -- `consumer`, `deflection`, or the agent's or bot's token subject.
    ADD COLUMN author            text NOT NULL DEFAULT '',
    -- Outbound entries: the gateway's message id, the caller's id for it, and its stage (NULL
    -- while the send is under way).
    ADD COLUMN message_id        text,
    ADD COLUMN client_message_id text,
    ADD COLUMN stage             text,
    ADD COLUMN error_code        text,
    ADD COLUMN media_urls        text[] NOT NULL DEFAULT '{}',
    -- Outbound entries under way: until when the send that wrote it may still be at the
    -- provider, so a retry does not send a second copy meanwhile.
    ADD COLUMN sending_until     timestamptz;
UPDATE transcript_entries SET author = CASE direction WHEN 'INBOUND' THEN 'consumer' ELSE 'deflection' END;
CREATE UNIQUE INDEX transcript_entries_message_id
    ON transcript_entries (message_id) WHERE message_id IS NOT NULL;
CREATE UNIQUE INDEX transcript_entries_client_message_id
    ON transcript_entries (conversation_id, client_message_id) WHERE client_message_id IS NOT NULL;

-- Per account, the position of its latest conversation event. Taking the next position locks the
-- account's row until the transaction ends, so an account's events commit in position order and
-- positions have no gaps: a reader that has seen position n has seen everything before it.
CREATE TABLE conversation_log_heads (
    account_id text PRIMARY KEY,
    position   bigint NOT NULL
);

CREATE TABLE conversation_events (
    account_id      text NOT NULL,
    position        bigint NOT NULL,
    conversation_id text NOT NULL,
    -- An encoded c2m.v1.ConversationEvent, without its cursor (the position makes it).
    payload         bytea NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, position)
);
-- Streams that start `since` a time, and the retention sweep.
CREATE INDEX conversation_events_by_time ON conversation_events (account_id, at);

-- Every opt-out and opt-in, in order: the record a brand keeps of consent (revoked by a STOP on
-- this date, given back by a START on that one) and exports. `opt_outs` stays the current state
-- that every handoff reads.
CREATE TABLE consent_changes (
    id             bigserial PRIMARY KEY,
    account_id     text NOT NULL,
    consumer_phone text NOT NULL,
    channel        text NOT NULL,
    opted_in       boolean NOT NULL,
    -- The keyword (`keyword:STOP`) or the provider error (`twilio:21610`).
    source         text NOT NULL,
    at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX consent_changes_by_account ON consent_changes (account_id, id);
INSERT INTO consent_changes (account_id, consumer_phone, channel, opted_in, source, at)
    SELECT account_id, consumer_phone, channel, false, source, opted_out_at
    FROM opt_outs ORDER BY opted_out_at;
