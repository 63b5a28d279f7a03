#!/usr/bin/env bash
# Throughput and p99 latency of the gateway (the real `shoal gateway`, which finds
# the upstream through the control plane's registry) against nginx `proxy_pass`
# with a keep-alive upstream pool (Debian's nginx), both forwarding to the same
# trivial upstream (bench/src/bin/gateway_upstream.rs: `GET /hello`, a 13-byte
# body), loaded by wrk (Debian's wrk) for the same time with the same connections,
# one after the other, in one run.
#
#   bash bench/gateway.sh [seconds] [connections]   # 10 and 64 by default
#   ROUNDS=1 bash bench/gateway.sh 5                # a quick look
#   FEATURES=1 bash bench/gateway.sh                # JWT + rate limit + schema (below)
#   FLOOR=1 bash bench/gateway.sh                   # also a bare hyper proxy (below)
#   OVERHEAD=1 bash bench/gateway.sh                # also the gateway with tracing and metrics off
#
# Fairness, on a 2-CPU machine:
# - The proxy under test gets CPU 1 to itself (taskset): nginx with
#   worker_processes 1, the gateway with one tokio worker thread
#   (TOKIO_WORKER_THREADS=1; its other threads are idle). wrk (one thread), the
#   upstream (one thread) and the control plane share CPU 0. Both proxies stay up
#   for the whole run; only the one being measured gets traffic.
# - Same load: wrk -t1 -c<connections> --latency, a warm-up of WARMUP_SECONDS (2)
#   before each measured run, ROUNDS (3) rounds of nginx then the gateway; each
#   figure is the median of its rounds.
# - Same work per request: HTTP/1.1 keep-alive both sides, an idle pool of 64
#   upstream connections (the gateway's pool_max_idle_per_host default; nginx
#   `keepalive 64`), no connection ever closed for its request count (nginx's
#   keepalive_requests raised from 1,000: hyper has no such limit), the
#   X-Forwarded-* headers set by both, no access log on either (ACCESS_LOG=1: both
#   write one line per request, nginx to a file, the gateway its `shoal::access`
#   line to its log, also a file). The gateway runs with its defaults otherwise
#   (log level info, the built-in `default` resilience policy: retry, breaker,
#   bulkhead), its always-on per-client rate limit set out of reach (below).
# - Each round prints the busy share of both CPUs and the proxy's CPU time per
#   request (from /proc), so a saturated load CPU or a neighbour's build shows.
#   When nginx's run shows CPU 0 near 100%, wrk and the upstream were the limit
#   and the reference figure is a floor of what nginx can do.
#
# FLOOR=1 adds a third proxy, pinned and threaded the same way:
# bench/src/bin/gateway_bare_proxy.rs, hyper's server and the same pooled
# hyper-util client the gateway uses, with no routing, policies or telemetry. It
# tells the stack's cost (tokio, hyper) from the gateway's own work per request.
#
# Knobs (environment): ROUNDS, WARMUP_SECONDS, PROXY_CPUS (1), LOAD_CPUS (0),
# ACCESS_LOG (0), FLOOR (0), FEATURES (0); GATEWAY_POLICY (a route `policy`, e.g.
# `none`) and GATEWAY_LOG_LEVEL, to look for where the gateway spends time. nginx
# and wrk are installed with apt-get if missing; nginx runs as the calling user in
# a temporary folder, never as the system's service.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- the plain mode: the gateway's route --------------------------------------
# Written into the system file after `[gateway]`'s own keys (listen, log_level,
# access_log). The gateway checks every request against a per-client rate limit
# (anonymous clients: 50 a second by default, keyed by address, and wrk is one
# address): it stays, set far above what the run reaches, so that it refuses
# nothing. @POLICY_LINE@ becomes `policy = "$GATEWAY_POLICY"` when that is set.
PLAIN_GATEWAY_TOML='
[gateway.rate_limit]
anonymous = { per_second = 1000000000, burst = 1000000000 }

[[gateway.routes]]
prefix = "/hello"
service = "hello"
@POLICY_LINE@
'

# ---- FEATURES=1: JWT + rate limit + JSON Schema on the gateway's route ----------
# The gateway's route of the FEATURES=1 mode, written into the system file in
# place of the plain route (keys: docs/gateway.md). The script fills in: @JWKS_FILE@ (an Ed25519 JWKS it makes), @SCHEMA_FILE@
# (bench/nginx/gateway-hello.schema.json), @ISSUER@, @AUDIENCE@, @SCOPE@. The rate
# limit must sit far above what the run reaches, so that it is checked on every
# request and refuses none (any non-2xx answer fails the run). The environment's
# FEATURES_GATEWAY_TOML, when set, is taken instead (to try a config out).
DEFAULT_FEATURES_GATEWAY_TOML='
[gateway.auth]
issuer = "@ISSUER@"
audience = "@AUDIENCE@"
jwks_file = "@JWKS_FILE@"

