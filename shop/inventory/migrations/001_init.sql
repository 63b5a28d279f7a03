-- Stock per product: what can still be reserved and what is held for orders in flight.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY NOT NULL,
    available  INTEGER NOT NULL CHECK (available >= 0),
    reserved   INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0)
);

-- Seed data (development): the catalog's seed products. p-6 starts out of stock.
INSERT INTO stock (product_id, available, reserved) VALUES
    ('p-1', 100, 0),
    ('p-2', 50, 0),
    ('p-3', 25, 0),
    ('p-4', 10, 0),
    ('p-5', 5, 0),
    ('p-6', 0, 0);
