#!/usr/bin/env bash
# Durable append and read throughput of the event store, each beside its floor
# (plain inserts and selects of the same rows in the same batch sizes, same run,
# same kind of database). SQLite is built in; nothing to install.
#
#   bash bench/eventstore.sh [scale]     # scale 1.0 by default; 0.1 for a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shoal-bench --bin eventstore-throughput
exec target/release/eventstore-throughput "${1:-1.0}"