[[gateway.routes]]
prefix = "/hello"
service = "hello"
methods = ["POST"]
auth = "required"
scopes = ["@SCOPE@"]
rate_limit = { per_second = 1000000000, burst = 1000000000 }
schema_file = "@SCHEMA_FILE@"
'
FEATURES_GATEWAY_TOML="${FEATURES_GATEWAY_TOML:-$DEFAULT_FEATURES_GATEWAY_TOML}"
# wrk sends bench/nginx/gateway-features.lua's POST (JSON body, bearer token) to
# both; nginx still proxies plainly: it is the reference.
FEATURES_ISSUER="https://bench.shoal.invalid"
FEATURES_AUDIENCE="shoal-bench"
FEATURES_SCOPE="hello:write"
# --------------------------------------------------------------------------------

secs="${1:-10}"
conns="${2:-64}"
rounds="${ROUNDS:-3}"
warmup="${WARMUP_SECONDS:-2}"
proxy_cpus="${PROXY_CPUS:-1}"
load_cpus="${LOAD_CPUS:-0}"
features="${FEATURES:-0}"
access_log="${ACCESS_LOG:-0}"
floor="${FLOOR:-0}"
overhead="${OVERHEAD:-0}"

if [ "$features" = 1 ] && [ -z "$FEATURES_GATEWAY_TOML" ]; then
  echo "bench/gateway.sh: FEATURES=1 needs the gateway's route config: set FEATURES_GATEWAY_TOML at the top of this script" >&2
  exit 2
fi

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ "$features" = 1 ]; then command -v openssl >/dev/null 2>&1 || need+=(openssl); fi
if [ "${#need[@]}" -gt 0 ]; then
  echo "bench/gateway.sh: installing ${need[*]} (Debian packages)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${need[@]}" >&2
fi
nginx_bin="$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)"

cargo build --release --locked -q -p shoal-cli -p shoal-bench --bin shoal --bin gateway-upstream --bin gateway-bare-proxy

