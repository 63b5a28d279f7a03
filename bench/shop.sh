#!/usr/bin/env bash
# End-to-end orders through the gateway: the whole reference shop under `shoal up`
# (release binaries; control plane, gateway and every service its own process on
# this machine, each with its own SQLite database, fsync on commit), loaded by
# clients placing orders as alice and bob for SECONDS after a 3 s warm-up. Prints
# accepted and completed orders per second and the p50/p99 latency of
# POST /api/orders, each against the shop issue's target (500 orders/s, p99 at most
# 100 ms) as the reference.
#
#   bash bench/shop.sh [seconds] [clients]   # 20 and 32 by default
#
# It uses the shop's own shoal.toml (ports 7070, 7071 and 8080 must be free) with
# the gateway's per-client rate limits raised out of the way (two clients on one
# address would measure the limiter) and its access log off; it runs on mutual TLS
# like the shop (gateway to services, service to service). Products are restocked
# through inventory's receipt route first (straight to the instance, over mTLS with
# an operator certificate from the control plane's CA), so orders take the saga's
# long path (reserve, authorize, capture, commit, approve) instead of being
# refused for stock. Nothing to install: there is no reference server to run.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(-p shoal-cli -p shoal-bench)
for p in shop/*/Cargo.toml; do packages+=(-p "shop-$(basename "$(dirname "$p")")"); done
cargo build --release --locked -q "${packages[@]}"
exec target/release/shop-load "$PWD" "${1:-20}" "${2:-32}"
