-- A send is recorded before its provider is called: the row is the message id's claim, so a
-- retry of the id (after a crash of the sender, or its caller's) never reaches the provider a
-- second time. While the sender is at the provider the row says until when it may take; a claim
-- past that time with no outcome was left by a sender that died, and reads as unconfirmed (the
-- provider's reports settle it, as for a send it never answered).
ALTER TABLE outbound_messages ADD COLUMN sending_until timestamptz;
-- Who claimed the id (a token of the send): a claim whose commit was acknowledged too late (the
-- connection cut just after it) is recognised as its own when the statement is run again.
ALTER TABLE outbound_messages ADD COLUMN claimed_by text;
