-- Reservations: stock held for one order, all of its items or none.
--
-- A row is written by the first call that names a reservation id and never
-- deleted, so every later call with that id (a saga retry, a resume after a
-- crash) finds out what happened the first time:
--   reserved   the stock is held (available -q, reserved +q);
--   committed  the held stock is gone (reserved -q);
--   released   the hold was given back, or a release came first and nothing was
--              ever held (no items): a late reserve with this id is refused;
--   refused    the reserve was answered out_of_stock or unknown_product (refusal,
--              refused_product), so a repeat answers the same and holds nothing.
CREATE TABLE reservations (
    reservation_id  TEXT PRIMARY KEY NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('reserved', 'committed', 'released', 'refused')),
    refusal         TEXT CHECK (refusal IN ('out_of_stock', 'unknown_product')),
    refused_product TEXT,
    created_ms      BIGINT NOT NULL
);

-- What a reservation holds: one row per product (a product listed twice in a
-- request is summed into one row).
CREATE TABLE reservation_items (
    reservation_id TEXT NOT NULL REFERENCES reservations (reservation_id),
    product_id     TEXT NOT NULL,
    quantity       BIGINT NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (reservation_id, product_id)
);
