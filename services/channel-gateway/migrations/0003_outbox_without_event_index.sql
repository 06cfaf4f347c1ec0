-- An outbox row's event id is made fresh (a UUIDv7) with the row and is de-duplicated where it
-- lands, by Reporting's primary key; an index on it here only cost every write an insert into a
-- b-tree that the relay never reads.
ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_key;
