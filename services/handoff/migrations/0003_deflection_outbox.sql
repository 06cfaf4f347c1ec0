-- Deflections on their way to Routing (`c2m.v1.Deflection`, encoded). A handoff writes its
-- deflection here in its own commit, so none is lost between the IVR's answer and the consumer's
-- reply; a relay ships them in order (see c2m_storage::outbox).
CREATE TABLE deflection_outbox (
    seq        bigserial PRIMARY KEY,
    payload    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
