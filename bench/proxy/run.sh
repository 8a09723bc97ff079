#!/usr/bin/env bash
# Proxy benchmark: the same POST /v1/chat/completions sent (a) straight to a
# mock upstream, (b) through keyward's credential-injecting proxy, (c) through
# nginx as a plain TLS reverse proxy and (d) through LiteLLM's proxy, under
# the same wrk load, one after the other in the same run. See BENCHMARKS.md,
# section "Proxy (bench/proxy)".
#
#   bench/proxy/run.sh                   # DURATION=10s by default
#   DURATION=30s ROUNDS=2 bench/proxy/run.sh
#   SKIP_LITELLM=1 bench/proxy/run.sh    # without LiteLLM (no venv needed)
#
# Two load points per round:
#   full      wrk -t$THREADS -c$CONNS, closed loop: as fast as each target goes
#   moderate  wrk -t$THREADS -c$MOD_CONNS with $MOD_DELAY_MS ms between the
#             requests of each connection (wrk's delay() hook): a few thousand
#             req/s, well below every target's capacity but LiteLLM's (so
#             LiteLLM is measured at the full point only)
#
# Environment:
#   DURATION   measured wrk run per target and point (default 10s)
#   WARMUP     wrk warm-up before each measured run, discarded (default 3s)
#   THREADS    wrk threads (default 2)   CONNS  connections at the full point (default 64)
#   MOD_CONNS  connections at the moderate point (default 8)
#   MOD_DELAY_MS  pause between requests per connection there (default 2)
#   LITELLM_CONNS / LITELLM_DURATION  LiteLLM's full point (default 16 / DURATION:
#              ~150 req/s saturate it already; 64 connections queue ~0.5 s per
#              request, close to wrk's timeout when the machine is noisy)
#   LITELLM_WORKERS  LiteLLM worker processes (default 2)
#   NGINX_WORKERS    nginx proxy worker processes (default 2: keyward runs one
#                    tokio worker thread per core, 2 here)
#   MOCK_WORKERS     nginx worker processes of the mock upstream (default 1)
#   ROUNDS     rounds of every target at every point (default 1)
#   TIMEOUT    wrk per-request timeout (default 5s)
#   WAIT_WRK   seconds to wait, in all, before measurements for someone else's
#              wrk to finish and the CPUs to be quiet (< QUIET_CORES busy,
#              default 0.3) (default 600); past that the run goes on, flagged
#   LITELLM_VENV  venv holding litellm[proxy] (default bench/.venv-litellm, created once)
#   OUT        where wrk reports and logs are kept (default bench/out/proxy-<time>)
#   PERF=1     also `perf record -g` each keyward during its first full-load run
#   SKIP_BUILD=1   use the existing binary
#   SKIP_LITELLM=1 leave LiteLLM out
#   BUFFERED=0     leave out kw-buffered (keyward with --durability buffered)
#   KEEP_WORK=1    keep the temporary data dirs
#
# Exit status: 0 when every correctness check passed (whatever the speed),
# non-zero when a check failed or a step broke.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
MOD_CONNS=${MOD_CONNS:-8}
MOD_DELAY_MS=${MOD_DELAY_MS:-2}
LITELLM_CONNS=${LITELLM_CONNS:-16}
LITELLM_DURATION=${LITELLM_DURATION:-$DURATION}
LITELLM_WORKERS=${LITELLM_WORKERS:-2}
NGINX_WORKERS=${NGINX_WORKERS:-2}
MOCK_WORKERS=${MOCK_WORKERS:-1}
ROUNDS=${ROUNDS:-1}
TIMEOUT=${TIMEOUT:-5s}
WAIT_WRK=${WAIT_WRK:-600}
LITELLM_VENV=${LITELLM_VENV:-$REPO/bench/.venv-litellm}
OUT=${OUT:-$REPO/bench/out/proxy-$(date +%Y%m%d-%H%M%S)}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
KW=$TARGET_DIR/release/keyward
CLK_TCK=$(getconf CLK_TCK)
LUA=$HERE/post.lua
MOCK_BODY=$(tr -d '\n' <"$HERE/mock.json")
REAL_KEY=sk-mock-bench-key   # what the mock accepts; every proxy must inject it
LITELLM_MASTER=sk-bench

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/keyward-bench-proxy.XXXXXX)
LOG=$OUT/setup.log
: >"$LOG"
PIDS=()
FAILURES=()
NOTES=()

# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

# ---- prerequisites ---------------------------------------------------------


NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
command -v openssl >/dev/null || missing+=(openssl)
[[ -x $NGINX ]] || missing+=(nginx)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX ]] || die "nginx not found after installing it"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rust-toolchain.toml pins it)"

