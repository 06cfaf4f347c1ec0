-- App messaging: the devices a consumer registered, by the brand's consumer id.
CREATE TABLE devices (
    account_id    text NOT NULL,
    consumer_id   text NOT NULL,
    -- ANDROID (FCM) or IOS (APNs).
    platform      text NOT NULL,
    device_token  text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, device_token)
);
CREATE INDEX devices_by_consumer ON devices (account_id, consumer_id);

-- WhatsApp's customer-service window: free-form text is allowed for 24 hours after the
-- consumer's last message to the business.
CREATE TABLE whatsapp_windows (
    account_id       text NOT NULL,
    phone            text NOT NULL,
    last_inbound_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, phone)
);
