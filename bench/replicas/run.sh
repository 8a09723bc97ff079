#!/usr/bin/env bash
# Replicas benchmark: keyward replicas sharing one PostgreSQL. Measures
#   1. propagation delay: rotate through replica A, poll replica B's resolve
#      until it serves the new value (bench/replicas/propagate.py);
#   2. resolve throughput under wrk: (a) 1 replica on SQLite, (b) 1 replica
#      on PostgreSQL, (c) 2 replicas on PostgreSQL, one wrk per replica;
#      ROUNDS times, a round being (a), (b), (c) back to back.
# See BENCHMARKS.md.
#
#   bench/replicas/run.sh                # DURATION=10s, 200 rotations, 1 round
#   ROUNDS=3 bench/replicas/run.sh
#
# Environment:
#   DURATION   measured wrk run per configuration (default 10s)
#   WARMUP     wrk warm-up per configuration, discarded (default 3s)
#   THREADS    wrk threads in total (default 2)   CONNS  connections in total (default 64)
#              (with 2 replicas each wrk gets half of both)
#   TIMEOUT    wrk per-request timeout (default 5s)
#   ROUNDS     rounds of (a), (b), (c) (default 1)
#   ROTATIONS  rotations in the propagation test (default 200)
#   PG_URL     PostgreSQL to use (default postgres://postgres@127.0.0.1:5432/test);
#              the run creates a schema of its own in it and drops it at exit
#   OUT        where reports and logs are kept (default bench/out/replicas-<time>)
#   SKIP_BUILD=1  use the existing binary
#   KEEP_WORK=1   keep the temporary data dirs and the schema
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
TIMEOUT=${TIMEOUT:-5s}
ROTATIONS=${ROTATIONS:-200}
ROUNDS=${ROUNDS:-1}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
OUT=${OUT:-$REPO/bench/out/replicas-$(date +%Y%m%d-%H%M%S)}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
KW=$TARGET_DIR/release/keyward
REPORT_LUA=$REPO/bench/resolve/report.lua # wrk done() hook shared with bench/resolve
CLK_TCK=$(getconf CLK_TCK)

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/keyward-bench-replicas.XXXXXX)
LOG=$OUT/setup.log
: >"$LOG"
PIDS=()
FAILURES=()
SCHEMA=

# shellcheck source=../lib.sh
source "$HERE/../lib.sh"
psql_q() { psql "$PG_URL" -X -q -A -t -v ON_ERROR_STOP=1 -c "$1"; }
cleanup_extra() { # the schema this run created
  [[ -n $SCHEMA ]] || return 0
  if [[ ${KEEP_WORK:-0} == 1 ]]; then
    say "kept schema $SCHEMA"
  else
    psql_q "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >>"$LOG" 2>&1 || say "could not drop schema $SCHEMA"
  fi
}

# ---- prerequisites ---------------------------------------------------------


missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v ss >/dev/null || missing+=(iproute2)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rust-toolchain.toml pins it)"

