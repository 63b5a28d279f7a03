-- The read model of orders (CQRS): one row per order, kept by the `orders_view`
-- projection from the event store; lists are served from here.
CREATE TABLE orders_view (
    id           TEXT PRIMARY KEY NOT NULL,
    customer_id  TEXT NOT NULL,
    status       TEXT NOT NULL,
    reason       TEXT,
    total_cents  BIGINT NOT NULL,
    items        TEXT NOT NULL,
    placed_at_ms BIGINT NOT NULL,
    version      BIGINT NOT NULL
);
CREATE INDEX orders_view_by_customer ON orders_view (customer_id, placed_at_ms);
CREATE INDEX orders_view_pending ON orders_view (status, placed_at_ms);

-- Idempotency-Key per customer: the order it placed and a digest of the body, so a
-- repeat gets the same order and the same key with another body is refused.
CREATE TABLE idempotency_keys (
    customer_id TEXT NOT NULL,
    key         TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    order_id    TEXT NOT NULL,
    created_ms  BIGINT NOT NULL,
    PRIMARY KEY (customer_id, key)
);
