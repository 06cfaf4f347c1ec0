-- Since when the fallback has watched its current message: an undecided message is looked at
-- again after a pause that grows with this (200 ms at first, 5 s at most), so pending fallbacks
-- cost the gateway little however many there are, and watching stops after a day.
ALTER TABLE fallbacks ADD COLUMN watched_since timestamptz NOT NULL DEFAULT now();