if ! psql_q 'SELECT 1' >/dev/null 2>>"$LOG"; then
  # The local cluster may just be stopped; start it (it is left running).
  if command -v pg_ctlcluster >/dev/null && [[ -d /etc/postgresql ]]; then
    say "PostgreSQL not reachable; starting the local cluster"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >>"$LOG" 2>&1 || true
    wait_pg() { local i; for i in $(seq 30); do psql_q 'SELECT 1' >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
    wait_pg || die "PostgreSQL at $PG_URL is not reachable (see $LOG)"
  else
    die "PostgreSQL at $PG_URL is not reachable"
  fi
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
proc_ticks() { # utime+stime of a process, all threads, in clock ticks
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}
self_child_ticks() { # cutime+cstime of this shell: CPU of reaped children (wrk)
  awk '{ sub(/^.*\) /, ""); print $14 + $15 }' "/proc/$$/stat"
}
sys_ticks() { # "busy total" over all CPUs
  awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t - $5 - $6, t }' /proc/stat
}
wait_for() { # wait_for SECONDS CMD... : retry CMD until it succeeds
  local deadline=$((SECONDS + $1))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# PostgreSQL CPU: the postmaster of PG_URL's cluster and its children. At the
# end of a run, client backends that do not serve our keyward processes (other
# users of the same cluster, e.g. test suites) are moved to "other".
PG_PM=
PG_PORT=$(psql_q 'SHOW port' 2>>"$LOG") || PG_PORT=5432
if PG_DATA=$(psql_q 'SHOW data_directory' 2>>"$LOG") && [[ -r $PG_DATA/postmaster.pid ]]; then
  PG_PM=$(head -n1 "$PG_DATA/postmaster.pid")
fi
pg_snap() { # "pid ticks" for the postmaster and its children
  [[ -n $PG_PM ]] || return 0
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } |
    awk -v pm="$PG_PM" '{ pid = $1; sub(/^.*\) /, ""); if (pid == pm || $2 == pm) print pid, $12 + $13 }'
}
foreign_backends() { # pids of client backends not connected to our keyward processes
  [[ -n $PG_PM ]] || return 0
  local ports pids_re
  pids_re=$(IFS='|'; echo "$*")
  ports=$(ss -Htnp state established "( dport = :$PG_PORT )" 2>/dev/null |
    awk -v re="pid=($pids_re)," '$0 ~ re { n = split($3, a, ":"); print a[n] }' | paste -sd, -) || ports=
  psql_q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'
            AND pid <> pg_backend_pid() AND NOT (coalesce(client_port, -1) = ANY ('{${ports}}'::int[]))" 2>>"$LOG" || true
}

fsync_probe() { # median microseconds of a 4 KiB O_DSYNC write under $WORK
  python3 - "$WORK/fsync-probe" <<'EOF'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
buf, t = os.urandom(4096), []
for _ in range(100):
    t0 = time.perf_counter()
    os.pwrite(fd, buf, 0)
    t.append(time.perf_counter() - t0)
os.close(fd)
os.unlink(sys.argv[1])
print(int(sorted(t)[50] * 1e6))
EOF
}

# start_kw NAME DATA_DIR [serve args...]: sets KW_PID and KW_ADDR
start_kw() {
  local name=$1 dir=$2
  shift 2
  "$KW" serve --data-dir "$dir" --listen 127.0.0.1:0 "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  KW_PID=$!
  PIDS+=("$KW_PID")
  wait_for 30 grep -q 'keyward listening on https://' "$OUT/$name.stdout" ||
    die "keyward $name did not start (see $OUT/$name.stderr)"
  KW_ADDR=$(grep -o -m1 'https://[0-9.:]*' "$OUT/$name.stdout")
  say "keyward $name listening on $KW_ADDR (pid $KW_PID)"
}

kwc() { # kwc ADDR CLI-ARGS... : the keyward CLI against one server as admin
  local addr=$1
  shift
  KEYWARD_ADDR=$addr KEYWARD_CACERT=$CA KEYWARD_TOKEN=$ADMIN "$KW" "$@"
}

# setup ADDR: secret `bench`, agent `bench-bot` with a reveal grant; sets AGENT
setup() {
  printf %s "$VALUE" | kwc "$1" secret put bench --provider openai >>"$LOG" 2>&1 || die "keyward secret put failed"
  kwc "$1" agent create bench-bot --json >"$WORK/agent.json" 2>>"$LOG" || die "keyward agent create failed"
  AGENT=$(json_get 'd["token"]' <"$WORK/agent.json")
  kwc "$1" grant add --agent bench-bot --secret bench --mode reveal >>"$LOG" 2>&1 || die "keyward grant add failed"
}

check_one() { # check_one LABEL ADDR : one curl resolve returns the stored value
  local label=$1 addr=$2 code got
  code=$(curl -sS -o "$WORK/$label.body" -w '%{http_code}' --cacert "$CA" \
    -H "Authorization: Bearer $AGENT" -H 'X-Keyward-Purpose: bench' "$addr/v1/resolve/bench") || code=000
  if [[ $code != 200 ]]; then
    fail "$label: single resolve returned HTTP $code: $(head -c 300 "$WORK/$label.body" 2>/dev/null)"
    return
  fi
  got=$(json_get 'd["value"]' <"$WORK/$label.body" 2>/dev/null) || got=
  [[ $got == "$VALUE" ]] || fail "$label: single resolve returned 200 but not the stored value"
}