threads="$(taskset -c "$proxy_cpus" nproc)"
dir="$(mktemp -d)"
pids=()
cleanup() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do wait "${pids[i]}" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
die() {
  echo "bench/gateway.sh: $1" >&2
  local f
  for f in "$dir"/*.log; do [ -s "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }; done
  exit 1
}
# Wait until `curl` of $1 answers 200 (while process $2 lives).
wait_ok() {
  local _
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    kill -0 "$2" 2>/dev/null || die "the process behind $1 exited"
    sleep 0.05
  done
  die "no 200 from $1"
}

cp_port="$(port)"
gw_port="$(port)"
nginx_port="$(port)"
registry="http://127.0.0.1:$cp_port"

# ---- the control plane and the upstream, on the load CPU ----
cat >"$dir/shoal.toml" <<TOML
name = "gateway benchmark"
# nginx proxies over plain HTTP to a plain upstream: the gateway does the same
# (the mTLS cost is bench/mtls.sh's figure).
[tls]
mode = "off"
[control_plane]
listen = "127.0.0.1:$cp_port"
data_dir = "$dir/cp"
log_level = "warn"
[control_plane.broker]
enabled = false
# Never started by this script (it runs the upstream itself); a gateway route must
# name a service of the file.
[services.hello]
command = ["target/release/gateway-upstream"]
TOML
taskset -c "$load_cpus" target/release/shoal control-plane --system "$dir/shoal.toml" >"$dir/cp.log" 2>&1 &
pids+=($!)
wait_ok "$registry/health/ready" "$!"

taskset -c "$load_cpus" target/release/gateway-upstream "$registry" hello >"$dir/upstream.out" 2>"$dir/upstream.log" &
pids+=($!)
upstream_addr=""
for _ in $(seq 200); do
  upstream_addr="$(awk '$1 == "listening" { print $2 }' "$dir/upstream.out")"
  [ -n "$upstream_addr" ] && break
  sleep 0.05
done
[ -n "$upstream_addr" ] || die "the upstream did not start"

# ---- the gateway, on the proxy CPU ----
if [ "$features" = 1 ]; then
  b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
  openssl genpkey -algorithm ed25519 -out "$dir/jwt-key.pem" 2>/dev/null
  x="$(openssl pkey -in "$dir/jwt-key.pem" -pubout -outform DER | tail -c 32 | b64url)"
  printf '{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"EdDSA","use":"sig","kid":"bench","x":"%s"}]}\n' "$x" >"$dir/jwks.json"
  now="$(date +%s)"
  head_b64="$(printf '{"alg":"EdDSA","typ":"JWT","kid":"bench"}' | b64url)"
  claims_b64="$(printf '{"iss":"%s","aud":"%s","sub":"bench-client","scope":"%s","iat":%d,"nbf":%d,"exp":%d}' \
    "$FEATURES_ISSUER" "$FEATURES_AUDIENCE" "$FEATURES_SCOPE" "$now" "$now" "$((now + 86400))" | b64url)"
  printf '%s.%s' "$head_b64" "$claims_b64" >"$dir/jwt-input"
  sig_b64="$(openssl pkeyutl -sign -rawin -inkey "$dir/jwt-key.pem" -in "$dir/jwt-input" | b64url)"
  export GATEWAY_BENCH_TOKEN="$head_b64.$claims_b64.$sig_b64"
  route_toml="$FEATURES_GATEWAY_TOML"
  route_toml="${route_toml//@JWKS_FILE@/$dir/jwks.json}"
  route_toml="${route_toml//@SCHEMA_FILE@/$PWD/bench/nginx/gateway-hello.schema.json}"
  route_toml="${route_toml//@ISSUER@/$FEATURES_ISSUER}"
  route_toml="${route_toml//@AUDIENCE@/$FEATURES_AUDIENCE}"
  route_toml="${route_toml//@SCOPE@/$FEATURES_SCOPE}"
  wrk_script=(-s bench/nginx/gateway-features.lua)
  check=(curl -s -X POST -H 'content-type: application/json' -H "authorization: Bearer $GATEWAY_BENCH_TOKEN"
    --data '{"sku":"p-1001","quantity":3,"note":"benchmark order","tags":["a","b"]}')
else
  route_toml="${PLAIN_GATEWAY_TOML//@POLICY_LINE@/${GATEWAY_POLICY:+policy = \"$GATEWAY_POLICY\"}}"
  wrk_script=()
  check=(curl -s)
fi
# The [gateway] table: gateway_toml <port> [quiet]. `quiet` (OVERHEAD=1) switches
# tracing and metrics off, the same gateway otherwise.
gateway_toml() {
  echo
  echo "[gateway]"
  echo "listen = \"127.0.0.1:$1\""
  if [ -n "${GATEWAY_LOG_LEVEL:-}" ]; then echo "log_level = \"$GATEWAY_LOG_LEVEL\""; fi
  if [ "$access_log" = 1 ]; then echo "access_log = true"; else echo "access_log = false"; fi
  if [ "${2:-}" = quiet ]; then echo "metrics = false"; fi
  echo "$route_toml"
  if [ "${2:-}" = quiet ]; then printf '\n[gateway.tracing]\nenabled = false\n'; fi
}
cp "$dir/shoal.toml" "$dir/shoal-quiet.toml"
gateway_toml "$gw_port" >>"$dir/shoal.toml"
TOKIO_WORKER_THREADS="$threads" taskset -c "$proxy_cpus" \
  target/release/shoal gateway --system "$dir/shoal.toml" --registry "$registry" >"$dir/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")
wait_ok "http://127.0.0.1:$gw_port/health/ready" "$gw_pid"
# OVERHEAD=1: the same gateway with tracing and metrics off. The other one sends
# every request's two spans (server, client) to the control plane's collector,
# which runs on the load CPU beside wrk and the upstream.
if [ "$overhead" = 1 ]; then
  quiet_port="$(port)"
  gateway_toml "$quiet_port" quiet >>"$dir/shoal-quiet.toml"
  TOKIO_WORKER_THREADS="$threads" taskset -c "$proxy_cpus" \
    target/release/shoal gateway --system "$dir/shoal-quiet.toml" --registry "$registry" >"$dir/gateway-quiet.log" 2>&1 &
  quiet_pid=$!
  pids+=("$quiet_pid")
  wait_ok "http://127.0.0.1:$quiet_port/health/ready" "$quiet_pid"
fi

# ---- nginx, on the proxy CPU ----
mkdir -p "$dir/nginx-body" "$dir/nginx-proxy" "$dir/nginx-fastcgi" "$dir/nginx-uwsgi" "$dir/nginx-scgi"
# Run by root, nginx's workers would switch to `nobody`, who cannot write here.
user_line=""
if [ "$(id -u)" = 0 ]; then user_line="user root;"; fi
access_line="access_log off;"
if [ "$access_log" = 1 ]; then access_line="access_log $dir/nginx-access.log;"; fi
sed -e "s|@USER_LINE@|$user_line|" -e "s|@WORKERS@|$threads|" -e "s|@DIR@|$dir|g" -e "s|@ACCESS_LOG@|$access_line|" \
  -e "s|@UPSTREAM@|$upstream_addr|" -e "s|@LISTEN@|127.0.0.1:$nginx_port|" \
  bench/nginx/gateway.conf >"$dir/nginx.conf"
taskset -c "$proxy_cpus" "$nginx_bin" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" -g 'daemon off;' \
  >"$dir/nginx.log" 2>&1 &
nginx_pid=$!
pids+=("$nginx_pid")
for _ in $(seq 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$nginx_port") 2>/dev/null; then break; fi
  sleep 0.05
done

# ---- FLOOR=1: the bare hyper proxy, on the proxy CPU ----
sides=(gateway:$gw_port nginx:$nginx_port)
if [ "$floor" = 1 ]; then
  floor_port="$(port)"
  TOKIO_WORKER_THREADS="$threads" taskset -c "$proxy_cpus" \
    target/release/gateway-bare-proxy "127.0.0.1:$floor_port" "$upstream_addr" >"$dir/floor.out" 2>"$dir/floor.log" &
  floor_pid=$!
  pids+=("$floor_pid")
  for _ in $(seq 100); do grep -q listening "$dir/floor.out" && break; sleep 0.05; done
  sides+=(floor:$floor_port)
fi
if [ "$overhead" = 1 ]; then sides+=(quiet:$quiet_port); fi

for side in "${sides[@]}"; do
  body="$("${check[@]}" "http://127.0.0.1:${side#*:}/hello" || true)"
  [ "$body" = "hello, world" ] || die "${side%%:*} answered /hello with: $body"
done

# ---- measuring ----
# CPU time (ticks) of a process and its children (nginx's workers).
proc_ticks() {
  local p t=0
  for p in "$1" $(pgrep -P "$1" || true); do
    # utime and stime: fields 14 and 15, counted after the `(comm)` field.
    t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
# Busy and total ticks of some CPUs ("0", "1", "0,1").
cpu_ticks() {
  awk -v want=",$1," '$1 ~ /^cpu[0-9]+$/ && index(want, "," substr($1, 4) ",") {
      for (i = 2; i <= 11; i++) total += $i; idle += $5 + $6 } END { print total - idle, total }' /proc/stat
}
busy_pct() { awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
  t = y[2] - x[2]; printf "%.0f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0) }'; }
# A wrk duration in ms: "812.00us", "1.23ms", "1.02s", "2.00m".
to_ms() { awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
  if (u == "us") n /= 1000; else if (u == "s") n *= 1000; else if (u == "m") n *= 60000; printf "%.3f", n }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int(NR / 2) + 1] }'; }

all_cpus="$(echo "$proxy_cpus,$load_cpus" | tr ',' '\n' | sort -u | paste -sd,)"
before="$(cpu_ticks "$all_cpus")"
sleep 1
idle_busy="$(busy_pct "$before" "$(cpu_ticks "$all_cpus")")"
echo "gateway bench: ${secs}s x $rounds rounds, $conns connections, wrk -t1; proxies on CPU $proxy_cpus ($threads worker(s)), wrk + upstream + control plane on CPU $load_cpus"
echo "upstream $upstream_addr; gateway 127.0.0.1:$gw_port; nginx 127.0.0.1:$nginx_port; CPUs busy before the run: $idle_busy%"
if [ "$idle_busy" -gt 20 ]; then
  echo "warning: the machine is busy before the run ($idle_busy%): other processes will skew the figures" >&2
fi

errors=0
declare -A rps p99 cpu
run() { # run <side> <port> <pid> <round>
  local side="$1" port="$2" pid="$3" out c0 c1 l0 l1 t0 t1
  taskset -c "$load_cpus" wrk -t1 -c"$conns" -d"${warmup}s" "${wrk_script[@]}" "http://127.0.0.1:$port/hello" >/dev/null
  c0="$(cpu_ticks "$proxy_cpus")"; l0="$(cpu_ticks "$load_cpus")"; t0="$(proc_ticks "$pid")"
  out="$(taskset -c "$load_cpus" wrk -t1 -c"$conns" -d"${secs}s" --latency "${wrk_script[@]}" "http://127.0.0.1:$port/hello")"
  c1="$(cpu_ticks "$proxy_cpus")"; l1="$(cpu_ticks "$load_cpus")"; t1="$(proc_ticks "$pid")"
  echo "$out" >"$dir/wrk-$side-$4.txt"
  local r p n sock non2xx
  r="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")"
  p="$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")"
  n="$(awk '/ requests in / { print $1 }' <<<"$out")"
  sock="$(awk '/Socket errors:/ { gsub(/,/, ""); print $4 + $6 + $8 + $10 }' <<<"$out")"
  non2xx="$(awk '/Non-2xx or 3xx responses:/ { print $NF }' <<<"$out")"
  sock="${sock:-0}"
  non2xx="${non2xx:-0}"
  [ -n "$r" ] && [ -n "$n" ] || die "could not read wrk's output: $out"
  local us
  us="$(awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN { printf "%.1f", (n > 0 ? t / hz * 1e6 / n : 0) }')"
  rps[$side]+="$r "
  p99[$side]+="$p "
  cpu[$side]+="$us "
  if [ "$sock" != 0 ] || [ "$non2xx" != 0 ]; then errors=1; fi
  printf '  round %d %-8s %10.1f req/s  p99 %7.3f ms  p50 %s  errors: socket %s, non-2xx %s  CPU %s busy %s%%, CPU %s busy %s%%  proxy CPU %s us/request\n' \
    "$4" "$side" "$r" "$p" "$(awk '$1 == "50%" { print $2 }' <<<"$out")" "$sock" "$non2xx" \
    "$proxy_cpus" "$(busy_pct "$c0" "$c1")" "$load_cpus" "$(busy_pct "$l0" "$l1")" "$us"
}
for round in $(seq "$rounds"); do
  run nginx "$nginx_port" "$nginx_pid" "$round"
  if [ "$floor" = 1 ]; then run floor "$floor_port" "$floor_pid" "$round"; fi
  run gateway "$gw_port" "$gw_pid" "$round"
  if [ "$overhead" = 1 ]; then run quiet "$quiet_port" "$quiet_pid" "$round"; fi
done

# shellcheck disable=SC2086
{
  ours_rps="$(median ${rps[gateway]})"; ref_rps="$(median ${rps[nginx]})"
  ours_p99="$(median ${p99[gateway]})"; ref_p99="$(median ${p99[nginx]})"
}
if [ "$errors" != 0 ]; then
  echo "bench/gateway.sh: some requests failed (socket errors or non-2xx answers above); the figures below do not count" >&2
fi
line() { awk -v m="$1" -v a="$2" -v b="$3" -v u="$4" -v f="$5" 'BEGIN {
  printf "%s: ours " f " %s, reference " f " %s, ratio %.3f\n", m, a, u, b, u, (b > 0 ? a / b : 0) }'; }
# Not targets: what each request cost the proxy's CPU, and (FLOOR=1) how far the
# gateway's own stack gets without the gateway's work.
# shellcheck disable=SC2086
line "proxy CPU time per request" "$(median ${cpu[gateway]})" "$(median ${cpu[nginx]})" us "%.1f"
if [ "$floor" = 1 ]; then
  # shellcheck disable=SC2086
  line "bare hyper proxy (the floor) throughput" "$(median ${rps[floor]})" "$ref_rps" req/s "%.1f"
  # shellcheck disable=SC2086
  line "bare hyper proxy (the floor) CPU time per request" "$(median ${cpu[floor]})" "$(median ${cpu[nginx]})" us "%.1f"
fi
if [ "$overhead" = 1 ]; then
  # shellcheck disable=SC2086
  line "gateway with tracing+metrics on (reference: both off) throughput" "$ours_rps" "$(median ${rps[quiet]})" req/s "%.1f"
  # shellcheck disable=SC2086
  line "gateway with tracing+metrics on (reference: both off) CPU time per request" "$(median ${cpu[gateway]})" "$(median ${cpu[quiet]})" us "%.1f"
  # shellcheck disable=SC2086
  line "gateway with tracing+metrics on (reference: both off) p99 latency" "$ours_p99" "$(median ${p99[quiet]})" ms "%.3f"
fi
if [ "$features" = 1 ]; then
  line "gateway with jwt+ratelimit+schema p99 latency" "$ours_p99" "$ref_p99" ms "%.3f"
  awk -v a="$ours_rps" -v b="$ref_rps" 'BEGIN {
    printf "gateway with jwt+ratelimit+schema: ours %.1f req/s, reference (plain nginx) %.1f req/s, ratio %.3f\n", a, b, (b > 0 ? a / b : 0) }'
else
  line "gateway throughput" "$ours_rps" "$ref_rps" req/s "%.1f"
  line "gateway p99 latency" "$ours_p99" "$ref_p99" ms "%.3f"
fi
exit "$errors"
