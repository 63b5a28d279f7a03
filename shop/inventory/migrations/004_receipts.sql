-- Goods received from suppliers: one row per delivery, keyed by its
-- Idempotency-Key, so a delivery booked twice (a retried call) counts once.
CREATE TABLE stock_receipts (
    receipt_key TEXT PRIMARY KEY NOT NULL,
    product_id  TEXT NOT NULL,
    quantity    BIGINT NOT NULL CHECK (quantity > 0),
    received_ms BIGINT NOT NULL
);
