#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the gateway
# (the real `shoal gateway`, its defaults as in bench/gateway.sh: tracing, metrics,
# the `default` resilience policy, access log off), nginx `proxy_pass` (the same
# bench/nginx/gateway.conf) and the bare hyper proxy (the floor), each forwarding
# `GET /hello` to the same trivial upstream over one keep-alive client connection.
#
#   bash bench/gateway-instructions.sh [requests]   # 3,000 by default; about a minute
#
# Why: bench/gateway.sh's throughput moves by a tenth from run to run on a shared
# machine; an instruction count does not (the same binary and requests give the same
# count to within a few hundred per request), so it tells whether a change to the
# request path made it cheaper. It counts user space only: the kernel's share (the
# socket calls, the same for all three) and cache misses are not in it.
#
# Each proxy runs twice under callgrind, serving 10 and then `requests` requests from
# a Python keep-alive client; the difference of the two totals over the difference of
# the counts is the figure, so start-up and shutdown cancel out. Needs valgrind
# (installed with apt-get if missing) and nginx, as bench/gateway.sh.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
requests="${1:-3000}"
need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  echo "bench/gateway-instructions.sh: installing ${need[*]} (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${need[@]}" >&2
fi
nginx_bin="$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)"
cargo build --release --locked -q -p shoal-cli -p shoal-bench --bin shoal --bin gateway-upstream --bin gateway-bare-proxy

dir="$(mktemp -d)"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cp_port="$(port)"
proxy_port="$(port)"
registry="http://127.0.0.1:$cp_port"
cat >"$dir/shoal.toml" <<TOML
name = "gateway instructions"
[tls]
mode = "off"
[control_plane]
listen = "127.0.0.1:$cp_port"
data_dir = "$dir/cp"
log_level = "warn"
[control_plane.broker]
enabled = false
[services.hello]
command = ["target/release/gateway-upstream"]

[gateway]
listen = "127.0.0.1:$proxy_port"
access_log = false
[gateway.rate_limit]
anonymous = { per_second = 1000000000, burst = 1000000000 }

[[gateway.routes]]
prefix = "/hello"
service = "hello"
TOML
target/release/shoal control-plane --system "$dir/shoal.toml" >"$dir/cp.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do curl -sf "$registry/health/ready" >/dev/null && break; sleep 0.05; done
target/release/gateway-upstream "$registry" hello >"$dir/upstream.out" 2>"$dir/upstream.log" &
pids+=($!)
upstream=""
for _ in $(seq 200); do
  upstream="$(awk '$1 == "listening" { print $2 }' "$dir/upstream.out")"
  [ -n "$upstream" ] && break
  sleep 0.05
done
[ -n "$upstream" ] || { echo "bench/gateway-instructions.sh: the upstream did not start" >&2; exit 1; }
mkdir -p "$dir/nginx-body" "$dir/nginx-proxy" "$dir/nginx-fastcgi" "$dir/nginx-uwsgi" "$dir/nginx-scgi"
user_line=""
if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
sed -e "s|@USER_LINE@|$user_line|" -e "s|@WORKERS@|1|" -e "s|@DIR@|$dir|g" -e "s|@ACCESS_LOG@|access_log off;|" \
  -e "s|@UPSTREAM@|$upstream|" -e "s|@LISTEN@|127.0.0.1:$proxy_port|" \
  bench/nginx/gateway.conf >"$dir/nginx.conf"

# The proxy of `$1` as a command line, in `cmd` (one process: nginx without its master).
proxy_cmd() {
  case "$1" in
    gateway) cmd=(target/release/shoal gateway --system "$dir/shoal.toml" --registry "$registry") ;;
    nginx) cmd=("$nginx_bin" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" -g "daemon off; master_process off;") ;;
    floor) cmd=(target/release/gateway-bare-proxy "127.0.0.1:$proxy_port" "$upstream") ;;
  esac
}
# Total instructions of proxy $1 serving $2 requests.
count() {
  local out="$dir/cg.$1.$2" pid _ cmd
  proxy_cmd "$1"
  TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$out" \
    "${cmd[@]}" >"$dir/$1.$2.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$proxy_port/hello")" = 200 ] && break
    kill -0 "$pid" 2>/dev/null || { echo "bench/gateway-instructions.sh: $1 exited" >&2; tail "$dir/$1.$2.log" >&2; exit 1; }
    sleep 0.1
  done
  python3 - "$proxy_port" "$2" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for _ in range(int(sys.argv[2])):
    c.request("GET", "/hello")
    r = c.getresponse()
    body = r.read()
    if r.status != 200 or body.strip() != b"hello, world":
        sys.exit(f"answer {r.status}: {body[:80]!r}")
PY
  kill -INT "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # nginx and the floor may leave one file per thread or process: add them up.
  cat "$out"* | awk '/^summary:/ { n += $2 } END { print n }'
}
declare -A per
for side in nginx floor gateway; do
  a="$(count "$side" 10)"
  b="$(count "$side" "$requests")"
  per[$side]=$(((b - a) / (requests - 10)))
  echo "  $side: ${per[$side]} instructions per request ($a for 10 requests, $b for $requests)"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
echo "gateway instructions per request: ours ${per[gateway]} instructions, reference (nginx) ${per[nginx]} instructions, ratio $(ratio "${per[gateway]}" "${per[nginx]}")"
echo "bare hyper proxy (the floor) instructions per request: ours ${per[floor]} instructions, reference (nginx) ${per[nginx]} instructions, ratio $(ratio "${per[floor]}" "${per[nginx]}")"
