-- Customer profiles, keyed by the identity service's username (the token's `sub`).
CREATE TABLE customers (
    id    TEXT PRIMARY KEY NOT NULL,
    name  TEXT NOT NULL,
    email TEXT NOT NULL
);

-- Seed data (development): the identity service's seed users.
INSERT INTO customers (id, name, email) VALUES
    ('alice', 'Alice Example', 'alice@example.com'),
    ('bob', 'Bob Example', 'bob@example.com'),
    ('admin', 'Shop Administrator', 'admin@example.com');