kw_events() { # kw_events ADDR : events in the audit chain; fails when verify fails
  local v
  v=$(kwc "$1" audit verify --json 2>>"$OUT/verify.err") || return 1
  json_get 'd["events"]' <<<"$v"
}

# run_load LABEL ROUND "SERVER_PIDS" ADDR... : one wrk per ADDR in parallel,
# THREADS and CONNS split between them; appends a row to $OUT/results.tsv
run_load() {
  local label=$1 round=$2 spids=$3
  shift 3
  local addrs=("$@") n=$# tag=$label.r$round
  local t=$((THREADS / n)) c=$((CONNS / n))
  ((t >= 1)) || t=1
  local hdrs=(-H "Authorization: Bearer $AGENT" -H "X-Keyward-Purpose: bench")
  local i p wpids=()

  say "$label round $round: warm-up $WARMUP (${n} x wrk -t$t -c$c)"
  for i in "${!addrs[@]}"; do
    wrk -t"$t" -c"$c" -d"$WARMUP" --timeout "$TIMEOUT" "${hdrs[@]}" "${addrs[$i]}/v1/resolve/bench" \
      >"$OUT/$tag.w$i.warmup.txt" 2>&1 &
    wpids+=($!)
    PIDS+=($!)
  done
  for p in "${wpids[@]}"; do
    wait "$p" || die "wrk warm-up for $tag failed (see $OUT/$tag.w*.warmup.txt)"
    untrack "$p"
  done
  local warm_req=0 r
  for i in "${!addrs[@]}"; do
    r=$(awk '/requests in/ { print $1 }' "$OUT/$tag.w$i.warmup.txt")
    warm_req=$((warm_req + r))
  done

  say "$label round $round: measuring $DURATION (${n} x wrk -t$t -c$c)"
  local fsync_us
  fsync_us=$(fsync_probe) || fsync_us=0
  local s0=0 s1=0 c0 c1 b0 t0 b1 t1
  for p in $spids; do s0=$((s0 + $(proc_ticks "$p"))); done
  pg_snap >"$WORK/$tag.pg0"
  c0=$(self_child_ticks)
  read -r b0 t0 < <(sys_ticks)
  wpids=()
  for i in "${!addrs[@]}"; do
    wrk -t"$t" -c"$c" -d"$DURATION" --timeout "$TIMEOUT" --latency -s "$REPORT_LUA" \
      "${hdrs[@]}" "${addrs[$i]}/v1/resolve/bench" >"$OUT/$tag.w$i.txt" 2>&1 &
    wpids+=($!)
    PIDS+=($!)
  done
  sleep 2
  top -b -n2 -d1 -w 200 >"$OUT/$tag.top.txt" 2>&1 || true # a 1 s sample during the run, for the record
  for p in "${wpids[@]}"; do
    wait "$p" || die "wrk for $tag failed (see $OUT/$tag.w*.txt)"
    untrack "$p"
  done
  for p in $spids; do s1=$((s1 + $(proc_ticks "$p"))); done
  pg_snap >"$WORK/$tag.pg1"
  c1=$(self_child_ticks)
  read -r b1 t1 < <(sys_ticks)
  # shellcheck disable=SC2086
  foreign_backends $spids >"$WORK/$tag.foreign"

  local pg_ours pg_foreign
  read -r pg_ours pg_foreign < <(awk '
    FILENAME == ARGV[1] { skip[$1] = 1; next }
    FILENAME == ARGV[2] { a[$1] = $2; next }
    { d = $2 - (($1 in a) ? a[$1] : 0); if ($1 in skip) f += d; else o += d }
    END { print o + 0, f + 0 }' "$WORK/$tag.foreign" "$WORK/$tag.pg0" "$WORK/$tag.pg1")

  # Per wrk: requests, duration, p50, p99; then totals.
  local line reqs=() durs=() p50s=() p99s=() err_status=0 errs=0 v
  for i in "${!addrs[@]}"; do
    line=$(grep '^WRKRESULT' "$OUT/$tag.w$i.txt") || die "no wrk result for $tag (see $OUT/$tag.w$i.txt)"
    reqs+=("$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$line")")
    durs+=("$(sed -E 's/.* duration_us=([0-9]+).*/\1/' <<<"$line")")
    p50s+=("$(sed -E 's/.* p50_us=([0-9]+).*/\1/' <<<"$line")")
    p99s+=("$(sed -E 's/.* p99_us=([0-9]+).*/\1/' <<<"$line")")
    v=$(sed -E 's/.* err_status=([0-9]+).*/\1/' <<<"$line")
    err_status=$((err_status + v))
    v=$(awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); if (kv[1] ~ /^err_(connect|read|write|timeout)$/) e += kv[2] } print e + 0 }' <<<"$line")
    errs=$((errs + v))
  done
  join_c() { local IFS=,; echo "$*"; }
  printf '%s\t%d\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n' \
    "$label" "$n" "$(join_c "${reqs[@]}")" "$(join_c "${durs[@]}")" "$(join_c "${p50s[@]}")" "$(join_c "${p99s[@]}")" \
    "$err_status" "$errs" $((s1 - s0)) "$pg_ours" "$pg_foreign" $((c1 - c0)) $((b1 - b0)) $((t1 - t0)) "$warm_req" \
    "$round" "$fsync_us" \
    >>"$OUT/results.tsv"
  ((err_status == 0)) || fail "$tag: $err_status responses with status >= 400"
  ((errs == 0)) || fail "$tag: $errs socket errors/timeouts"
}

