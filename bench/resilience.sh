#!/usr/bin/env bash
# Cost of the resilience stack per call against the bare service, and fail-fast
# speed of an open breaker against a loopback HTTP call. Nothing to install: the
# reference is the same service without the stack.
#
#   bash bench/resilience.sh [calls]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shoal-bench --bin resilience-overhead
exec target/release/resilience-overhead "${1:-200000}"
