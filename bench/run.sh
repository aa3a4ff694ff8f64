#!/usr/bin/env bash
# sidekey's performance benchmark: one command, everything on 127.0.0.1, a few minutes.
#
#   bash bench/run.sh            # the full run; writes bench/RESULTS.md
#   bash bench/run.sh --quick    # a ~1 minute smoke (one short round each), written to
#                                # target/bench-quick/RESULTS.md so it never replaces the real one
#
# Compares, in the same run and in interleaved rounds: direct (no proxy: the floor), nginx as a
# reverse proxy setting a static Authorization (the reference), and sidekey. See bench/README.md
# for what each scenario measures and how to read the table.
#
# Environment: BENCH_RATE (fixed-rate load, req/s, default 2000), BENCH_NGINX_WORKERS (nginx
# proxy worker_processes, default auto = one per core, like sidekey's runtime), BENCH_KEEP=1
# (keep the temp dir with configs and logs), BENCH_OUT (where to write the results,
# default bench/RESULTS.md), BENCH_QUIET_PCT / BENCH_WAIT_SECS (before each measurement, wait
# while other work keeps the machine more than 15 % busy, 300 s in all at most).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $arg (try --help)" >&2; exit 64 ;;
  esac
done

if ((QUICK)); then
  ROUNDS=1 WRK_SECS=2 RATE_SECS=3 STARTUP_RUNS=3 CRITERION=(--warm-up-time 0.5 --measurement-time 1)
else
  ROUNDS=3 WRK_SECS=5 RATE_SECS=10 STARTUP_RUNS=7 CRITERION=(--warm-up-time 1 --measurement-time 3)
fi
RATE=${BENCH_RATE:-2000}
RATE_CONNS=16
WRK_CONNS=64
WRK_THREADS=2
SSE_STREAMS=100
HOLD_STREAMS=1000
UPLOAD_MIB=100
NGINX_WORKERS=${BENCH_NGINX_WORKERS:-auto}
QUIET_PCT=${BENCH_QUIET_PCT:-15}
WAIT_BUDGET=${BENCH_WAIT_SECS:-300}
BUSY_MAX=0
if ((QUICK)); then
  OUT=${BENCH_OUT:-$ROOT/target/bench-quick/RESULTS.md}
else
  OUT=${BENCH_OUT:-$ROOT/bench/RESULTS.md}
fi
T0=$SECONDS
unset RUST_LOG # sidekey's log.level = "warn" from the generated config applies

