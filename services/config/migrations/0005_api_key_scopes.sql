-- What each API key may be used for; the keys made before scopes were IVRs' (handoffs).
ALTER TABLE api_keys ADD COLUMN scopes text[] NOT NULL DEFAULT '{API_KEY_SCOPE_HANDOFFS}';
