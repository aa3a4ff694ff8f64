#!/usr/bin/env bash
# sidekey's performance benchmark: one command, everything on 127.0.0.1, ~15 minutes.
#
#   bash bench/run.sh            # the full run; writes bench/RESULTS.md and the generated block
#                                # of README.md's performance section
#   bash bench/run.sh --quick    # a ~3 minute smoke (one short round each), written to
#                                # target/bench-quick/RESULTS.md so it never replaces the real one
#
# Compares, in the same run and in interleaved rounds: direct (no proxy), nginx as a reverse
# proxy setting a static Authorization (the reference), sidekey, and a minimal hyper proxy (the
# floor, bench/floor.rs, when it exists), on a plain-HTTP and on an HTTPS upstream. See
# bench/README.md for what each scenario measures and how to read the table.
#
# Environment: BENCH_RATE (fixed-rate load, req/s, default 2000), BENCH_NGINX_WORKERS (nginx
# proxy worker_processes, default auto = one per core, like sidekey's runtime), BENCH_KEEP=1
# (keep the temp dir with configs and logs), BENCH_OUT (where to write the results,
# default bench/RESULTS.md; README.md is then left alone), BENCH_QUIET_PCT / BENCH_WAIT_SECS
# (before each measurement, wait while other work keeps the machine more than 15 % busy, 300 s in
# all at most).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
for arg in "$@"; do
  case $arg in
    --quick) QUICK=1 ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "bench/run.sh: unknown argument $arg (try --help)" >&2; exit 64 ;;
  esac
done

if ((QUICK)); then
  ROUNDS=1 WRK_SECS=2 RATE_SECS=3 SERIAL_SECS=1 STARTUP_RUNS=3 CRITERION=(--warm-up-time 0.5 --measurement-time 1)
else
  ROUNDS=3 WRK_SECS=5 RATE_SECS=10 SERIAL_SECS=3 STARTUP_RUNS=7 CRITERION=(--warm-up-time 1 --measurement-time 3)
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
README_UPDATE=0
if ((QUICK)); then
  OUT=${BENCH_OUT:-$ROOT/target/bench-quick/RESULTS.md}
else
  OUT=${BENCH_OUT:-$ROOT/bench/RESULTS.md}
  [[ -z ${BENCH_OUT:-} ]] && README_UPDATE=1 # the README's generated block, from the same run
fi
T0=$SECONDS
unset RUST_LOG # sidekey's log.level = "warn" from the generated config applies

