-- Whether a deflection became a conversation: asked for pending Apple Messages invites.
CREATE INDEX conversations_by_handoff ON conversations (handoff_id) WHERE handoff_id IS NOT NULL;