# audit_check LABEL ROUND ADDR EVENTS_BEFORE : verify the chain, compare with requests sent
audit_check() {
  local label=$1.r$2 addr=$3 ev0=$4 ev1 sent start=$SECONDS
  say "$label: keyward audit verify"
  if ev1=$(kw_events "$addr"); then
    sent=$(awk -F'\t' -v l="$1" -v r="$2" '$1 == l && $16 == r { n = split($3, q, ","); for (i = 1; i <= n; i++) s += q[i]; print s + $15 }' "$OUT/results.tsv")
    say "$label: audit verify passed: $ev1 events, $((ev1 - ev0)) new for $sent completed resolves ($((SECONDS - start))s to verify)"
    ((ev1 - ev0 >= sent)) || fail "$label: $((ev1 - ev0)) audit events written for $sent completed resolves"
    printf '%s\t%s\t%s\t%s\n' "$label" "$ev1" "$((ev1 - ev0))" "$sent" >>"$OUT/audit.tsv"
  else
    fail "$label: keyward audit verify failed: $(tail -c 500 "$OUT/verify.err")"
    printf '%s\tFAILED\t?\t?\n' "$label" >>"$OUT/audit.tsv"
  fi
}
no_denied() { # no_denied LABEL ADDR : the audit holds no denied or error events
  local d e
  d=$(kwc "$2" audit --outcome denied --limit 1000 --json 2>>"$LOG" | grep -c . || true)
  e=$(kwc "$2" audit --outcome error --limit 1000 --json 2>>"$LOG" | grep -c . || true)
  ((d == 0 && e == 0)) || fail "$1: the audit holds $d denied and $e error events"
}

VALUE="sk-bench-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
: >"$OUT/results.tsv"
: >"$OUT/audit.tsv"

# ---- servers: S on SQLite; A and B on one PostgreSQL schema -----------------------

"$KW" init --json --data-dir "$WORK/sqlite" >"$WORK/init-sqlite.json" 2>>"$LOG" || die "keyward init (SQLite) failed"
start_kw sqlite "$WORK/sqlite"
S_PID=$KW_PID S_ADDR=$KW_ADDR
S_ADMIN=$(json_get 'd["admin_token"]' <"$WORK/init-sqlite.json")
S_CA=$(json_get 'd["ca_cert"]' <"$WORK/init-sqlite.json")
ADMIN=$S_ADMIN CA=$S_CA
setup "$S_ADDR"
S_AGENT=$AGENT
check_one sqlite "$S_ADDR"

