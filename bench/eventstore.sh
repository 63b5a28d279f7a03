#!/usr/bin/env bash
# Durable append and read throughput of the event store on SQLite and PostgreSQL,
# each beside its floor (plain inserts and selects of the same rows in the same
# batch sizes, same run, same database). SQLite is built in; PostgreSQL is
# installed (Debian package) and started by scripts/postgres, with its default
# durability settings.
#
#   bash bench/eventstore.sh [scale] [sqlite|postgres|both]   # 1.0 and both by default
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/postgres start)"
cargo build --release --locked -q -p shoal-bench --bin eventstore-throughput
exec target/release/eventstore-throughput "${1:-1.0}" "${2:-both}"
