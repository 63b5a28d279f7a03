//! The crate's tables, created if missing in the service's own database, in the
//! dialect of its backend (integers are BIGINT on PostgreSQL so both decode as i64).

use shoal_core::Error;
use shoal_db::Db;

const COORDINATOR_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS _shoal_2pc_coordinator_tx (
    tx_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    done INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    decided_at_ms INTEGER,
    done_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS _shoal_2pc_coordinator_tx_open
    ON _shoal_2pc_coordinator_tx (done, created_at_ms);
CREATE TABLE IF NOT EXISTS _shoal_2pc_coordinator_branch (
    tx_id TEXT NOT NULL REFERENCES _shoal_2pc_coordinator_tx (tx_id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    endpoint TEXT NOT NULL,
    acked INTEGER NOT NULL,
    acked_at_ms INTEGER,
    PRIMARY KEY (tx_id, idx)
);
";

const COORDINATOR_POSTGRES: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_2pc_coordinator'));
CREATE TABLE IF NOT EXISTS _shoal_2pc_coordinator_tx (
    tx_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    done BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    deadline_ms BIGINT NOT NULL,
    decided_at_ms BIGINT,
    done_at_ms BIGINT
);
CREATE INDEX IF NOT EXISTS _shoal_2pc_coordinator_tx_open
    ON _shoal_2pc_coordinator_tx (done, created_at_ms);
CREATE TABLE IF NOT EXISTS _shoal_2pc_coordinator_branch (
    tx_id TEXT NOT NULL REFERENCES _shoal_2pc_coordinator_tx (tx_id) ON DELETE CASCADE,
    idx BIGINT NOT NULL,
    endpoint TEXT NOT NULL,
    acked BIGINT NOT NULL,
    acked_at_ms BIGINT,
    PRIMARY KEY (tx_id, idx)
);
COMMIT;
";

const PARTICIPANT_SQLITE: &str = "
CREATE TABLE IF NOT EXISTS _shoal_2pc_participant (
    resource TEXT NOT NULL,
    tx_id TEXT NOT NULL,
    state TEXT NOT NULL,
    coordinator TEXT NOT NULL,
    payload TEXT NOT NULL,
    prepared_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    PRIMARY KEY (resource, tx_id)
);
CREATE INDEX IF NOT EXISTS _shoal_2pc_participant_state
    ON _shoal_2pc_participant (resource, state, prepared_at_ms);
";

const PARTICIPANT_POSTGRES: &str = "
BEGIN;
SELECT pg_advisory_xact_lock(hashtext(current_schema() || '._shoal_2pc_participant'));
CREATE TABLE IF NOT EXISTS _shoal_2pc_participant (
    resource TEXT NOT NULL,
    tx_id TEXT NOT NULL,
    state TEXT NOT NULL,
    coordinator TEXT NOT NULL,
    payload TEXT NOT NULL,
    prepared_at_ms BIGINT NOT NULL,
    finished_at_ms BIGINT,
    PRIMARY KEY (resource, tx_id)
);
CREATE INDEX IF NOT EXISTS _shoal_2pc_participant_state
    ON _shoal_2pc_participant (resource, state, prepared_at_ms);
COMMIT;
";

/// Which side's tables.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Coordinator,
    Participant,
}

/// Create the tables of `side` if missing.
pub(crate) async fn ensure(db: &Db, side: Side) -> Result<(), Error> {
    let (sqlite, postgres, what) = match side {
        Side::Coordinator => (COORDINATOR_SQLITE, COORDINATOR_POSTGRES, "coordinator"),
        Side::Participant => (PARTICIPANT_SQLITE, PARTICIPANT_POSTGRES, "participant"),
    };
    db.ensure_tables(
        sqlite,
        postgres,
        &format!("the two-phase commit {what} tables"),
    )
    .await
}