log() { printf '[%4ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools: wrk and nginx from Debian; jq for JSON; valgrind for allocation counts; openssl for the
# run's throw-away CA.
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v jq >/dev/null || missing+=(jq)
command -v curl >/dev/null || missing+=(curl)
command -v valgrind >/dev/null || missing+=(valgrind)
command -v openssl >/dev/null || missing+=(openssl)
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
# The hyper floor (bench/floor.rs) is measured when the crate has it; the run goes on without.
examples=(--example bench-upstream --example bench-client)
HAVE_FLOOR=0
if grep -q '^name = "bench-floor"' "$ROOT/Cargo.toml"; then
  examples+=(--example bench-floor)
  HAVE_FLOOR=1
fi
cargo build --release --locked --quiet "${examples[@]}"
UPSTREAM_BIN="$TARGET_DIR/release/examples/bench-upstream"
CLIENT="$TARGET_DIR/release/examples/bench-client"
FLOOR_BIN="$TARGET_DIR/release/examples/bench-floor"
((HAVE_FLOOR)) || log "no bench-floor example in Cargo.toml: the hyper floor is not measured"
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
order() { # ROUND TARGET...: the targets, rotated each round so none always goes first
  local round=$1
  shift
  local t=("$@")
  local r=$((round % ${#t[@]}))
  echo "${t[@]:r}" "${t[@]:0:r}"
}
# CPU time of processes (all their threads), in clock ticks: utime + stime from /proc/PID/stat.
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # PID...: summed over the processes
  local total=0 pid stat f
  for pid in "$@"; do
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
    stat=${stat##*) } # the fields after "pid (comm) ", from field 3 (state) on
    read -ra f <<<"$stat"
    total=$((total + f[11] + f[12])) # fields 14 (utime) and 15 (stime)
  done
  echo "$total"
}

# ---------------------------------------------------------------------------------------------
# Servers.
free_port ORIGIN_PORT; free_port ORIGIN_TLS_PORT; free_port PROXY_PORT; free_port PROXY_SSE_PORT
free_port PROXY_TLS_PORT; free_port PROXY_SSE_TLS_PORT
free_port START_PORT; free_port START_ADMIN; free_port NSTART_PORT; free_port NSTART_SSE_PORT

# A throw-away CA and a leaf for 127.0.0.1 (SAN IP:127.0.0.1 and DNS:localhost), ECDSA P-256,
# for the HTTPS upstream scenario; they live and die with the temp dir.
CA="$tmp/tls/ca.pem"
mkdir -p "$tmp/tls"
(
  cd "$tmp/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=sidekey bench throw-away CA" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr \
    -subj "/CN=127.0.0.1" 2>/dev/null
  printf '%s\n' 'subjectAltName=IP:127.0.0.1,DNS:localhost' 'basicConstraints=critical,CA:FALSE' \
    'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >leaf.ext
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 \
    -extfile leaf.ext 2>/dev/null
  openssl verify -CAfile ca.pem leaf.pem >/dev/null
) || die "could not generate the TLS certificates with openssl"

log "starting bench-upstream (fake SSE upstream, plain and TLS, + fake IAM)"
"$UPSTREAM_BIN" --max-secs 3600 --cert "$tmp/tls/leaf.pem" --key "$tmp/tls/leaf.key" \
  >"$tmp/upstream.json" 2>"$tmp/upstream.log" &
pids+=($!)
for _ in $(seq 100); do [[ -s $tmp/upstream.json ]] && break; sleep 0.05; done
UPSTREAM=$(jq -r .upstream "$tmp/upstream.json")
UPSTREAM_TLS=$(jq -r .upstream_tls "$tmp/upstream.json")
IAM=$(jq -r .iam "$tmp/upstream.json")

# The nginx upstream: the fixed ~1 KB completion, for any method (POST bodies are discarded), in
# plain HTTP and over TLS (HTTP/1.1 or h2 by ALPN). /v1/sanity/proto (TLS only, for the checks
# below) answers with the protocol a request arrived with.
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
mkdir -p "$tmp/origin" "$tmp/proxy" "$tmp/proxy-tls" "$tmp/nstart"
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
  server {
    listen 127.0.0.1:$ORIGIN_TLS_PORT ssl http2;
    ssl_certificate $tmp/tls/leaf.pem;
    ssl_certificate_key $tmp/tls/leaf.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location = /readyz { return 200 "ok\n"; }
    location = /v1/sanity/proto {
      default_type text/plain;
      return 200 "\$server_protocol \$ssl_protocol \$ssl_cipher\n";
    }
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
# The same reference proxy to the HTTPS upstreams, a separate nginx (so the plain proxy's idle
# RSS and startup stay what they were): HTTP/1.1 over TLS (nginx has no HTTP/2 to upstreams),
# kept-alive TLS connections, the certificate verified against the run's CA (name: localhost,
# sent as SNI; nginx checks DNS names, not IP addresses), TLS 1.2 or 1.3 (1.22's default list
# lacks 1.3), sessions reused.
cat >"$tmp/proxy-tls/nginx.conf" <<EOF
$(nginx_common "$tmp/proxy-tls")
worker_processes $NGINX_WORKERS;
events { worker_connections 8192; }
http {
$(nginx_http_common "$tmp/proxy-tls")
  upstream origin_tls { server 127.0.0.1:$ORIGIN_TLS_PORT; keepalive 256; keepalive_requests 1000000; }
  upstream sse_tls { server $UPSTREAM_TLS; keepalive 256; keepalive_requests 1000000; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_set_header Authorization "Bearer static";
  proxy_buffering off;
  proxy_request_buffering off;
  proxy_read_timeout 300s;
  client_max_body_size 0;
  proxy_ssl_trusted_certificate $CA;
  proxy_ssl_verify on;
  proxy_ssl_verify_depth 2;
  proxy_ssl_name localhost;
  proxy_ssl_server_name on;
  proxy_ssl_protocols TLSv1.2 TLSv1.3;
  proxy_ssl_session_reuse on;
  server {
    listen 127.0.0.1:$PROXY_TLS_PORT;
    location = /readyz { return 200 "ok\n"; }
    location / { proxy_pass https://origin_tls; }
  }
  server {
    listen 127.0.0.1:$PROXY_SSE_TLS_PORT;
    location / { proxy_pass https://sse_tls; }
  }
}
EOF

log "starting nginx (upstream on :$ORIGIN_PORT and TLS :$ORIGIN_TLS_PORT, reverse proxies on :$PROXY_PORT, :$PROXY_SSE_PORT, TLS upstream :$PROXY_TLS_PORT, :$PROXY_SSE_TLS_PORT)"
"$NGINX" -p "$tmp/origin" -e "$tmp/origin/error.log" -c "$tmp/origin/nginx.conf" &
ORIGIN_PID=$!
pids+=("$ORIGIN_PID")
wait_http "http://127.0.0.1:$ORIGIN_PORT/readyz"
"$NGINX" -p "$tmp/proxy" -e "$tmp/proxy/error.log" -c "$tmp/proxy/nginx.conf" &
NGINX_PROXY_PID=$!
pids+=("$NGINX_PROXY_PID")
"$NGINX" -p "$tmp/proxy-tls" -e "$tmp/proxy-tls/error.log" -c "$tmp/proxy-tls/nginx.conf" &
NGINX_TLS_PID=$!
pids+=("$NGINX_TLS_PID")
wait_http "http://127.0.0.1:$PROXY_PORT/readyz"
wait_http "http://127.0.0.1:$PROXY_TLS_PORT/readyz"
read -ra ORIGIN_PIDS <<<"$(group "$ORIGIN_PID")"        # master + worker, for CPU
read -ra NGINX_PIDS <<<"$(group "$NGINX_PROXY_PID")"    # master + workers, for RSS and CPU
read -ra NGINX_TLS_PIDS <<<"$(group "$NGINX_TLS_PID")"

sidekey_conf() { # LISTEN ADMIN BASE_URL [MORE_UPSTREAM_LINES]
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
# The upload scenario sends 100 MiB.
max_request_body_bytes = 1073741824

[upstream]
base_url = "$3"
${4:-}

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
declare -A SK_PID_OF SK_PORT_OF SK_ADMIN_OF
start_sidekey() { # NAME BASE_URL [MORE_UPSTREAM_LINES [MORE_TOML]]: $tmp/sidekey-NAME.toml, started
  local name=$1 port admin
  free_port port
  free_port admin
  { sidekey_conf "$port" "$admin" "$2" "${3:-}"; printf '%s' "${4:-}"; } >"$tmp/sidekey-$name.toml"
  "$tmp/sidekey" --config "$tmp/sidekey-$name.toml" 2>"$tmp/sidekey-$name.log" &
  pids+=("$!")
  SK_PID_OF[$name]=$! SK_PORT_OF[$name]=$port SK_ADMIN_OF[$name]=$admin
}
# Client authentication, to price it: one [[clients]] key, and HS256 signed keys.
CLIENT_KEY="sk-bench-$(openssl rand -hex 24)"
echo "$CLIENT_KEY" >"$tmp/client-keys"
openssl rand -hex 32 >"$tmp/signing-key"
SIGNED_KEY=$("$tmp/sidekey" mint --secret-file "$tmp/signing-key" --ttl 2h) || die "sidekey mint failed"
PLAIN_BASE="http://127.0.0.1:$ORIGIN_PORT/v1"
TLS_BASE="https://127.0.0.1:$ORIGIN_TLS_PORT/v1"
# One sidekey per upstream: the JSON scenarios go to the nginx upstream (like the direct and nginx
# runs), the SSE and memory scenarios to bench-upstream; the others are variants, each priced
# against the first in the same rounds.
log "starting sidekey ×9 (JSON, SSE, usage.scan = false, [[clients]], [signed_keys]; TLS upstream h1 and h2, JSON and SSE)"
start_sidekey json "$PLAIN_BASE"
start_sidekey sse "http://$UPSTREAM/v1"
start_sidekey noscan "$PLAIN_BASE" "" $'\n[usage]\nscan = false\n'
start_sidekey clients "$PLAIN_BASE" "" $'\n[[clients]]\nname = "bench"\nkeys_file = "'"$tmp/client-keys"$'"\n'
start_sidekey signed "$PLAIN_BASE" "" $'\n[signed_keys]\nhs256_secret_file = "'"$tmp/signing-key"$'"\n'
start_sidekey tls "$TLS_BASE" "ca_file = \"$CA\""$'\nhttp2 = false'
start_sidekey tls_h2 "$TLS_BASE" "ca_file = \"$CA\""
start_sidekey sse_tls "https://$UPSTREAM_TLS/v1" "ca_file = \"$CA\""$'\nhttp2 = false'
start_sidekey sse_tls_h2 "https://$UPSTREAM_TLS/v1" "ca_file = \"$CA\""
sidekey_conf "$START_PORT" "$START_ADMIN" "http://$UPSTREAM/v1" >"$tmp/sidekey-startup.toml"
SK_PID=${SK_PID_OF[json]} SK_SSE_PID=${SK_PID_OF[sse]}
for name in "${!SK_ADMIN_OF[@]}"; do wait_http "http://127.0.0.1:${SK_ADMIN_OF[$name]}/readyz"; done

# The hyper floor: the same forwarding with nothing else, plain and to the TLS upstream.
declare -A FLOOR_PID_OF FLOOR_PORT_OF
start_floor() { # NAME UPSTREAM [ARGS...]
  local name=$1 port
  shift
  free_port port
  "$FLOOR_BIN" --listen "127.0.0.1:$port" --upstream "$@" >"$tmp/floor-$name.log" 2>&1 &
  pids+=("$!")
  FLOOR_PID_OF[$name]=$! FLOOR_PORT_OF[$name]=$port
}
if ((HAVE_FLOOR)); then
  log "starting the hyper floor ×3 (plain; TLS upstream h1 and h2)"
  start_floor plain "http://127.0.0.1:$ORIGIN_PORT"
  start_floor tls "https://127.0.0.1:$ORIGIN_TLS_PORT" --ca-file "$CA"
  start_floor tls_h2 "https://127.0.0.1:$ORIGIN_TLS_PORT" --ca-file "$CA" --http2
  for name in "${!FLOOR_PORT_OF[@]}"; do wait_http "http://127.0.0.1:${FLOOR_PORT_OF[$name]}/readyz"; done
fi

# Every target of every scenario, as KIND/TARGET (KIND: plain or tls): where its JSON requests
# go, which processes' CPU it costs, and the Authorization the client sends.
sk() { echo "http://127.0.0.1:${SK_PORT_OF[$1]}"; }
declare -A URL=(
  [plain/direct]="http://127.0.0.1:$ORIGIN_PORT"
  [plain/nginx]="http://127.0.0.1:$PROXY_PORT"
  [plain/sidekey]="$(sk json)"
  [plain/sidekey_noscan]="$(sk noscan)"
  [plain/sidekey_clients]="$(sk clients)"
  [plain/sidekey_signed]="$(sk signed)"
  [tls/direct]="https://127.0.0.1:$ORIGIN_TLS_PORT"
  [tls/nginx]="http://127.0.0.1:$PROXY_TLS_PORT"
  [tls/sidekey]="$(sk tls)"
  [tls/sidekey_h2]="$(sk tls_h2)"
)
declare -A CPU_PIDS=(
  [plain/nginx]="${NGINX_PIDS[*]}"
  [plain/sidekey]="$SK_PID"
  [plain/sidekey_noscan]="${SK_PID_OF[noscan]}"
  [plain/sidekey_clients]="${SK_PID_OF[clients]}"
  [plain/sidekey_signed]="${SK_PID_OF[signed]}"
  [tls/nginx]="${NGINX_TLS_PIDS[*]}"
  [tls/sidekey]="${SK_PID_OF[tls]}"
  [tls/sidekey_h2]="${SK_PID_OF[tls_h2]}"
)
declare -A AUTH=(
  [plain/sidekey_clients]="Bearer $CLIENT_KEY"
  [plain/sidekey_signed]="Bearer $SIGNED_KEY"
)
declare -A SSE_BASE=(
  [plain/direct]="http://$UPSTREAM/v1"
  [plain/nginx]="http://127.0.0.1:$PROXY_SSE_PORT/v1"
  [plain/sidekey]="$(sk sse)/v1"
  [tls/direct]="https://$UPSTREAM_TLS/v1"
  [tls/nginx]="http://127.0.0.1:$PROXY_SSE_TLS_PORT/v1"
  [tls/sidekey]="$(sk sse_tls)/v1"
  [tls/sidekey_h2]="$(sk sse_tls_h2)/v1"
)
PLAIN_TARGETS=(direct nginx sidekey)
TLS_TARGETS=(direct nginx sidekey sidekey_h2)
THROUGHPUT_PLAIN=("${PLAIN_TARGETS[@]}")
THROUGHPUT_TLS=("${TLS_TARGETS[@]}")
if ((HAVE_FLOOR)); then
  URL[plain/floor]="http://127.0.0.1:${FLOOR_PORT_OF[plain]}"
  URL[tls/floor]="http://127.0.0.1:${FLOOR_PORT_OF[tls]}"
  URL[tls/floor_h2]="http://127.0.0.1:${FLOOR_PORT_OF[tls_h2]}"
  CPU_PIDS[plain/floor]=${FLOOR_PID_OF[plain]}
  CPU_PIDS[tls/floor]=${FLOOR_PID_OF[tls]}
  CPU_PIDS[tls/floor_h2]=${FLOOR_PID_OF[tls_h2]}
  THROUGHPUT_PLAIN+=(floor)
  THROUGHPUT_TLS+=(floor floor_h2)
fi
THROUGHPUT_PLAIN+=(sidekey_noscan sidekey_clients sidekey_signed)

# Sanity: the same answer through every path, the proxies really replace Authorization, client
# auth is really on, and each TLS path speaks the protocol it should to the upstream.
for key in "${!URL[@]}"; do
  got=$(curl -fsS --cacert "$CA" -X POST -H 'content-type: application/json' \
    -H "Authorization: ${AUTH[$key]:-Bearer sk-placeholder}" --data-binary @"$ROOT/bench/request.json" \
    "${URL[$key]}/v1/chat/completions" | wc -c) || die "$key (${URL[$key]}) failed"
  ((got == ${#completion})) || die "$key (${URL[$key]}) answered $got bytes, expected ${#completion}"
done
for key in plain/sidekey_clients plain/sidekey_signed; do
  code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H 'content-type: application/json' \
    -H 'Authorization: Bearer sk-not-a-client-key' --data-binary @"$ROOT/bench/request.json" \
    "${URL[$key]}/v1/chat/completions")
  [[ $code == 401 ]] || die "$key answered $code to an unknown key, expected 401"
done
for t in "${THROUGHPUT_TLS[@]}"; do
  json=$(curl -fsS --http1.1 --cacert "$CA" "${URL[tls/$t]}/v1/sanity/proto") || die "tls/$t: no /v1/sanity/proto"
  sse="—"
  if [[ -n ${SSE_BASE[tls/$t]:-} ]]; then
    sse=$(curl -fsS --http1.1 --cacert "$CA" "${SSE_BASE[tls/$t]}/sanity/proto") || die "tls/$t: SSE path has no /v1/sanity/proto"
    got=$(curl -fsS -N --cacert "$CA" -X POST -H 'content-type: application/json' --data '{"stream":true}' \
      "${SSE_BASE[tls/$t]}/chat/completions?chunks=3&interval_ms=1" | grep -c '^data: ') || true
    ((got == 4)) || die "tls/$t: the SSE stream had $got events, expected 4 (3 and [DONE])"
  fi
  case $t in
    sidekey_h2 | floor_h2) want=HTTP/2.0 ;;
    *) want=HTTP/1.1 ;;
  esac
  for seen in "$json" "$sse"; do
    [[ $seen == "—" || $seen == "$want"* ]] && continue
    if [[ $t == floor* ]]; then
      log "warning: tls/$t spoke ${seen%% *} to the upstream, expected $want"
    else
      die "tls/$t spoke ${seen%% *} to the upstream, expected $want"
    fi
  done
  record tls_proto "$t" 1 "$(jq -nc --arg j "$json" --arg s "$sse" '{json: $j, sse: $s}')"
  log "TLS path $t: JSON upstream saw '$json', SSE upstream saw '$sse'"
done

# ---------------------------------------------------------------------------------------------
# (4a) Idle RSS, before any traffic.
sleep 0.5
record idle_rss nginx 1 "{\"kib\": $(status_kib VmRSS "${NGINX_PIDS[@]}")}"
record idle_rss sidekey 1 "{\"kib\": $(status_kib VmRSS "$SK_SSE_PID")}"
log "idle RSS: sidekey $(status_kib VmRSS "$SK_SSE_PID") KiB, nginx proxy (${#NGINX_PIDS[@]} processes) $(status_kib VmRSS "${NGINX_PIDS[@]}") KiB"

# ---------------------------------------------------------------------------------------------
# (1) and (7a) Max throughput: wrk, 64 connections, 1 KB JSON in and out, plain and TLS
# upstream; the CPU time the proxy (and the upstream nginx) spent, from /proc, sampled right
# before and after each wrk run, divided by the requests wrk completed.
run_wrk() { # KIND TARGET SECS
  BENCH_BODY="$ROOT/bench/request.json" BENCH_AUTH="${AUTH[$1/$2]:-}" \
    wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"$3s" --timeout 5s -s "$ROOT/bench/wrk-post.lua" \
    "${URL[$1/$2]}/v1/chat/completions" | sed -n 's/^JSON //p'
}
m_wrk() { # KIND TARGET: sets $out
  local proxy p0 p1 o0 o1
  read -ra proxy <<<"${CPU_PIDS[$1/$2]:-}"
  p0=$(cpu_ticks "${proxy[@]}") o0=$(cpu_ticks "${ORIGIN_PIDS[@]}")
  out=$(run_wrk "$1" "$2" "$WRK_SECS")
  p1=$(cpu_ticks "${proxy[@]}") o1=$(cpu_ticks "${ORIGIN_PIDS[@]}")
  out=$(jq -c --argjson p $((p1 - p0)) --argjson o $((o1 - o0)) --argjson hz "$CLK_TCK" \
    --argjson n "${#proxy[@]}" '. + {cpu: {clk_tck: $hz, processes: $n,
      proxy_s: (if $n > 0 then $p / $hz else null end), origin_s: ($o / $hz),
      proxy_us_per_req: (if $n > 0 and .requests > 0 then $p / $hz * 1e6 / .requests else null end),
      origin_us_per_req: (if .requests > 0 then $o / $hz * 1e6 / .requests else null end)}}' <<<"$out")
}
wrk_line='"\(.rps|floor) req/s, p99 \(.latency.p99_us) us, CPU \(.cpu.proxy_us_per_req // "-" | if type == "number" then (. * 10 | round / 10) else . end) us/req (upstream \(.cpu.origin_us_per_req * 10 | round / 10)), errors \(.errors|[.[]]|add)"'
throughput() { # KIND SCENARIO LABEL TARGET...
  local kind=$1 scenario=$2 label=$3 round t
  shift 3
  log "$label throughput: warm-up"
  for t in "$@"; do run_wrk "$kind" "$t" 1 >/dev/null; done
  for round in $(seq "$ROUNDS"); do
    for t in $(order "$round" "$@"); do
      attempt m_wrk "$kind" "$t"
      record "$scenario" "$t" "$round" "$out"
      log "$label throughput round $round $t: $(jq -r "$wrk_line" <<<"$out")"
    done
  done
}
throughput plain throughput "(1)" "${THROUGHPUT_PLAIN[@]}"
throughput tls tls_throughput "(7) TLS" "${THROUGHPUT_TLS[@]}"

# ---------------------------------------------------------------------------------------------
# (2) and (7b) Latency at a moderate fixed rate (open loop), then at one connection (closed loop).
m_rate() { # KIND TARGET
  out=$("$CLIENT" rate --url "${URL[$1/$2]}/v1/chat/completions" --ca-file "$CA" --rate "$RATE" \
    --connections "$RATE_CONNS" --seconds "$RATE_SECS" --body "$ROOT/bench/request.json")
}
m_serial() { # KIND TARGET
  out=$("$CLIENT" serial --url "${URL[$1/$2]}/v1/chat/completions" --ca-file "$CA" \
    --seconds "$SERIAL_SECS" --body "$ROOT/bench/request.json")
}
latency() { # KIND SCENARIO LABEL TARGET...
  local kind=$1 scenario=$2 label=$3 round t
  shift 3
  for round in $(seq "$ROUNDS"); do
    for t in $(order "$round" "$@"); do
      attempt m_rate "$kind" "$t"
      record "$scenario" "$t" "$round" "$out"
      log "$label latency round $round $t at $RATE req/s: $(jq -r '.latency | "p50 \(.p50_us) p90 \(.p90_us) p99 \(.p99_us) p99.9 \(.p999_us) us"' <<<"$out")"
    done
  done
}
serial() { # KIND SCENARIO LABEL TARGET...
  local kind=$1 scenario=$2 label=$3 round t
  shift 3
  for round in $(seq "$ROUNDS"); do
    for t in $(order "$round" "$@"); do
      attempt m_serial "$kind" "$t"
      record "$scenario" "$t" "$round" "$out"
      log "$label one connection round $round $t: $(jq -r '"\(.rps|floor) req/s, p50 \(.latency.p50_us) p99 \(.latency.p99_us) us"' <<<"$out")"
    done
  done
}
latency plain latency "(2)" "${PLAIN_TARGETS[@]}"
latency tls tls_latency "(7) TLS" "${TLS_TARGETS[@]}"
serial plain serial "(2)" "${PLAIN_TARGETS[@]}"
serial tls tls_serial "(7) TLS" "${TLS_TARGETS[@]}"

# ---------------------------------------------------------------------------------------------
# (3) and (7c) SSE: 100 concurrent streams of 100 chunks 10 ms apart.
m_sse() { # KIND TARGET
  out=$("$CLIENT" sse --url "${SSE_BASE[$1/$2]}/chat/completions?stream=1&chunks=100&interval_ms=10" \
    --ca-file "$CA" --streams "$SSE_STREAMS")
}
sse() { # KIND SCENARIO LABEL TARGET...
  local kind=$1 scenario=$2 label=$3 round t
  shift 3
  # One untimed burst of the same streams first, so each proxy's upstream pool holds its
  # connections (over TLS a new upstream connection is a handshake on single-threaded
  # bench-upstream, and 100 of them would be what round 1 measured).
  for t in "$@"; do
    "$CLIENT" sse --url "${SSE_BASE[$kind/$t]}/chat/completions?stream=1&chunks=10&interval_ms=10" \
      --ca-file "$CA" --streams "$SSE_STREAMS" >/dev/null
  done
  for round in $(seq "$ROUNDS"); do
    for t in $(order "$round" "$@"); do
      attempt m_sse "$kind" "$t"
      record "$scenario" "$t" "$round" "$out"
      log "$label SSE round $round $t: $(jq -r '"\(.ok)/\(.streams) ok, first chunk p99 \(.ttfc.p99_us) us, delay p50 \(.delay.p50_us) p99 \(.delay.p99_us) us"' <<<"$out")"
    done
  done
}
sse plain sse "(3)" "${PLAIN_TARGETS[@]}"
sse tls tls_sse "(7) TLS" "${TLS_TARGETS[@]}"

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
  out=$("$CLIENT" upload --url "${SSE_BASE[plain/$t]}/upload" --mib "$UPLOAD_MIB")
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
  "$CLIENT" hold --url "${SSE_BASE[plain/$t]}/chat/completions?stream=1&chunks=100000&interval_ms=1000" \
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
# The caller path (client keys, routes, signed keys): these ops build nothing per call, so
# nothing is subtracted.
for name in client_key_1 client_key_100 route_5 signed_verify resolve_open resolve_client resolve_signed; do
  est="$TARGET_DIR/criterion/caller_path/$name/new/estimates.json"
  [[ -f $est ]] || continue
  ns=$(jq '.median.point_estimate' "$est" 2>/dev/null || echo null)
  allocs=null
  command -v valgrind >/dev/null && allocs=$(net "$name")
  record micro_caller sidekey 1 "{\"name\": \"$name\", \"ns\": $ns, \"allocs\": $allocs}"
  log "(6) caller path $name: $ns ns, $allocs allocations per call"
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
  --arg serial_cfg "bench-client serial: one keep-alive connection, one request at a time, ${SERIAL_SECS}s per round after 200 warm-up requests" \
  --arg cpu_cfg "utime + stime of the proxy's processes (nginx: master + workers) from /proc/PID/stat, clock tick $((1000 / CLK_TCK)) ms, sampled right before and after each wrk run, divided by the requests wrk completed" \
  --arg tls_cfg "throw-away ECDSA P-256 CA and leaf (openssl); upstream nginx: listen ssl http2, TLS 1.2/1.3; bench-upstream: rustls, h2 + http/1.1 by ALPN; proxy nginx: proxy_pass https:// over HTTP/1.1, keepalive 256, proxy_ssl_verify on, session reuse; sidekey: upstream.ca_file, http2 = false (h1) or true (h2, the default)" \
  --arg floor_cfg "$( ((HAVE_FLOOR)) && echo "bench-floor (bench/floor.rs), its defaults; TLS: --ca-file, h2 with --http2" || echo "not measured: no bench-floor example in Cargo.toml")" \
  --arg workers "upstream nginx: 1 worker; proxy nginx: worker_processes $NGINX_WORKERS (= $(nproc) here); sidekey: its defaults (one proxy worker thread per core); bench-upstream and bench-client: one thread each" \
  --arg elapsed "$((SECONDS - T0)) s" \
  --arg skcfg "defaults (usage.scan = true, server.replay_buffer_bytes = 1 MiB, ...) except log.level = \"warn\", server.max_request_body_bytes = 1 GiB (for the upload), an inline credential and the addresses" \
  --arg busy "$BUSY_MAX % at most, sampled before and after each measurement (a measurement waits while it is above $QUIET_PCT %, and is taken again if other work shows up right after it)" \
  --arg warning "$( ((BUSY_MAX > QUIET_PCT)) && echo "other work kept the machine up to $BUSY_MAX % busy around a measurement; figures from this run are unreliable" || true)" \
  '[["Cores (nproc)", $nproc], ["CPU", $cpu], ["Memory", $mem], ["Kernel", $kernel], ["Date", $date],
    ["sidekey revision", $rev], ["Rust", $rustc], ["nginx", $nginx], ["wrk", $wrk], ["Mode", $mode],
    ["Rounds", $rounds], ["Fixed rate (req/s)", $rate], ["Throughput load", $wrk_cfg],
    ["Fixed-rate load", $rate_cfg], ["One-connection load", $serial_cfg], ["CPU per request", $cpu_cfg],
    ["HTTPS upstream", $tls_cfg], ["hyper floor", $floor_cfg], ["Processes", $workers], ["sidekey configuration", $skcfg], ["Run time (build included)", $elapsed],
    ["Other work on the machine around the measurements", $busy]]
   + (if $warning == "" then [] else [["Warning", $warning]] end)' \
  >"$tmp/meta.json"
"$CLIENT" report --results "$results" --meta "$tmp/meta.json" >"$tmp/RESULTS.md"
mkdir -p "$(dirname "$OUT")"
cp "$tmp/RESULTS.md" "$OUT"
[[ ${BENCH_KEEP:-0} == 1 ]] && cp "$results" "$tmp/results.jsonl.kept"
# The README's performance table, from the same measurements: the block between the markers.
if ((README_UPDATE)); then
  "$CLIENT" report --readme --results "$results" --meta "$tmp/meta.json" >"$tmp/readme-block.md"
  if grep -q '^<!-- bench:begin' "$ROOT/README.md" && grep -q '^<!-- bench:end' "$ROOT/README.md"; then
    awk -v block="$tmp/readme-block.md" '
      /^<!-- bench:begin/ { print; while ((getline line < block) > 0) print line; skip = 1; next }
      /^<!-- bench:end/ { skip = 0 }
      !skip { print }' "$ROOT/README.md" >"$tmp/README.md"
    cp "$tmp/README.md" "$ROOT/README.md"
    log "README.md: performance table regenerated"
  else
    log "README.md has no <!-- bench:begin --> / <!-- bench:end --> markers; left alone"
  fi
fi
echo
cat "$OUT"
log "done: results in ${OUT#"$ROOT"/}"