if [[ ${SKIP_LITELLM:-0} != 1 ]] && ! "$LITELLM_VENV/bin/python" -c 'import litellm.proxy.proxy_server' 2>/dev/null; then
  say "creating $LITELLM_VENV with litellm[proxy] (takes a few minutes, once)"
  rm -rf "$LITELLM_VENV"
  if ! python3 -m venv "$LITELLM_VENV" >>"$LOG" 2>&1; then
    rm -rf "$LITELLM_VENV"
    apt_install python3-venv
    python3 -m venv "$LITELLM_VENV" >>"$LOG" 2>&1 || die "python3 -m venv failed (see $LOG)"
  fi
  printf '*\n' >"$LITELLM_VENV/.gitignore" # never commit the venv
  "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]' >>"$LOG" 2>&1 || die "pip install litellm[proxy] failed (see $LOG)"
fi

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  say "cargo build --release -p keyward-cli"
  (cd "$REPO" && cargo build --release -p keyward-cli) || die "cargo build failed"
fi
[[ -x $KW ]] || die "keyward binary not found at $KW"

# ---- helpers ---------------------------------------------------------------

json_get() { # json_get EXPR  (reads JSON on stdin; EXPR indexes `d`)
  python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"
}

tree_ticks() { # utime+stime of a process and all its descendants, in clock ticks
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" '
    { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " "); parent[pid] = f[2]; t[pid] = f[12] + f[13] }
    END {
      n = 1; q[1] = root; sum = t[root]
      for (i = 1; i <= n; i++) for (p in parent) if (parent[p] == q[i]) { q[++n] = p; sum += t[p] }
      print sum + 0
    }'
}
self_child_ticks() { # cutime+cstime of this shell: CPU of reaped children
  awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"
}
sys_ticks() { # "busy total" over all CPUs
  awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
thread_ticks() { # "tid comm ticks" per thread of a process
  local t
  for t in /proc/"$1"/task/*; do
    awk -v tid="${t##*/}" '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c); gsub(/ /, "_", c);
      sub(/^.*\) /, ""); print tid, c, $12 + $13 }' "$t/stat" 2>/dev/null || true
  done
}
tree_rss_kb() { # resident memory of a process and its descendants
  local p sum=0 v
  for p in "$1" $(descendants "$1"); do
    v=$(awk '$1 == "VmRSS:" { print $2 }' "/proc/$p/status" 2>/dev/null) || v=0
    sum=$((sum + ${v:-0}))
  done
  echo "$sum"
}