SCHEMA=kw_bench_$(date +%Y%m%d%H%M%S)_$$
psql_q "CREATE SCHEMA $SCHEMA" >>"$LOG" 2>&1 || {
  SCHEMA=
  die "CREATE SCHEMA failed (see $LOG)"
}
case $PG_URL in *\?*) SEP='&' ;; *) SEP='?' ;; esac
DB_URL="$PG_URL${SEP}options=-c%20search_path%3D$SCHEMA"
say "PostgreSQL schema $SCHEMA"
"$KW" init --json --data-dir "$WORK/pg" --database "$DB_URL" >"$WORK/init-pg.json" 2>>"$LOG" ||
  die "keyward init (PostgreSQL) failed"
P_ADMIN=$(json_get 'd["admin_token"]' <"$WORK/init-pg.json")
P_CA=$(json_get 'd["ca_cert"]' <"$WORK/init-pg.json")
ADMIN=$P_ADMIN CA=$P_CA
# A and B: the same data dir (master.key, TLS pair) and database, two ports.
start_kw pg-a "$WORK/pg" --database "$DB_URL"
A_PID=$KW_PID A_ADDR=$KW_ADDR
setup "$A_ADDR"
P_AGENT=$AGENT
start_kw pg-b "$WORK/pg" --database "$DB_URL"
B_PID=$KW_PID B_ADDR=$KW_ADDR
check_one pg-a "$A_ADDR"
check_one pg-b "$B_ADDR"
((${#FAILURES[@]} == 0)) || die "pre-load checks failed; not loading"
use_sqlite() { ADMIN=$S_ADMIN CA=$S_CA AGENT=$S_AGENT; }
use_pg() { ADMIN=$P_ADMIN CA=$P_CA AGENT=$P_AGENT; }

# ---- 1. propagation delay ---------------------------------------------------------

say "propagation: $ROTATIONS rotations through A, polling B"
P_S0=$(($(proc_ticks "$A_PID") + $(proc_ticks "$B_PID")))
pg_snap >"$WORK/prop.pg0"
P_C0=$(self_child_ticks)
read -r P_B0 P_T0 < <(sys_ticks)
if ! python3 "$HERE/propagate.py" --a "$A_ADDR" --b "$B_ADDR" --ca "$CA" --admin "$ADMIN" --agent "$AGENT" \
  --secret bench -n "$ROTATIONS" --tsv "$OUT/propagation.tsv" >"$OUT/propagation.json" 2>"$OUT/propagation.err"; then
  fail "propagation: $(head -c 1000 "$OUT/propagation.err")"
fi
P_S1=$(($(proc_ticks "$A_PID") + $(proc_ticks "$B_PID")))
pg_snap >"$WORK/prop.pg1"
P_C1=$(self_child_ticks)
read -r P_B1 P_T1 < <(sys_ticks)
foreign_backends "$A_PID" "$B_PID" >"$WORK/prop.foreign"
# CPU during the propagation test (keyward, our PostgreSQL backends, the
# poller, other), for the same noise note as the wrk runs.
PROP_CPU=$(awk -v kw=$((P_S1 - P_S0)) -v py=$((P_C1 - P_C0)) -v busy=$((P_B1 - P_B0)) -v tot=$((P_T1 - P_T0)) -v ncpu="$(nproc)" '
  FILENAME == ARGV[1] { skip[$1] = 1; next }
  FILENAME == ARGV[2] { a[$1] = $2; next }
  !($1 in skip) { pg += $2 - (($1 in a) ? a[$1] : 0) }
  END { secs = tot / ncpu; printf "%.2f %.2f %.2f %.2f", kw / secs, pg / secs, py / secs, (busy - kw - pg - py) / secs }' \
  "$WORK/prop.foreign" "$WORK/prop.pg0" "$WORK/prop.pg1")
[[ -s $OUT/propagation.json ]] || die "propagation test produced no result (see $OUT/propagation.err)"
OVER=$(json_get 'd["over_1s"]' <"$OUT/propagation.json")
((OVER == 0)) || fail "propagation: $OVER of $ROTATIONS rotations took over 1 s to reach replica B"

# ---- 2. throughput: (a), (b), (c) in each round -------------------------------------
# Every server stays up for the whole run; only the ones under test get
# requests. In (b) replica B idles: resolves change no policy, so they send no
# NOTIFY and B has nothing to do.

alive() { # alive LABEL PID...
  local l=$1 p
  shift
  for p in "$@"; do kill -0 "$p" 2>/dev/null || fail "$l: keyward (pid $p) exited during the run"; done
}
for round in $(seq "$ROUNDS"); do
  use_sqlite
  EV0=$(kw_events "$S_ADDR") || die "audit verify (SQLite) failed before the load"
  run_load sqlite-1 "$round" "$S_PID" "$S_ADDR"
  alive "sqlite-1.r$round" "$S_PID"
  audit_check sqlite-1 "$round" "$S_ADDR" "$EV0"

  use_pg
  EV0=$(kw_events "$A_ADDR") || die "audit verify (PostgreSQL) failed before the load"
  run_load pg-1 "$round" "$A_PID" "$A_ADDR"
  alive "pg-1.r$round" "$A_PID"
  audit_check pg-1 "$round" "$A_ADDR" "$EV0"

  EV0=$(kw_events "$B_ADDR") || die "audit verify (PostgreSQL, through B) failed before the load"
  run_load pg-2 "$round" "$A_PID $B_PID" "$A_ADDR" "$B_ADDR"
  alive "pg-2.r$round" "$A_PID" "$B_PID"
  audit_check pg-2 "$round" "$B_ADDR" "$EV0"
done
use_sqlite
no_denied sqlite "$S_ADDR"
use_pg
no_denied pg "$A_ADDR"
PG_EVENTS=$(psql_q "SELECT count(*) FROM $SCHEMA.audit_events" 2>>"$LOG" || echo '?')
PG_MB=$(psql_q "SELECT pg_total_relation_size('$SCHEMA.audit_events') / 1048576" 2>>"$LOG" || echo '?')

# ---- report ----------------------------------------------------------------

{
  echo
  echo "replicas benchmark: wrk -t$THREADS -c$CONNS -d$DURATION --latency (+ $WARMUP warm-up), TLS, audit on; with 2 replicas one wrk -t$((THREADS / 2)) -c$((CONNS / 2)) per replica"
  echo "keyward $("$KW" --version 2>/dev/null | awk '{ print $2 }') ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo '+dirty')), $(psql_q 'SHOW server_version' 2>/dev/null | awk '{ print "PostgreSQL " $1 }')"
  echo "$(nproc) CPUs shared by wrk, every keyward replica and PostgreSQL"
  echo
  python3 - "$OUT/propagation.json" "$ROTATIONS" $PROP_CPU <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"propagation A -> B over {d['rotations']} rotations (of {sys.argv[2]}): "
      f"p50 {d['p50_ms']:.2f} ms, p99 {d['p99_ms']:.2f} ms, max {d['max_ms']:.2f} ms, over 1 s: {d['over_1s']}")
print(f"  fresh on B's first poll: {d['fresh_on_first_poll']}, stale answers seen: {d['stale_answers']} "
      f"(max {d['max_polls']} polls for one rotation)")
print(f"  floor, one resolve on B with nothing changed: p50 {d['baseline_p50_ms']:.2f} ms, p99 {d['baseline_p99_ms']:.2f} ms; "
      f"rotate on A: p50 {d['rotate_p50_ms']:.2f} ms, p99 {d['rotate_p99_ms']:.2f} ms")
kw, pg, py, other = (float(x) for x in sys.argv[3:7])
print(f"  CPU (cores): keyward A+B {kw:.2f}, postgres {pg:.2f}, poller {py:.2f}, other {other:.2f}")
if other > 0.15:
    print(f"  note: propagation: {other:.2f} cores busy with other processes (noise)")
EOF
  echo
  awk -F'\t' -v tck="$CLK_TCK" -v ncpu="$(nproc)" '
    function ms(us) { return sprintf("%.2f", us / 1000) }
    BEGIN {
      name["sqlite-1"] = "(a) SQLite, 1 replica"; name["pg-1"] = "(b) PostgreSQL, 1 replica"; name["pg-2"] = "(c) PostgreSQL, 2 replicas"
      f = "%-27s %5s %8s %8s %8s %6s %7s %7s %8s %6s %6s %6s %8s %6s\n"
      printf f, "configuration", "round", "req/s", "p50 ms", "p99 ms", "non2xx", "sockerr", "keyward", "postgres", "wrk", "other", "idle", "CPU/req", "fsync"
      printf f, "", "", "", "(worst)", "(worst)", "", "", "(cores)", "(cores)", "", "", "", "(us)", "(ms)"
    }
    {
      n = split($3, rq, ","); split($4, du, ","); split($5, p50, ","); split($6, p99, ",")
      rps = 0; nreq = 0; w50 = 0; w99 = 0; detail = ""
      for (i = 1; i <= n; i++) {
        r = rq[i] / (du[i] / 1e6); rps += r; nreq += rq[i]
        if (p50[i] > w50) w50 = p50[i]
        if (p99[i] > w99) w99 = p99[i]
        detail = detail sprintf("%s replica %s: %.0f req/s, p50 %s ms, p99 %s ms", (i > 1 ? ";" : "    "), substr("AB", i, 1), r, ms(p50[i]), ms(p99[i]))
      }
      win = $14 / ncpu # the CPU window in ticks of wall time (a little longer than the wrk run)
      other = ($13 - $9 - $10 - $12) / win
      printf "%-27s %5d %8.0f %8s %8s %6d %7d %7.2f %8.2f %6.2f %6.2f %6.2f %8.0f %6.2f\n", name[$1], $16, rps, ms(w50), ms(w99), $7, $8,
        $9 / win, $10 / win, $12 / win, other, ($14 - $13) / win, ($9 + $10) / tck / nreq * 1e6, $17 / 1000
      if (n > 1) print detail
      if (other > 0.15) noisy = noisy sprintf("  note: %s round %d: %.2f cores busy with other processes (noise; %.2f of them in other clients of PostgreSQL)\n", name[$1], $16, other, $11 / win)
      t[$16, $1] = rps; rounds[$16] = 1
    }
    END {
      printf "%s", noisy
      for (k = 1; k in rounds; k++)
        if (t[k, "sqlite-1"] > 0 && t[k, "pg-1"] > 0)
          printf "round %d: PostgreSQL 1 replica / SQLite = %.2fx; PostgreSQL 2 replicas / 1 replica = %.2fx\n", k, t[k, "pg-1"] / t[k, "sqlite-1"], t[k, "pg-2"] / t[k, "pg-1"]
    }' "$OUT/results.tsv"
  echo "keyward = all replicas under load; postgres = our backends and its background processes; wrk = all wrk processes;"
  echo "other = every other process (noise); CPU/req = (keyward + postgres) CPU per completed request; fsync = median 4 KiB O_DSYNC write just before the run"
  echo
  awk -F'\t' '{ printf "audit %s: chain verified=%s, %s events in the chain, %s written for %s completed resolves (warm-up + measured)\n",
    $1, ($2 == "FAILED" ? "no" : "yes"), $2, $3, $4 }' "$OUT/audit.tsv"
  echo "PostgreSQL schema at the end: $PG_EVENTS audit events, audit table $PG_MB MB"
  echo "details: $OUT"
} | tee "$OUT/summary.txt"

if ((${#FAILURES[@]} > 0)); then
  printf '\n%d check(s) failed:\n' "${#FAILURES[@]}" >&2
  printf '  - %s\n' "${FAILURES[@]}" >&2
  exit 1
fi
echo "all correctness checks passed"
