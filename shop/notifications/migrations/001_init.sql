-- What customers were told: one row per (order, kind of event), so an event seen
-- again under another message id tells nobody twice.
CREATE TABLE notifications (
    message_id    TEXT PRIMARY KEY NOT NULL,
    customer_id   TEXT NOT NULL,
    order_id      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    text          TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (order_id, kind)
);

CREATE INDEX notifications_by_customer ON notifications (customer_id, created_at_ms);
