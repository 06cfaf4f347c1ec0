-- The IANA time zone an account's reports count days and weeks in; empty: UTC.
ALTER TABLE accounts ADD COLUMN time_zone text NOT NULL DEFAULT ''
    CHECK (char_length(time_zone) <= 64);
