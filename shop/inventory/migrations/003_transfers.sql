-- Stock transfers between this warehouse and the depot, run with two-phase commit.
--
-- Units held by a prepared transfer are in neither `available` nor gone: a transfer
-- out moves them from `available` to `outgoing` (so no order can reserve them while
-- they may leave), a transfer in records them in `incoming` (not yet reservable).
-- The transfer's commit or abort takes them out of these columns again.
ALTER TABLE stock ADD COLUMN outgoing INTEGER NOT NULL DEFAULT 0 CHECK (outgoing >= 0);
ALTER TABLE stock ADD COLUMN incoming INTEGER NOT NULL DEFAULT 0 CHECK (incoming >= 0);

-- One row per transfer asked for (the coordinator's view of the request), keyed by
-- the transfer id, which is also the two-phase commit transaction id: a repeat with
-- the same Idempotency-Key finds it and answers what the first call ended with.
--   running    the transaction is being run (or was interrupted: the coordinator's
--              log says how it ended);
--   committed  the units moved;
--   refused    a warehouse voted no (not enough units, unknown product): nothing moved;
--   aborted    a warehouse could not be reached in time: nothing moved.
CREATE TABLE stock_transfers (
    transfer_id    TEXT PRIMARY KEY NOT NULL,
    product_id     TEXT NOT NULL,
    quantity       BIGINT NOT NULL CHECK (quantity > 0),
    from_warehouse TEXT NOT NULL CHECK (from_warehouse IN ('inventory', 'depot')),
    to_warehouse   TEXT NOT NULL CHECK (to_warehouse IN ('inventory', 'depot')),
    status         TEXT NOT NULL CHECK (status IN ('running', 'committed', 'refused', 'aborted')),
    reason         TEXT,
    requested_by   TEXT NOT NULL,
    created_ms     BIGINT NOT NULL,
    finished_ms    BIGINT
);
