-- Account settings for conversations: when an idle one is closed, and what HELP is answered with.
ALTER TABLE accounts
    ADD COLUMN idle_close_minutes integer NOT NULL DEFAULT 0
        CHECK (idle_close_minutes BETWEEN 0 AND 10080),
    ADD COLUMN help_text text NOT NULL DEFAULT ''
        CHECK (char_length(help_text) <= 320);
