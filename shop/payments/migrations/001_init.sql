-- One payment per order, keyed by the order id. The row is written before the
-- provider is called (status authorizing) and never deleted, so every repeat,
-- retry or resume after a crash finds it:
--   authorizing  the provider was (or is being) asked; its answer is not known here
--   authorized   the provider holds the amount (authorization_id)
--   declined     the provider declined the card
--   captured     the money is taken
--   voided       the hold was given back, or a void came first: a row without
--                customer_id and amount is such a tombstone, and a late authorize
--                for the order is refused.
-- void_pending = 1: voided here while an authorization may still exist at the
-- provider (the void found the payment authorizing); the next void finds and
-- voids it there.
CREATE TABLE payments (
    order_id         TEXT PRIMARY KEY NOT NULL,
    customer_id      TEXT,
    amount_cents     BIGINT CHECK (amount_cents > 0),
    currency         TEXT,
    card_last4       TEXT,
    authorization_id TEXT,
    status           TEXT NOT NULL CHECK (status IN ('authorizing', 'authorized', 'declined', 'captured', 'voided')),
    void_pending     BIGINT NOT NULL DEFAULT 0,
    updated_ms       BIGINT NOT NULL
);
