-- The catalog: products and their current prices.
CREATE TABLE products (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    currency    TEXT NOT NULL
);

-- Seed data (development). The ids are shared with the inventory service's seed stock.
INSERT INTO products (id, name, price_cents, currency) VALUES
    ('p-1', 'Trail running shoes', 12999, 'EUR'),
    ('p-2', 'Merino wool hiking socks', 1899, 'EUR'),
    ('p-3', 'Waterproof shell jacket', 24900, 'EUR'),
    ('p-4', 'Insulated steel water bottle', 2950, 'EUR'),
    ('p-5', 'Ultralight daypack 20 L', 8990, 'EUR'),
    ('p-6', 'Rechargeable LED headlamp', 4499, 'EUR');
