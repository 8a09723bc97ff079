#!/usr/bin/env bash
# Audit append benchmark: events appended per second through keyward's
# group-commit writer (hash chaining, one transaction per batch), with 1, 16
# and 256 concurrent writers, on SQLite and on PostgreSQL. Each run starts on
# a fresh store, then reads the chain back, verifies it and counts it.
# See BENCHMARKS.md.
#
#   bench/audit/run.sh                   # SECONDS_PER_RUN=10, writers 1 16 256
#   WRITERS="256" SECONDS_PER_RUN=5 bench/audit/run.sh
#
# Environment:
#   SECONDS_PER_RUN  measured seconds per (store, writers) run (default 10)
#   WRITERS          writer counts (default "1 16 256")
#   PG_URL           PostgreSQL (default postgres://postgres@127.0.0.1:5432/test);
#                    each run gets a schema of its own, dropped afterwards
#   SKIP_BUILD=1     use the existing example binary
#
# Exit status: non-zero when a chain does not verify or an event is missing
# (whatever the speed).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
WRITERS=${WRITERS:-"1 16 256"}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET_DIR/release/examples/audit_bench
WORK=$(mktemp -d /tmp/keyward-bench-audit.XXXXXX)
SCHEMAS=()
FAILED=0

cleanup() {
  local s
  for s in "${SCHEMAS[@]}"; do
    psql "$PG_URL" -X -q -c "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [[ ${SKIP_BUILD:-0} != 1 ]]; then
  echo "==> cargo build --release -p keyward-store --example audit_bench" >&2
  (cd "$REPO" && cargo build --release --locked -q -p keyward-store --example audit_bench)
fi
fsync_us=$(python3 - "$WORK/probe" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o600)
buf, t = os.urandom(4096), []
for _ in range(100):
    t0 = time.perf_counter(); os.pwrite(fd, buf, 0); t.append(time.perf_counter() - t0)
t.sort(); print(round(t[50] * 1e6))
PY
)

printf 'audit append benchmark: %ss per run, fresh store per run; fsync (4 KiB O_DSYNC) median %s us; %s CPUs\n' \
  "$SECONDS_PER_RUN" "$fsync_us" "$(nproc)"
printf '%-11s %8s %12s %9s %9s %10s %s\n' store writers "events/s" "p50 ms" "p99 ms" events chain
for store in sqlite postgres; do
  for w in $WRITERS; do
    if [[ $store == sqlite ]]; then
      url="sqlite://$WORK/audit-$w.db"
    else
      schema="kw_bench_audit_$$_$w"
      psql "$PG_URL" -X -q -v ON_ERROR_STOP=1 -c "CREATE SCHEMA $schema" >/dev/null
      SCHEMAS+=("$schema")
      sep='?'; [[ $PG_URL == *\?* ]] && sep='&'
      url="${PG_URL}${sep}options=-c%20search_path%3D${schema}"
    fi
    line=$("$BIN" "$url" "$w" "$SECONDS_PER_RUN")
    python3 - "$store" "$line" <<'PY' || FAILED=1
import json, sys
store, r = sys.argv[1], json.loads(sys.argv[2])
ok = r["chain_ok"] and r["stored"] == r["events"]
print(f'{store:<11} {r["writers"]:>8} {r["events_per_sec"]:>12,.0f} {r["p50_ms"]:>9.2f} {r["p99_ms"]:>9.2f} {r["events"]:>10} '
      f'{"verified, all stored" if ok else "FAILED: chain_ok=%s stored=%s" % (r["chain_ok"], r["stored"])}')
sys.exit(0 if ok else 1)
PY
  done
done
if [[ $FAILED != 0 ]]; then
  echo "CHECK FAILED: a chain did not verify or events are missing" >&2
  exit 1
fi
echo "target (issue 6): >= 50,000 events/s on SQLite with 256 writers"