log() { printf '[%4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools: wrk and nginx from Debian; jq for JSON; valgrind for allocation counts.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
command -v valgrind >/dev/null || missing+=(valgrind)
if ((${#missing[@]})); then
  log "installing ${missing[*]} (apt-get)"
  SUDO=()
  ((EUID == 0)) || SUDO=(sudo)
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# ---------------------------------------------------------------------------------------------
# Build. sidekey is built on its own so that the dev-dependency features the examples and the
# criterion bench pull in (tokio "full", "test-util") never reach the binary we measure; the
# binary is copied because `cargo bench` later re-links target/release/sidekey with them.
tmp=$(mktemp -d /tmp/sidekey-bench.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ ${BENCH_KEEP:-0} == 1 || $status != 0 ]]; then
    echo "bench/run.sh: configs and logs kept in $tmp" >&2
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export CARGO_TERM_COLOR=never
log "building (release)"
cargo build --release --locked --quiet --bin sidekey
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
cp "$TARGET_DIR/release/sidekey" "$tmp/sidekey"
cargo build --release --locked --quiet --example bench-upstream --example bench-client
UPSTREAM_BIN="$TARGET_DIR/release/examples/bench-upstream"
CLIENT="$TARGET_DIR/release/examples/bench-client"
BENCH_EXE=$(cargo bench --locked --bench request_path --no-run --message-format=json 2>/dev/null |
  jq -r 'select(.executable != null and .target.name == "request_path") | .executable' | tail -1)
[[ -x $BENCH_EXE ]] || die "could not build benches/request_path.rs"

# ---------------------------------------------------------------------------------------------
# Helpers.
results="$tmp/results.jsonl"
: >"$results"
used_ports=" "
# free_port VAR: a port nothing listens on, not handed out before.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [[ $used_ports == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      used_ports+="$p "
      printf -v "$1" '%s' "$p"
      return
    fi
  done
}
# record SCENARIO TARGET ROUND JSON
record() {
  jq -c --arg s "$1" --arg t "$2" --argjson r "$3" '{scenario: $s, target: $t, round: $r, data: .}' \
    <<<"$4" >>"$results"
}
wait_http() { # URL [SECS]: until it answers 2xx
  local deadline=$((SECONDS + ${2:-30}))
  until curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; do
    ((SECONDS < deadline)) || die "timed out waiting for $1"
    sleep 0.05
  done
}
children() { grep -ls "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3 || true; }
group() { echo "$1" "$(children "$1" | tr '\n' ' ')"; } # a process and its children (nginx: master + workers)
status_kib() { # FIELD PID...: summed over the processes
  local field=$1 total=0 pid v
  shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}
busy_pct() { # how busy the whole machine is over 0.3 s, in percent
  local u n s i w q sq st b1 t1 b2 t2
  read -r _ u n s i w q sq st _ </proc/stat
  b1=$((u + n + s + q + sq + st)) t1=$((u + n + s + i + w + q + sq + st))
  sleep 0.3
  read -r _ u n s i w q sq st _ </proc/stat
  b2=$((u + n + s + q + sq + st)) t2=$((u + n + s + i + w + q + sq + st))
  echo $((100 * (b2 - b1) / (t2 - t1 > 0 ? t2 - t1 : 1)))
}
# Before each measurement (our servers idle): wait, within the budget, while other work (a build,
# a test suite) keeps the machine busy, and remember the worst we measured under.
quiet() {
  local b
  while b=$(busy_pct) && ((b > QUIET_PCT)); do
    if ((WAIT_BUDGET <= 0)); then
      log "the machine is ${b}% busy with other work; measuring anyway (see the warning in the results)"
      break
    fi
    log "waiting: the machine is ${b}% busy with other work (${WAIT_BUDGET}s of waiting left)"
    sleep 5
    WAIT_BUDGET=$((WAIT_BUDGET - 5))
  done
  if ((b > BUSY_MAX)); then BUSY_MAX=$b; fi
}
# attempt FUNC ARGS...: run one measurement (FUNC sets $out) on a quiet machine; if other work
# shows up right after it (so probably during it), measure again, twice at most.
attempt() {
  local tries=0 b
  while :; do
    quiet
    "$@"
    b=$(busy_pct)
    if ((b <= QUIET_PCT || tries >= 2 || WAIT_BUDGET <= 0)); then
      if ((b > BUSY_MAX)); then BUSY_MAX=$b; fi
      return 0
    fi
    log "other work started during that measurement (${b}% busy after it); measuring again"
    tries=$((tries + 1))
  done
}
order() { # ROUND: the targets, rotated each round so none always goes first
  local t=(direct nginx sidekey) r=$(($1 % 3))
  echo "${t[@]:r}" "${t[@]:0:r}"
}

# ---------------------------------------------------------------------------------------------
# Servers.
free_port ORIGIN_PORT; free_port PROXY_PORT; free_port PROXY_SSE_PORT
free_port SK_PORT; free_port SK_ADMIN; free_port SK_SSE_PORT; free_port SK_SSE_ADMIN
free_port SK_NOSCAN_PORT; free_port SK_NOSCAN_ADMIN
free_port START_PORT; free_port START_ADMIN; free_port NSTART_PORT; free_port NSTART_SSE_PORT

log "starting bench-upstream (fake SSE upstream + fake IAM)"
"$UPSTREAM_BIN" --max-secs 1800 >"$tmp/upstream.json" 2>"$tmp/upstream.log" &
pids+=($!)
for _ in $(seq 100); do [[ -s $tmp/upstream.json ]] && break; sleep 0.05; done
UPSTREAM=$(jq -r .upstream "$tmp/upstream.json")
IAM=$(jq -r .iam "$tmp/upstream.json")

# The nginx upstream: the fixed ~1 KB completion, for any method (POST bodies are discarded).
completion=$(tr -d '\n' <"$ROOT/bench/completion.json")
[[ $completion != *"'"* && $completion != *'$'* ]] || die "completion.json must not contain ' or \$"
nginx_common() { # DIR
  cat <<EOF
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
$( ((EUID == 0)) && echo "user root;")
worker_rlimit_nofile 20000;
EOF
}
nginx_http_common() { # DIR
  cat <<EOF
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
EOF
}
mkdir -p "$tmp/origin" "$tmp/proxy" "$tmp/nstart"
cat >"$tmp/origin/nginx.conf" <<EOF
$(nginx_common "$tmp/origin")
worker_processes 1;
events { worker_connections 8192; }
http {
$(nginx_http_common "$tmp/origin")
  server {
    listen 127.0.0.1:$ORIGIN_PORT;
    location = /readyz { return 200 "ok\n"; }
    location / {
      default_type application/json;
      return 200 '$completion';
    }
  }
}
EOF
# The reference proxy: upstream keepalive, a static Authorization, HTTP/1.1, streaming both ways
# (no response buffering for SSE, no request buffering for uploads).
nginx_proxy_conf() { # DIR PORT SSE_PORT
  cat <<EOF
$(nginx_common "$1")
worker_processes $NGINX_WORKERS;
events { worker_connections 8192; }
http {
$(nginx_http_common "$1")
  upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 256; keepalive_requests 1000000; }
  upstream sse { server $UPSTREAM; keepalive 256; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Authorization "Bearer static";
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_read_timeout 300s;
  client_max_body_size 0;
  server {
    listen 127.0.0.1:$2;
    location = /readyz { return 200 "ok\n"; }
    location / { proxy_pass http://origin; }
  }
  server {
    listen 127.0.0.1:$3;
    location / { proxy_pass http://sse; }
  }
}
EOF
}
nginx_proxy_conf "$tmp/proxy" "$PROXY_PORT" "$PROXY_SSE_PORT" >"$tmp/proxy/nginx.conf"
nginx_proxy_conf "$tmp/nstart" "$NSTART_PORT" "$NSTART_SSE_PORT" >"$tmp/nstart/nginx.conf"

log "starting nginx (upstream on :$ORIGIN_PORT, reverse proxy on :$PROXY_PORT and :$PROXY_SSE_PORT)"
"$NGINX" -p "$tmp/origin" -e "$tmp/origin/error.log" -c "$tmp/origin/nginx.conf" &
pids+=($!)
wait_http "http://127.0.0.1:$ORIGIN_PORT/readyz"
"$NGINX" -p "$tmp/proxy" -e "$tmp/proxy/error.log" -c "$tmp/proxy/nginx.conf" &
NGINX_PROXY_PID=$!
pids+=("$NGINX_PROXY_PID")
wait_http "http://127.0.0.1:$PROXY_PORT/readyz"
read -ra NGINX_PIDS <<<"$(group "$NGINX_PROXY_PID")" # master + workers, for RSS

sidekey_conf() { # LISTEN ADMIN BASE_URL
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
# The upload scenario sends 100 MiB.
max_request_body_bytes = 1073741824

[upstream]
base_url = "$3"

[auth]
token_url = "http://$IAM/api/v1/auth/token"

[[auth.credentials]]
name = "bench"
key_id = "bench-key-id"
secret = "bench-secret"

[log]
level = "warn"
EOF
}
# Two sidekeys, because one forwards to one upstream: the JSON scenarios go to the nginx
# upstream (like the direct and nginx runs), the SSE and memory scenarios to bench-upstream.
sidekey_conf "$SK_PORT" "$SK_ADMIN" "http://127.0.0.1:$ORIGIN_PORT/v1" >"$tmp/sidekey-json.toml"
sidekey_conf "$SK_SSE_PORT" "$SK_SSE_ADMIN" "http://$UPSTREAM/v1" >"$tmp/sidekey-sse.toml"
sidekey_conf "$START_PORT" "$START_ADMIN" "http://$UPSTREAM/v1" >"$tmp/sidekey-startup.toml"
# A third, identical but for usage accounting, to price it (issue: < 5 % of throughput).
{ sidekey_conf "$SK_NOSCAN_PORT" "$SK_NOSCAN_ADMIN" "http://127.0.0.1:$ORIGIN_PORT/v1"; printf '\n[usage]\nscan = false\n'; } \
  >"$tmp/sidekey-noscan.toml"
log "starting sidekey (:$SK_PORT -> nginx upstream, :$SK_SSE_PORT -> bench-upstream)"
"$tmp/sidekey" --config "$tmp/sidekey-json.toml" 2>"$tmp/sidekey-json.log" &
SK_PID=$!
pids+=("$SK_PID")
"$tmp/sidekey" --config "$tmp/sidekey-sse.toml" 2>"$tmp/sidekey-sse.log" &
SK_SSE_PID=$!
pids+=("$SK_SSE_PID")
"$tmp/sidekey" --config "$tmp/sidekey-noscan.toml" 2>"$tmp/sidekey-noscan.log" &
pids+=("$!")
wait_http "http://127.0.0.1:$SK_ADMIN/readyz"
wait_http "http://127.0.0.1:$SK_SSE_ADMIN/readyz"
wait_http "http://127.0.0.1:$SK_NOSCAN_ADMIN/readyz"

# Sanity: the same answer through every path, and the proxies really replace Authorization.
for url in "http://127.0.0.1:$ORIGIN_PORT" "http://127.0.0.1:$PROXY_PORT" "http://127.0.0.1:$SK_PORT"; do
  got=$(curl -fsS -X POST -H 'content-type: application/json' --data-binary @"$ROOT/bench/request.json" \
    "$url/v1/chat/completions" | wc -c)
  ((got == ${#completion})) || die "$url answered $got bytes, expected ${#completion}"
done

# ---------------------------------------------------------------------------------------------
# (4a) Idle RSS, before any traffic.
sleep 0.5
record idle_rss nginx 1 "{\"kib\": $(status_kib VmRSS "${NGINX_PIDS[@]}")}"
record idle_rss sidekey 1 "{\"kib\": $(status_kib VmRSS "$SK_SSE_PID")}"
log "idle RSS: sidekey $(status_kib VmRSS "$SK_SSE_PID") KiB, nginx proxy (${#NGINX_PIDS[@]} processes) $(status_kib VmRSS "${NGINX_PIDS[@]}") KiB"

declare -A JSON_URL=(
  [direct]="http://127.0.0.1:$ORIGIN_PORT/v1/chat/completions"
  [nginx]="http://127.0.0.1:$PROXY_PORT/v1/chat/completions"
  [sidekey]="http://127.0.0.1:$SK_PORT/v1/chat/completions"
  [sidekey_noscan]="http://127.0.0.1:$SK_NOSCAN_PORT/v1/chat/completions"
)
declare -A SSE_BASE=(
  [direct]="http://$UPSTREAM/v1"
  [nginx]="http://127.0.0.1:$PROXY_SSE_PORT/v1"
  [sidekey]="http://127.0.0.1:$SK_SSE_PORT/v1"
)

# ---------------------------------------------------------------------------------------------
# (1) Max throughput: wrk, 64 connections, 1 KB JSON in and out.
run_wrk() { # TARGET SECS
  BENCH_BODY="$ROOT/bench/request.json" wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$2s" --timeout 5s \
    -s "$ROOT/bench/wrk-post.lua" "${JSON_URL[$1]}" | sed -n 's/^JSON //p'
}
log "(1) throughput: warm-up"
for t in direct nginx sidekey sidekey_noscan; do run_wrk "$t" 1 >/dev/null; done
m_wrk() { out=$(run_wrk "$1" "$WRK_SECS"); }
for round in $(seq "$ROUNDS"); do
  for t in $(order "$round"); do
    attempt m_wrk "$t"
    record throughput "$t" "$round" "$out"
    log "(1) throughput round $round $t: $(jq -r '"\(.rps|floor) req/s, p99 \(.latency.p99_us) us, errors \(.errors|[.[]]|add)"' <<<"$out")"
  done
  attempt m_wrk sidekey_noscan
  record throughput_noscan sidekey "$round" "$out"
  log "(1) throughput round $round sidekey usage.scan=false: $(jq -r '.rps|floor' <<<"$out") req/s"
done

# ---------------------------------------------------------------------------------------------
# (2) Latency at a moderate fixed rate (open loop).
m_rate() {
  out=$("$CLIENT" rate --url "${JSON_URL[$1]}" --rate "$RATE" --connections "$RATE_CONNS" \
    --seconds "$RATE_SECS" --body "$ROOT/bench/request.json")
}
for round in $(seq "$ROUNDS"); do
  for t in $(order "$round"); do
    attempt m_rate "$t"
    record latency "$t" "$round" "$out"
    log "(2) latency round $round $t at $RATE req/s: $(jq -r '.latency | "p50 \(.p50_us) p90 \(.p90_us) p99 \(.p99_us) p99.9 \(.p999_us) us"' <<<"$out")"
  done
done

# ---------------------------------------------------------------------------------------------
# (3) SSE: 100 concurrent streams of 100 chunks 10 ms apart.
m_sse() {
  out=$("$CLIENT" sse --url "${SSE_BASE[$1]}/chat/completions?stream=1&chunks=100&interval_ms=10" \
    --streams "$SSE_STREAMS")
}
for round in $(seq "$ROUNDS"); do
  for t in $(order "$round"); do
    attempt m_sse "$t"
    record sse "$t" "$round" "$out"
    log "(3) SSE round $round $t: $(jq -r '"\(.ok)/\(.streams) ok, first chunk p99 \(.ttfc.p99_us) us, delay p50 \(.delay.p50_us) p99 \(.delay.p99_us) us"' <<<"$out")"
  done
done

# ---------------------------------------------------------------------------------------------
# (4b) RSS growth during a 100 MiB chunked upload: the peak (VmHWM, reset first through
# /proc/PID/clear_refs) minus the RSS before; sampled every 10 ms where the reset is refused.
m_upload() { # TARGET PIDS...: sets $out
  local t=$1 before peak method sampler
  shift
  before=$(status_kib VmRSS "$@")
  method=VmHWM
  for pid in "$@"; do echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || method=sampled; done
  if [[ $method == sampled ]]; then
    echo "$before" >"$tmp/peak"
    (peak=0; while :; do v=$(status_kib VmRSS "$@"); ((v > peak)) && peak=$v && echo "$peak" >"$tmp/peak"; sleep 0.01; done) &
    sampler=$!
  fi
  out=$("$CLIENT" upload --url "${SSE_BASE[$t]}/upload" --mib "$UPLOAD_MIB")
  if [[ $method == sampled ]]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    peak=$(cat "$tmp/peak")
  else
    peak=$(status_kib VmHWM "$@")
  fi
  local growth=$((peak - before))
  if [[ $t == direct ]]; then growth=null method="no proxy"; fi
  out=$(jq -c --argjson g "$growth" --arg m "$method" '. + {growth_kib: $g, method: $m}' <<<"$out")
}
upload() { # TARGET PIDS...
  attempt m_upload "$@"
  record upload "$1" 1 "$out"
  log "(4) upload $1: $(jq -r '"status \(.status), \(.mib_per_s|floor) MiB/s, RSS growth \(.growth_kib) KiB (\(.method))"' <<<"$out")"
}
upload direct
upload nginx "${NGINX_PIDS[@]}"
upload sidekey "$SK_SSE_PID"

# (4c) RSS with 1,000 open streams (the upstream sends one event a second).
m_hold() { # TARGET PIDS...: sets $out
  local t=$1 client line rss
  shift
  "$CLIENT" hold --url "${SSE_BASE[$t]}/chat/completions?stream=1&chunks=100000&interval_ms=1000" \
    --streams "$HOLD_STREAMS" --seconds 90 >"$tmp/hold-$t.out" &
  client=$!
  for _ in $(seq 1200); do [[ -s $tmp/hold-$t.out ]] && break; sleep 0.05; done
  line=$(head -1 "$tmp/hold-$t.out")
  [[ -n $line ]] || die "hold: no streams opened through $t"
  sleep 2 # a couple of events on every stream
  rss=$(status_kib VmRSS "$@")
  kill "$client" 2>/dev/null || true
  wait "$client" 2>/dev/null || true
  out=$(jq -c --argjson r "$rss" '. + {rss_kib: $r}' <<<"$line")
  sleep 1 # let the proxy drop them
}
hold() { # TARGET PIDS...
  attempt m_hold "$@"
  record hold "$1" 1 "$out"
  log "(4) $HOLD_STREAMS open streams through $1: $(jq -r '"\(.open) open, \(.failed) failed, RSS \(.rss_kib) KiB"' <<<"$out")"
}
hold nginx "${NGINX_PIDS[@]}"
hold sidekey "$SK_SSE_PID"
log "(4) sidekey RSS after the streams closed: $(status_kib VmRSS "$SK_SSE_PID") KiB"

# ---------------------------------------------------------------------------------------------
# (5) Startup to ready: spawn, poll readiness every millisecond (sidekey: /readyz 200, which
# needs a token from the instant IAM; nginx: its proxy answering), stop, repeat.
m_startup_sidekey() {
  out=$("$CLIENT" startup --ready-url "http://127.0.0.1:$START_ADMIN/readyz" --runs "$STARTUP_RUNS" -- \
    "$tmp/sidekey" --config "$tmp/sidekey-startup.toml")
}
m_startup_nginx() {
  out=$("$CLIENT" startup --ready-url "http://127.0.0.1:$NSTART_PORT/readyz" --runs "$STARTUP_RUNS" -- \
    "$NGINX" -p "$tmp/nstart" -e "$tmp/nstart/error.log" -c "$tmp/nstart/nginx.conf")
}
attempt m_startup_sidekey
record startup sidekey 1 "$out"
log "(5) sidekey startup: $(jq -r '"median \(.median_ms) ms (min \(.min_ms), max \(.max_ms))"' <<<"$out")"
attempt m_startup_nginx
record startup nginx 1 "$out"
log "(5) nginx startup: $(jq -r '"median \(.median_ms) ms (min \(.min_ms), max \(.max_ms))"' <<<"$out")"

# The servers are no longer needed; stop them before the micro-benchmark.
for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pids=()

# ---------------------------------------------------------------------------------------------
# (6) Criterion micro-benchmark of the per-request header work, and allocations per call.
log "(6) criterion: benches/request_path.rs"
quiet
(cd "$ROOT" && CRITERION_HOME="$TARGET_DIR/criterion" "$BENCH_EXE" --bench "${CRITERION[@]}" >"$tmp/criterion.log" 2>&1) ||
  die "criterion failed: $(tail -5 "$tmp/criterion.log")"
blocks() { # OP N: heap blocks allocated by the probe under DHAT
  REQUEST_PATH_ALLOC_PROBE="$1:$2" valgrind --tool=dhat --dhat-out-file=/dev/null "$BENCH_EXE" 2>&1 |
    sed -n 's/.*Total:.* in \([0-9,]*\) blocks.*/\1/p' | tr -d ,
}
gross() { # OP: blocks per call, including the header map the op builds first
  local n1=1000 n2=3000 a b
  a=$(blocks "$1" $n1) b=$(blocks "$1" $n2)
  [[ -n $a && -n $b ]] || { echo null; return; }
  awk -v a="$a" -v b="$b" -v n1=$n1 -v n2=$n2 'BEGIN { printf "%.2f", (b - a) / (n2 - n1) }'
}
net() { # OP [BASE_OP]: the op's own allocations per call
  local a b=0
  a=$(gross "$1")
  [[ -n ${2:-} ]] && b=$(gross "$2")
  if [[ $a == null || $b == null ]]; then echo null; else awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", a - b }'; fi
}
for name in uri_rewrite prepare_request token_inject all; do
  est="$TARGET_DIR/criterion/request_path/$name/new/estimates.json"
  ns=$(jq '.median.point_estimate' "$est" 2>/dev/null || echo null)
  allocs=null
  if command -v valgrind >/dev/null; then
    case $name in
      uri_rewrite) allocs=$(net uri) ;;
      prepare_request) allocs=$(net prepare parse) ;;
      token_inject) allocs=$(net token prepare) ;;
      all) allocs=$(net all parse) ;;
    esac
  fi
  record micro sidekey 1 "{\"name\": \"$name\", \"ns\": $ns, \"allocs\": $allocs}"
  log "(6) $name: $ns ns, $allocs allocations per call"
done

# ---------------------------------------------------------------------------------------------
# The report.
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] || rev+=" (with uncommitted changes)"
jq -n \
  --arg nproc "$(nproc)" \
  --arg cpu "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" \
  --arg mem "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
  --arg kernel "$(uname -r)" \
  --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
  --arg rev "$rev" \
  --arg rustc "$(rustc --version)" \
  --arg nginx "$("$NGINX" -v 2>&1 | sed 's/.*: //')" \
  --arg wrk "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)" \
  --arg mode "$( ((QUICK)) && echo 'quick (--quick: 1 short round, a smoke test)' || echo full)" \
  --arg rounds "$ROUNDS" --arg rate "$RATE" \
  --arg wrk_cfg "wrk -t$WRK_THREADS -c$WRK_CONNS -d${WRK_SECS}s per round, after a 1 s warm-up of each target" \
  --arg rate_cfg "bench-client rate: $RATE req/s over $RATE_CONNS keep-alive connections, ${RATE_SECS}s per round" \
  --arg workers "upstream nginx: 1 worker; proxy nginx: worker_processes $NGINX_WORKERS (= $(nproc) here); sidekey: its defaults (one proxy worker thread per core); bench-upstream and bench-client: one thread each" \
  --arg elapsed "$((SECONDS - T0)) s" \
  --arg skcfg "defaults (usage.scan = true, server.replay_buffer_bytes = 1 MiB, ...) except log.level = \"warn\", server.max_request_body_bytes = 1 GiB (for the upload), an inline credential and the addresses" \
  --arg busy "$BUSY_MAX % at most, sampled before and after each measurement (a measurement waits while it is above $QUIET_PCT %, and is taken again if other work shows up right after it)" \
  --arg warning "$( ((BUSY_MAX > QUIET_PCT)) && echo "other work kept the machine up to $BUSY_MAX % busy around a measurement; figures from this run are unreliable" || true)" \
  '[["Cores (nproc)", $nproc], ["CPU", $cpu], ["Memory", $mem], ["Kernel", $kernel], ["Date", $date],
    ["sidekey revision", $rev], ["Rust", $rustc], ["nginx", $nginx], ["wrk", $wrk], ["Mode", $mode],
    ["Rounds", $rounds], ["Fixed rate (req/s)", $rate], ["Throughput load", $wrk_cfg],
    ["Fixed-rate load", $rate_cfg], ["Processes", $workers], ["sidekey configuration", $skcfg], ["Run time (build included)", $elapsed],
    ["Other work on the machine around the measurements", $busy]]
   + (if $warning == "" then [] else [["Warning", $warning]] end)' \
  >"$tmp/meta.json"
"$CLIENT" report --results "$results" --meta "$tmp/meta.json" >"$tmp/RESULTS.md"
mkdir -p "$(dirname "$OUT")"
cp "$tmp/RESULTS.md" "$OUT"
[[ ${BENCH_KEEP:-0} == 1 ]] && cp "$results" "$tmp/results.jsonl.kept"
echo
cat "$OUT"
log "done: results in ${OUT#"$ROOT"/}"
