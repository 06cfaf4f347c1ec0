-- A send the provider never answered may or may not have reached the consumer. Its fallback waits
-- for the provider's first report of it until confirm_by, and tries the next channel if none came;
-- NULL: the send was answered, and only the delivery deadline (or a reported failure) applies.
ALTER TABLE fallbacks ADD COLUMN confirm_by timestamptz;
