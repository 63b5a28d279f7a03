#!/usr/bin/env bash
# Completed 3-step sagas per second with durable state on SQLite (participants in
# the same process), beside the same saga-log rows written one transaction per
# transition, same run, same database settings.
#
#   bash bench/saga.sh [scale]   # 1.0 by default (20,000 sagas each)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shoal-bench --bin saga-throughput
exec target/release/saga-throughput "${1:-1.0}"
