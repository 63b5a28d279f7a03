#!/usr/bin/env bash
# Service-to-service calls over mTLS against plain HTTP, keep-alive, in one run
# (bench/src/bin/mtls_calls.rs): a control plane with its certificate authority and
# two SDK services in one process, the caller's client calling the other by name
# from CONCURRENCY tasks; rounds alternate plain and mTLS, each figure the median.
# Nothing to install: the reference is the same calls without TLS.
#
#   bash bench/mtls.sh [seconds per round] [concurrency] [rounds]   # 10, 32, 3
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shoal-bench --bin mtls-calls
exec target/release/mtls-calls "${1:-10}" "${2:-32}" "${3:-3}"
