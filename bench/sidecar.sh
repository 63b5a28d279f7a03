#!/usr/bin/env bash
# The cost of the sidecar hop (bench/src/bin/sidecar_hop.rs): an open-loop client at
# a constant rate against a small echo server, directly and then through two
# `shoal sidecar` processes (caller's outbound → mTLS → callee's inbound), in one
# run; p50/p90/p99 of both, the added latency, and the two sidecars' CPU from
# /proc. The reference is Dapr's published figure for two sidecars at 1,000
# requests/s: about 0.48 vCPU and 1.4 ms added p90 latency.
#
#   bash bench/sidecar.sh [seconds per phase] [requests per second]   # 20, 1000
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shoal-cli -p shoal-bench --bin shoal --bin sidecar-hop
exec target/release/sidecar-hop target/release/shoal "${1:-20}" "${2:-1000}"
