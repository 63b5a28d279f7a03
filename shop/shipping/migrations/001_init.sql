-- Shipments: exactly one per approved order (UNIQUE order_id), so a repeated
-- order.approved, even with another message id, cannot schedule a second one.
CREATE TABLE shipments (
    shipment_id   TEXT PRIMARY KEY NOT NULL,
    order_id      TEXT NOT NULL UNIQUE,
    customer_id   TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
