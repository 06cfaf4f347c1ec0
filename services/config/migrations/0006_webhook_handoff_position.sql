-- Handoff stages reach webhook endpoints too: each endpoint's position in Reporting's event log
-- (ListEvents), beside its cursor in the conversation stream. NULL: nothing read yet, so reading
-- starts with the first event that occurred after the endpoint was created.
ALTER TABLE webhook_endpoints ADD COLUMN handoff_position bigint;
