-- Overflow stock per product. `units` can be taken; `outgoing` is held by a
-- prepared transfer out of the depot (no longer takeable, not yet gone) and
-- `incoming` by a prepared transfer into it (not yet takeable). A transfer's
-- commit or abort moves its units out of these two columns, so neither is ever
-- counted twice.
CREATE TABLE depot_stock (
    product_id TEXT PRIMARY KEY NOT NULL,
    units      INTEGER NOT NULL CHECK (units >= 0),
    outgoing   INTEGER NOT NULL DEFAULT 0 CHECK (outgoing >= 0),
    incoming   INTEGER NOT NULL DEFAULT 0 CHECK (incoming >= 0)
);

-- Seed data (development): the catalog's seed products, 20 units each.
INSERT INTO depot_stock (product_id, units) VALUES
    ('p-1', 20),
    ('p-2', 20),
    ('p-3', 20),
    ('p-4', 20),
    ('p-5', 20),
    ('p-6', 20);
