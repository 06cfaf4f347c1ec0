-- ANSWERED events: milliseconds from the conversation's opening to its first answer.
ALTER TABLE events ADD COLUMN response_delay_ms bigint;
