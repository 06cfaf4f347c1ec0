-- A fallback round claims due rows for a lease instead of holding them locked in a transaction
-- across its calls to the gateway; another round takes a row over once its claim has run out.
-- When the row is next looked at (next_check) is left as it is while it is claimed.
ALTER TABLE fallbacks ADD COLUMN claimed_until timestamptz;