wait_for() { # wait_for SECONDS CMD... : retry CMD until it succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# Someone else's wrk (another benchmark on this machine), or a build, would
# share the two cores with ours: before each measurement wait until no other
# wrk runs and the CPUs are nearly idle (< QUIET_CORES busy over 1 s), for
# WAIT_WRK seconds in all; past that, measure anyway and flag the run.
QUIET_CORES=${QUIET_CORES:-0.3}
WAIT_DEADLINE=
busy_cores_1s() {
  local b0 t0 b1 t1
  read -r b0 t0 < <(sys_ticks)
  sleep 1
  read -r b1 t1 < <(sys_ticks)
  awk -v b=$((b1 - b0)) -v t=$((t1 - t0)) -v n="$(nproc)" 'BEGIN { printf "%.2f", (t > 0) ? b / t * n : 0 }'
}
wait_quiet() {
  [[ -n $WAIT_DEADLINE ]] || WAIT_DEADLINE=$((SECONDS + WAIT_WRK))
  local said=0 busy
  while :; do
    if pgrep -x wrk >/dev/null; then
      busy="another wrk ($(pgrep -x wrk | tr '\n' ' ')) is running"
    else
      busy=$(busy_cores_1s)
      awk -v b="$busy" -v q="$QUIET_CORES" 'BEGIN { exit !(b < q) }' && return
      busy="$busy cores busy"
    fi
    if ((SECONDS >= WAIT_DEADLINE)); then
      NOTES+=("$1 started while $busy (after waiting ${WAIT_WRK}s in all): noisy")
      say "$busy; measuring anyway (flagged)"
      return
    fi
    ((said)) || say "$busy; waiting for the machine to be quiet"
    said=1
    sleep 2
  done
}

# ---- mock upstream ----------------------------------------------------------

MOCK_PORT=$(free_port)
[[ -n $MOCK_PORT ]] || die "no free port for the mock"
MOCK_DIR=$WORK/mock
mkdir -p "$MOCK_DIR/logs" "$MOCK_DIR/tmp"
render "$HERE/nginx-mock.conf.in" "$MOCK_DIR/nginx.conf" \
  WORKERS="$MOCK_WORKERS" PORT="$MOCK_PORT" KEY="$REAL_KEY" BODY="$MOCK_BODY"
say "starting the mock upstream (nginx, $MOCK_WORKERS worker) on 127.0.0.1:$MOCK_PORT"
"$NGINX" -p "$MOCK_DIR/" -e logs/error.log -c nginx.conf >"$OUT/mock.log" 2>&1 &
MOCK_PID=$!
PIDS+=("$MOCK_PID")
MOCK_URL=http://127.0.0.1:$MOCK_PORT/v1/chat/completions
wait_for 10 curl -sf -X POST -H "Authorization: Bearer $REAL_KEY" -d '{}' "$MOCK_URL" ||
  die "the mock did not start (see $OUT/mock.log, $MOCK_DIR/logs/error.log)"

# ---- keyward ---------------------------------------------------------------

# start_keyward NAME [SERVE-ARGS...]: a keyward of its own (data dir, port)
# set up as in the docs; fills KW_PID[NAME], KW_URL[NAME], KW_AGENT[NAME],
# KW_CA[NAME] and KW_ENV[NAME] (the admin CLI's environment).
declare -A KW_PID KW_URL KW_AGENT KW_CA KW_ENV
start_keyward() {
  local name=$1 dir=$WORK/$1
  shift
  say "starting $name ($KW${*:+ serve $*})"
  "$KW" init --json --data-dir "$dir" >"$WORK/$name.init.json" 2>>"$LOG" || die "keyward init failed"
  local admin ca
  admin=$(json_get 'd["admin_token"]' <"$WORK/$name.init.json")
  ca=$(json_get 'd["ca_cert"]' <"$WORK/$name.init.json")
  "$KW" serve --data-dir "$dir" --listen 127.0.0.1:0 "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  KW_PID[$name]=$!
  PIDS+=("${KW_PID[$name]}")
  wait_for 30 grep -q 'keyward listening on https://' "$OUT/$name.stdout" ||
    die "$name did not start (see $OUT/$name.stderr)"
  local addr
  addr=$(grep -o -m1 'https://[0-9.:]*' "$OUT/$name.stdout")
  KW_ENV[$name]="KEYWARD_ADDR=$addr KEYWARD_CACERT=$ca KEYWARD_TOKEN=$admin"
  printf %s "$REAL_KEY" | kwcli "$name" secret put openai --provider openai \
    --upstream "http://127.0.0.1:$MOCK_PORT" --allow-internal-upstream >>"$LOG" 2>&1 ||
    die "keyward secret put failed (see $LOG)"
  kwcli "$name" agent create bot --json >"$WORK/$name.agent.json" 2>>"$LOG" || die "keyward agent create failed"
  KW_AGENT[$name]=$(json_get 'd["token"]' <"$WORK/$name.agent.json")
  kwcli "$name" grant add --agent bot --secret openai --mode proxy >>"$LOG" 2>&1 || die "keyward grant add failed"
  KW_URL[$name]=$addr/proxy/openai/v1/chat/completions
  KW_CA[$name]=$ca
}
kwcli() { # kwcli NAME ARGS... : the keyward CLI as that instance's admin
  local name=$1
  shift
  env ${KW_ENV[$name]} "$KW" "$@"
}

KEYWARDS=(keyward)
start_keyward keyward
# The same keyward with `--durability buffered`: audit records (and every
# other commit) reach the OS before the access proceeds and the disk within a
# second, instead of each being fsync'd. Measured beside the default so the
# cost of per-commit fsync shows; the targets are judged on both lines.
if [[ ${BUFFERED:-1} == 1 ]]; then
  KEYWARDS+=(kw-buffered)
  start_keyward kw-buffered --durability buffered
fi

# ---- nginx as the plain reverse proxy ---------------------------------------------

NGX_PORT=$(free_port)
[[ -n $NGX_PORT ]] || die "no free port for nginx"
NGX_DIR=$WORK/nginx
mkdir -p "$NGX_DIR/logs" "$NGX_DIR/tmp"
# A self-signed ECDSA P-256 certificate, the key type keyward generates for itself.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$NGX_DIR/key.pem" -out "$NGX_DIR/cert.pem" >>"$LOG" 2>&1 || die "openssl req failed (see $LOG)"
render "$HERE/nginx-proxy.conf.in" "$NGX_DIR/nginx.conf" WORKERS="$NGINX_WORKERS" PORT="$NGX_PORT" \
  MOCK_PORT="$MOCK_PORT" CERT="$NGX_DIR/cert.pem" KEY_FILE="$NGX_DIR/key.pem" KEY="$REAL_KEY"
say "starting nginx ($("$NGINX" -v 2>&1 | sed 's/.*: //'), $NGINX_WORKERS workers) on 127.0.0.1:$NGX_PORT"
"$NGINX" -p "$NGX_DIR/" -e logs/error.log -c nginx.conf >"$OUT/nginx.log" 2>&1 &
NGX_PID=$!
PIDS+=("$NGX_PID")
NGX_URL=https://127.0.0.1:$NGX_PORT/v1/chat/completions
wait_for 10 curl -sf --cacert "$NGX_DIR/cert.pem" -X POST -d '{}' "$NGX_URL" ||
  die "nginx did not start (see $OUT/nginx.log, $NGX_DIR/logs/error.log)"

# ---- LiteLLM ---------------------------------------------------------------

LL_PID=
if [[ ${SKIP_LITELLM:-0} != 1 ]]; then
  LL_PORT=$(free_port)
  [[ -n $LL_PORT ]] || die "no free port for LiteLLM"
  render "$HERE/litellm.yaml.in" "$WORK/litellm.yaml" MOCK_PORT="$MOCK_PORT" KEY="$REAL_KEY" \
    MASTER_KEY="$LITELLM_MASTER"
  LL_VERSION=$("$LITELLM_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("litellm"))')
  say "starting LiteLLM $LL_VERSION ($LITELLM_WORKERS workers) on 127.0.0.1:$LL_PORT (takes ~10 s)"
  (cd "$WORK" && LITELLM_LOCAL_MODEL_COST_MAP=True exec "$LITELLM_VENV/bin/litellm" --config "$WORK/litellm.yaml" \
    --host 127.0.0.1 --port "$LL_PORT" --num_workers "$LITELLM_WORKERS") >"$OUT/litellm.log" 2>&1 &
  LL_PID=$!
  PIDS+=("$LL_PID")
  LL_URL=http://127.0.0.1:$LL_PORT/v1/chat/completions
  wait_for 120 curl -sf "http://127.0.0.1:$LL_PORT/health/liveliness" || die "LiteLLM did not start (see $OUT/litellm.log)"
fi

# ---- correctness before load ------------------------------------------------

BODY='{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}'
post() { # post LABEL URL CURL-ARGS... : one POST like wrk's; prints the status
  local label=$1 url=$2
  shift 2
  curl -sS -o "$WORK/$label.body" -D "$WORK/$label.headers" -w '%{http_code}' -X POST \
    -H 'Content-Type: application/json' --data-binary "$BODY" "$@" "$url" 2>>"$LOG" || echo 000
}

say "pre-load checks"
code=$(post direct "$MOCK_URL" -H "Authorization: Bearer $REAL_KEY")
[[ $code == 200 && $(cat "$WORK/direct.body") == "$MOCK_BODY" ]] || fail "direct: HTTP $code, or not the mock's body"
code=$(post keyward-nokey "$MOCK_URL" -H "Authorization: Bearer ${KW_AGENT[keyward]}")
[[ $code == 401 ]] || fail "the mock accepted a request without the real key (HTTP $code): it cannot check injection"

for kw in "${KEYWARDS[@]}"; do
  : >"$MOCK_DIR/logs/auth.log"
  code=$(post "$kw" "${KW_URL[$kw]}" --cacert "${KW_CA[$kw]}" -H "Authorization: Bearer ${KW_AGENT[$kw]}" -H 'X-Bench-Log: 1')
  if [[ $code != 200 ]]; then
    fail "$kw: single proxied request returned HTTP $code: $(head -c 300 "$WORK/$kw.body")"
  elif [[ $(cat "$WORK/$kw.body") != "$MOCK_BODY" ]]; then
    fail "$kw: single proxied request returned 200 but not the mock's body byte for byte"
  else
    say "$kw: 200 with the mock's body byte for byte"
  fi
  sleep 0.2
  seen=$(grep -c . "$MOCK_DIR/logs/auth.log" || true)
  if [[ $seen != 1 ]]; then
    fail "$kw: the mock logged $seen requests for one proxied request"
  elif ! grep -q "authorization=\"Bearer $REAL_KEY\"" "$MOCK_DIR/logs/auth.log"; then
    fail "$kw: the mock did not see 'Authorization: Bearer $REAL_KEY': $(cat "$MOCK_DIR/logs/auth.log")"
  elif grep -q 'kwa_' "$MOCK_DIR/logs/auth.log"; then
    fail "$kw: the agent token reached the mock: $(cat "$MOCK_DIR/logs/auth.log")"
  else
    say "$kw: the mock saw: $(cat "$MOCK_DIR/logs/auth.log")"
  fi
  cp "$MOCK_DIR/logs/auth.log" "$OUT/$kw.mock-auth.log"
done

code=$(post nginx "$NGX_URL" --cacert "$NGX_DIR/cert.pem" -H "Authorization: Bearer ${KW_AGENT[keyward]}")
[[ $code == 200 && $(cat "$WORK/nginx.body") == "$MOCK_BODY" ]] || fail "nginx: HTTP $code, or not the mock's body"
if [[ -n $LL_PID ]]; then
  code=$(post litellm "$LL_URL" -H "Authorization: Bearer $LITELLM_MASTER")
  got=$(json_get 'd["choices"][0]["message"]["content"]' <"$WORK/litellm.body" 2>/dev/null) || got=
  want=$(json_get 'd["choices"][0]["message"]["content"]' <<<"$MOCK_BODY")
  [[ $code == 200 && $got == "$want" ]] ||
    fail "LiteLLM: HTTP $code, or not the mock's answer: $(head -c 300 "$WORK/litellm.body")"
fi
((${#FAILURES[@]} == 0)) || die "pre-load checks failed; not loading"
say "pre-load checks passed"

kw_events() { # kw_events NAME: events in its audit chain; fails when verify fails
  local v
  v=$(kwcli "$1" audit verify --json 2>>"$OUT/$1-verify.err") || return 1
  json_get 'd["events"]' <<<"$v"
}

# ---- load ------------------------------------------------------------------

# run_load TARGET POINT ROUND URL CONNS DURATION DELAY_MS PROXY_PID HEADER...
# (PROXY_PID empty for the mock alone); appends a row to $OUT/results.tsv
# LiteLLM's workers burn CPU while idle (0.2 cores seen here), which would
# load the machine under every other target's measurement: they are
# stopped (SIGSTOP, the whole process tree) except while LiteLLM itself is
# measured.
litellm_signal() { # litellm_signal STOP|CONT
  [[ -n $LL_PID ]] || return 0
  local p
  for p in "$LL_PID" $(descendants "$LL_PID"); do kill -"$1" "$p" 2>/dev/null || true; done
}

run_load() {
  local target=$1 point=$2 round=$3 url=$4 conns=$5 dur=$6 delay_ms=$7 pid=$8
  shift 8
  if [[ $target == litellm ]]; then
    litellm_signal CONT
    wait_for 30 curl -sf "http://127.0.0.1:$LL_PORT/health/liveliness" || die "LiteLLM did not answer after SIGCONT"
  else
    litellm_signal STOP
  fi
  local args=() h
  for h in "$@"; do args+=(-H "$h"); done
  local tag=$target.$point.r$round
  local lua_args=()
  ((delay_ms > 0)) && lua_args=(-- "$delay_ms")

  wait_quiet "$tag"
  say "$tag: warm-up $WARMUP"
  wrk -t"$THREADS" -c"$conns" -d"$WARMUP" --timeout "$TIMEOUT" -s "$LUA" "${args[@]}" "$url" "${lua_args[@]}" \
    >"$OUT/$tag.warmup.txt" 2>&1 &
  local warm_pid=$!
  PIDS+=("$warm_pid")
  wait "$warm_pid" || die "wrk warm-up against $target failed (see $OUT/$tag.warmup.txt)"
  untrack "$warm_pid"
  local warm_line warm_req warm_bad
  warm_line=$(grep '^WRKRESULT' "$OUT/$tag.warmup.txt") || die "no wrk result for the $tag warm-up"
  warm_req=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$warm_line")
  warm_bad=$(sed -E 's/.* err_status=([0-9]+).*/\1/' <<<"$warm_line")
  ((warm_bad == 0)) || fail "$tag warm-up: $warm_bad responses with status >= 400"

  local perf_pid=
  if [[ ${PERF:-0} == 1 && $target == k* && $point == full && $round == 1 ]] && command -v perf >/dev/null; then
    perf record -q -g -p "$pid" -o "$OUT/$target.perf.data" >>"$LOG" 2>&1 &
    perf_pid=$!
    PIDS+=("$perf_pid")
  fi

  say "$tag: measuring $dur (wrk -t$THREADS -c$conns${lua_args:+, ${delay_ms} ms between requests})"
  [[ $target == k* ]] && thread_ticks "$pid" >"$WORK/$tag.threads0"
  local p0=0 m0 c0 b0 t0 p1=0 m1 c1 b1 t1
  [[ -n $pid ]] && p0=$(tree_ticks "$pid")
  m0=$(tree_ticks "$MOCK_PID")
  c0=$(self_child_ticks)
  read -r b0 t0 < <(sys_ticks)
  wrk -t"$THREADS" -c"$conns" -d"$dur" --timeout "$TIMEOUT" --latency -s "$LUA" "${args[@]}" "$url" "${lua_args[@]}" \
    >"$OUT/$tag.txt" 2>&1 &
  local wrk_pid=$!
  PIDS+=("$wrk_pid")
  sleep 2
  top -b -n2 -d1 -w 200 >"$OUT/$tag.top.txt" 2>&1 || true # a 1 s sample during the run: who else was busy
  wait "$wrk_pid" || die "wrk against $target failed (see $OUT/$tag.txt)"
  untrack "$wrk_pid"
  [[ -n $pid ]] && p1=$(tree_ticks "$pid")
  m1=$(tree_ticks "$MOCK_PID")
  c1=$(self_child_ticks)
  read -r b1 t1 < <(sys_ticks)
  if [[ $target == k* ]]; then
    thread_ticks "$pid" >"$WORK/$tag.threads1"
    awk 'NR == FNR { a[$1] = $3; next } { d = $3 - a[$1]; s[$2] += d; n[$2]++ }
         END { for (k in s) printf "%s\t%d\t%d\n", k, n[k], s[k] }' \
      "$WORK/$tag.threads0" "$WORK/$tag.threads1" | sort -t$'\t' -k3,3nr >"$OUT/$tag.threads.tsv"
  fi
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    untrack "$perf_pid"
  fi

  local line
  line=$(grep '^WRKRESULT' "$OUT/$tag.txt") || die "no wrk result for $tag (see $OUT/$tag.txt)"
  local requests duration_us p50 p99 err_status errs
  requests=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$line")
  duration_us=$(sed -E 's/.* duration_us=([0-9]+).*/\1/' <<<"$line")
  p50=$(sed -E 's/.* p50_us=([0-9]+).*/\1/' <<<"$line")
  p99=$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$line")
  err_status=$(sed -E 's/.* err_status=([0-9]+).*/\1/' <<<"$line")
  errs=$(awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] ~ /^err_(connect|read|write|timeout)$/) e += kv[2] } print e + 0 }' <<<"$line")
  # target point round conns requests duration_us p50 p99 err_status errs
  # proxy_ticks mock_ticks wrk_ticks busy_ticks total_ticks warmup_requests
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
    "$target" "$point" "$round" "$conns" "$requests" "$duration_us" "$p50" "$p99" "$err_status" "$errs" \
    $((p1 - p0)) $((m1 - m0)) $((c1 - c0)) $((b1 - b0)) $((t1 - t0)) "$warm_req" >>"$OUT/results.tsv"
  ((err_status == 0)) || fail "$tag: $err_status responses with status >= 400"
  ((errs == 0)) || fail "$tag: $errs socket errors/timeouts"
}

: >"$OUT/results.tsv"
declare -A KW_EV0
for kw in "${KEYWARDS[@]}"; do
  KW_EV0[$kw]=$(kw_events "$kw") || die "$kw: audit verify failed before the load"
done
for round in $(seq "$ROUNDS"); do
  for point in full moderate; do
    conns=$CONNS delay=0
    [[ $point == moderate ]] && conns=$MOD_CONNS delay=$MOD_DELAY_MS
    run_load direct "$point" "$round" "$MOCK_URL" "$conns" "$DURATION" "$delay" "" "Authorization: Bearer $REAL_KEY"
    for kw in "${KEYWARDS[@]}"; do
      run_load "$kw" "$point" "$round" "${KW_URL[$kw]}" "$conns" "$DURATION" "$delay" "${KW_PID[$kw]}" \
        "Authorization: Bearer ${KW_AGENT[$kw]}"
    done
    run_load nginx "$point" "$round" "$NGX_URL" "$conns" "$DURATION" "$delay" "$NGX_PID" \
      "Authorization: Bearer ${KW_AGENT[keyward]}"
    # LiteLLM tops out far below the moderate point's rate: full load only.
    if [[ -n $LL_PID && $point == full ]]; then
      run_load litellm full "$round" "$LL_URL" "$LITELLM_CONNS" "$LITELLM_DURATION" 0 "$LL_PID" \
        "Authorization: Bearer $LITELLM_MASTER"
    fi
  done
done

# ---- correctness after load ----------------------------------------------------

litellm_signal CONT # so that it can be checked and stopped normally

kill -0 "$NGX_PID" 2>/dev/null || fail "nginx exited during the run"
kill -0 "$MOCK_PID" 2>/dev/null || fail "the mock exited during the run"
[[ -z $LL_PID ]] || kill -0 "$LL_PID" 2>/dev/null || fail "LiteLLM exited during the run"
sleep 1 # let the outcome records of the last in-flight requests commit
declare -A KW_AUDITED KW_SENT KW_RSS KW_HWM KW_GONE
for kw in "${KEYWARDS[@]}"; do
  kill -0 "${KW_PID[$kw]}" 2>/dev/null || fail "$kw exited during the run"
  say "$kw: audit verify"
  t0=$SECONDS
  if ev1=$(kw_events "$kw"); then
    KW_AUDITED[$kw]=$((ev1 - ${KW_EV0[$kw]}))
    say "$kw: audit verify passed: $ev1 events in the chain, ${KW_AUDITED[$kw]} written under load ($((SECONDS - t0))s to verify)"
  else
    KW_AUDITED[$kw]=?
    fail "$kw: audit verify failed: $(cat "$OUT/$kw-verify.err")"
  fi
  denied=$(kwcli "$kw" audit --outcome denied --limit 1000 --json 2>>"$LOG" | grep -c . || true)
  kwcli "$kw" audit --outcome error --limit 1000 --json >"$OUT/$kw.audit-errors.jsonl" 2>>"$LOG" || true
  # wrk stops mid-answer at the end of each run: keyward records those
  # answers' outcomes as errors with "client_gone", which is right. Any other
  # error outcome is a failure.
  gone=$(grep -c 'client_gone' "$OUT/$kw.audit-errors.jsonl" || true)
  errored=$(grep -vc 'client_gone' "$OUT/$kw.audit-errors.jsonl" || true)
  KW_GONE[$kw]=$gone
  ((denied == 0 && errored == 0)) || fail "$kw: audit holds $denied denied and $errored error events (besides $gone client_gone)"
  KW_SENT[$kw]=$(awk -F'\t' -v t="$kw" '$1 == t { n += $5 + $16 } END { print n + 0 }' "$OUT/results.tsv")
  # Each proxied request leaves two events: the use (committed before
  # forwarding) and its outcome (status, bytes, latency) once the answer is over.
  if [[ ${KW_AUDITED[$kw]} != "?" ]] && ((${KW_AUDITED[$kw]} < 2 * ${KW_SENT[$kw]})); then
    fail "$kw: ${KW_AUDITED[$kw]} audit events for ${KW_SENT[$kw]} completed proxied requests (expected 2 each)"
  fi
  warned=$(cat "$OUT/$kw.stderr" "$OUT/$kw.stdout" | { grep -c -E ' (WARN|ERROR)' || true; })
  ((warned == 0)) || fail "$kw logged $warned warnings/errors under load (see $OUT/$kw.stderr)"
  KW_RSS[$kw]=$(tree_rss_kb "${KW_PID[$kw]}")
  KW_HWM[$kw]=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/${KW_PID[$kw]}/status")
done
NGX_RSS=$(tree_rss_kb "$NGX_PID")
MOCK_RSS=$(tree_rss_kb "$MOCK_PID")
LL_RSS=
[[ -n $LL_PID ]] && LL_RSS=$(tree_rss_kb "$LL_PID")

# ---- report ----------------------------------------------------------------

{
  echo
  echo "proxy benchmark: POST /v1/chat/completions ($(printf %s "$BODY" | wc -c)-byte body, $(printf %s "$MOCK_BODY" | wc -c)-byte answer), wrk -t$THREADS --latency --timeout $TIMEOUT, keep-alive, $WARMUP warm-up before each run; $(nproc) CPUs shared by wrk, the proxy and the mock"
  echo "  full: -c$CONNS -d$DURATION closed loop$([[ -n $LL_PID && ($LITELLM_CONNS != "$CONNS" || $LITELLM_DURATION != "$DURATION") ]] && echo " (LiteLLM: -c$LITELLM_CONNS -d$LITELLM_DURATION)")"
  echo "  moderate: -c$MOD_CONNS -d$DURATION, ${MOD_DELAY_MS} ms pause between requests on each connection"
  echo "  mock: nginx return 200 ($MOCK_WORKERS worker); keyward: TLS in, http to the mock, $(nproc) tokio workers; nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'): TLS in, $NGINX_WORKERS workers, keepalive pool to the mock$([[ -n $LL_PID ]] && echo "; LiteLLM $LL_VERSION: plain HTTP in, $LITELLM_WORKERS workers")"
  echo "keyward $("$KW" --version 2>/dev/null | awk '{ print $2 }') ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo '+dirty'))"
  echo
  awk -F'\t' -v tck="$CLK_TCK" '
    function ms(us) { return sprintf("%.3f", us / 1000) }
    function plus(us) { return sprintf("%+.3f", us / 1000) }
    BEGIN {
      printf "%-8s %-10s %5s %5s %9s %8s %8s %9s %9s %6s %7s %9s %7s %7s %7s %7s\n", "point", "target", "round", "conns",
        "req/s", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "non2xx", "sockerr", "proxy CPU", "proxy", "mock", "wrk", "other"
      printf "%-8s %-10s %5s %5s %9s %8s %8s %9s %9s %6s %7s %9s %7s %7s %7s %7s\n", "", "", "", "", "", "", "", "vs direct",
        "vs direct", "", "", "/req (us)", "(cores)", "(cores)", "(cores)", "(cores)"
    }
    {
      secs = $6 / 1e6; rps = $5 / secs
      key = $2 SUBSEP $3
      if ($1 == "direct") { d50[key] = $7; d99[key] = $8 }
      a50 = ($1 == "direct") ? "" : plus($7 - d50[key]); a99 = ($1 == "direct") ? "" : plus($8 - d99[key])
      pcpu = ($1 == "direct") ? "" : sprintf("%.0f", ($11 / tck) / $5 * 1e6)
      pcores = ($1 == "direct") ? "" : sprintf("%.2f", $11 / tck / secs)
      other = ($14 - $11 - $12 - $13) / tck / secs
      printf "%-8s %-10s %5s %5s %9.0f %8s %8s %9s %9s %6d %7d %9s %7s %7.2f %7.2f %7.2f\n", $2, $1, $3, $4, rps, ms($7), ms($8),
        a50, a99, $9, $10, pcpu, pcores, $12 / tck / secs, $13 / tck / secs, other
      if (other > 0.15) noisy = noisy sprintf("  note: %s %s round %s: %.2f cores busy with other processes (noise)\n", $2, $1, $3, other)
      r[$2, $3, $1] = rps; p50[$2, $3, $1] = $7; p99[$2, $3, $1] = $8; rounds[$3] = 1
    }
    END {
      printf "%s", noisy
      for (k in rounds) for (i = 1; i <= 2; i++) {
        kw = (i == 1) ? "keyward" : "kw-buffered"
        if (!(("full", k, kw) in r)) continue
        if (i == 1) print ""
        verdict = "target"
        # Truncate ratios, not round: 0.796x must not print as 0.80x next to NOT MET.
        if (r["full", k, "nginx"] > 0) {
          x = r["full", k, kw] / r["full", k, "nginx"]
          printf "round %s: %s/nginx throughput (full) = %.2fx (%s >= 0.8x: %s)\n", k, kw, int(x * 100) / 100, verdict, x >= 0.8 ? "MET" : "NOT MET"
        }
        if (r["full", k, "litellm"] > 0) {
          x = r["full", k, kw] / r["full", k, "litellm"]
          printf "round %s: %s/LiteLLM throughput (full) = %.1fx (%s >= 100x: %s)\n", k, kw, int(x * 10) / 10, verdict, x >= 100 ? "MET" : "NOT MET"
        }
        if (("moderate", k, kw) in p50) {
          a = p50["moderate", k, kw] - p50["moderate", k, "direct"]
          b = p99["moderate", k, kw] - p99["moderate", k, "direct"]
          printf "round %s: %s added latency (moderate) p50 %+.3f ms (%s <= 0.2: %s), p99 %+.3f ms (%s <= 1: %s)\n",
            k, kw, a / 1000, verdict, a <= 200 ? "MET" : "NOT MET", b / 1000, verdict, b <= 1000 ? "MET" : "NOT MET"
        }
        if (i == 1 && ("moderate", k, "nginx") in p50)
          printf "round %s: nginx added latency (moderate) p50 %+.3f ms, p99 %+.3f ms\n", k,
            (p50["moderate", k, "nginx"] - p50["moderate", k, "direct"]) / 1000, (p99["moderate", k, "nginx"] - p99["moderate", k, "direct"]) / 1000
      }
    }' "$OUT/results.tsv"
  for n in "${NOTES[@]}"; do echo "  note: $n"; done
  echo
  for kw in "${KEYWARDS[@]}"; do
    printf 'audit (%s): chain verified=%s, %s events written under load for %s completed proxied requests (warm-up + measured; 2 events each); %s outcomes client_gone (wrk stopping mid-answer)\n' \
      "$kw" "$([[ ${KW_AUDITED[$kw]} == "?" ]] && echo no || echo yes)" "${KW_AUDITED[$kw]}" "${KW_SENT[$kw]}" "${KW_GONE[$kw]}"
  done
  printf 'RSS at end: keyward %s MB (peak %s MB), nginx %s MB (all workers), mock %s MB%s\n' "$((KW_RSS[keyward] / 1024))" \
    "$((KW_HWM[keyward] / 1024))" "$((NGX_RSS / 1024))" "$((MOCK_RSS / 1024))" \
    "$([[ -n $LL_RSS ]] && echo ", LiteLLM $((LL_RSS / 1024)) MB (all workers)")"
  for kw in "${KEYWARDS[@]}"; do
    echo "$kw CPU by thread during the full-load run of round 1 (thread name, threads, CPU s):"
    awk -F'\t' -v tck="$CLK_TCK" '$3 > 0 { printf "  %-18s %3d %7.2f\n", $1, $2, $3 / tck }' "$OUT/$kw.full.r1.threads.tsv"
  done
  echo "details: $OUT"
} | tee "$OUT/summary.txt"

if ((${#FAILURES[@]} > 0)); then
  printf '\n%d check(s) failed:\n' "${#FAILURES[@]}" >&2
  printf '  - %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
echo "all correctness checks passed"
