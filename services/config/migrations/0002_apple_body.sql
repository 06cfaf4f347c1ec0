-- Apple Messages for Business: the message the chat opens with (the invite link's `body`).
ALTER TABLE handoff_configs ADD COLUMN apple_body text NOT NULL DEFAULT '';
