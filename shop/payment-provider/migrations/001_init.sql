-- Card authorizations, one per Idempotency-Key. A declined card is recorded too
-- (status declined), so a repeat of the key answers the decline again.
CREATE TABLE authorizations (
    authorization_id TEXT PRIMARY KEY NOT NULL,
    idempotency_key  TEXT NOT NULL UNIQUE,
    reference        TEXT NOT NULL,
    amount_cents     BIGINT NOT NULL CHECK (amount_cents > 0),
    currency         TEXT NOT NULL,
    card_last4       TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('authorized', 'captured', 'voided', 'declined')),
    created_ms       BIGINT NOT NULL,
    updated_ms       BIGINT NOT NULL
);

CREATE INDEX authorizations_by_reference ON authorizations (reference);

-- Money actually taken: at most one capture per authorization (the key), so a
-- repeated capture cannot take it twice.
CREATE TABLE captures (
    authorization_id TEXT PRIMARY KEY NOT NULL REFERENCES authorizations (authorization_id),
    reference        TEXT NOT NULL,
    amount_cents     BIGINT NOT NULL,
    captured_ms      BIGINT NOT NULL
);
