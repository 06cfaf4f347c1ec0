-- When the provider reported each stage: what GetHandoff's progress shows a brand of one handoff
-- (a READ that arrives first sets both, as it counts as DELIVERED too). A failure's time is
-- updated_at, as FAILED ends the way.
ALTER TABLE outbound_messages ADD COLUMN delivered_at timestamptz, ADD COLUMN read_at timestamptz;
