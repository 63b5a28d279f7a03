#!/usr/bin/env bash
# Durable publish throughput and publish-to-consume latency: the embedded broker
# (hosted by the control plane; it acknowledges only after fsync, with group
# commit) against NATS JetStream (Debian package nats-server 2.9, file storage,
# default acknowledgement: 2.9 acknowledges before it fsyncs, its sync_interval
# option arrived in 2.10), through the same Rust client pattern, in one run.
#
#   bash bench/bus.sh [scale] [figures]  # 1.0 by default; 0.1 for a quick look;
#                                        # figures: lone,pipe,fan,consume,latency (all)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/nats-server start)"
cargo build --release --locked -q -p shoal-cli -p shoal-bench --bin shoal --bin bus-throughput

dir="$(mktemp -d)"
cleanup() {
  if [ -n "${cp_pid:-}" ]; then kill "$cp_pid" 2>/dev/null || true; wait "$cp_pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
broker_port="$(port)"
cat >"$dir/shoal.toml" <<TOML
name = "bus benchmark"
[control_plane]
listen = "127.0.0.1:$(port)"
data_dir = "$dir/cp"
log_level = "warn"
[control_plane.broker]
listen = "127.0.0.1:$broker_port"
TOML
target/release/shoal control-plane --system "$dir/shoal.toml" >"$dir/cp.log" 2>&1 &
cp_pid=$!
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$broker_port") 2>/dev/null; then break; fi
  sleep 0.1
done
target/release/bus-throughput "127.0.0.1:$broker_port" "$NATS_TEST_URL" "${1:-1.0}" "${2:-lone,pipe,fan,consume,latency}"
