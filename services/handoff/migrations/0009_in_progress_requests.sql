-- A handoff in progress keeps its CreateHandoffRequest (encoded) until it is finished: if its
-- IVR never retries (the call ended with the crash), c2m finishes it from this itself.
ALTER TABLE handoffs ADD COLUMN request bytea;
