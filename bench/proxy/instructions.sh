#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: the
# same for the same binary and inputs whatever else the machine is doing,
# so it shows a change of a few percent that wrk's ±20% run-to-run spread
# hides. Not a comparison with a peer (run.sh is that); a yardstick for
# keyward's own hot path. See BENCHMARKS.md, "Instructions per request".
#
#   bench/proxy/instructions.sh                 # default durability
#   bench/proxy/instructions.sh --durability buffered
#
# keyward runs under callgrind twice, once for FEW and once for MANY
# sequential POSTs over one keep-alive TLS connection (after the same
# start-up, first handshake included); the difference divided by
# MANY - FEW is what one request costs, every thread counted (tokio
# workers, the audit writer, blocking threads). Also prints the top
# functions by instructions per request (inclusive).
#
# Environment: FEW (default 200), MANY (default 1200), TOP (default 40),
# SKIP_BUILD=1 (use the existing release binary), KEYWARD_BIN (another
# keyward binary, e.g. an older build to compare with; implies no build),
# KEEP_WORK=1.
#
# Note: under valgrind SHA-256 runs its portable code (valgrind hides the
# CPU's SHA extensions), so the audit chain's hashing counts more than it
# costs on the real CPU.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
FEW=${FEW:-200}
MANY=${MANY:-1200}
TOP=${TOP:-40}
KW=${KEYWARD_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/keyward}
REAL_KEY=sk-mock-bench-key
WORK=$(mktemp -d /tmp/keyward-bench-instr.XXXXXX)
LOG=$WORK/setup.log
PIDS=()
FAILURES=()
# shellcheck source=../lib.sh
source "$HERE/../lib.sh"

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v callgrind_annotate >/dev/null || missing+=(valgrind)
[[ -x $(command -v nginx || echo /usr/sbin/nginx) ]] || missing+=(nginx)
((${#missing[@]} == 0)) || apt_install "${missing[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ ${SKIP_BUILD:-0} != 1 && -z ${KEYWARD_BIN:-} ]]; then
  say "cargo build --release -p keyward-cli"
  (cd "$REPO" && cargo build --release -p keyward-cli) || die "cargo build failed"
fi
[[ -x $KW ]] || die "keyward binary not found at $KW"

# The mock upstream: nginx answering from its config, as in run.sh.
MOCK_PORT=$(free_port)
mkdir -p "$WORK/mock/logs" "$WORK/mock/tmp"
render "$HERE/nginx-mock.conf.in" "$WORK/mock/nginx.conf" \
  WORKERS=1 PORT="$MOCK_PORT" KEY="$REAL_KEY" BODY="$(tr -d '\n' <"$HERE/mock.json")"
"$NGINX" -p "$WORK/mock/" -e logs/error.log -c nginx.conf >>"$LOG" 2>&1 &
PIDS+=($!)

# One data dir set up as the docs say, then served under callgrind per count.
DATA=$WORK/kw
"$KW" init --json --data-dir "$DATA" >"$WORK/init.json" 2>>"$LOG" || die "keyward init failed (see $LOG)"
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
ADMIN=$(field "$WORK/init.json" admin_token)
CA=$(field "$WORK/init.json" ca_cert)
PORT=$(free_port)
serve() { # serve [PREFIX...]: keyward serve in the background, waits for it
  "$@" "$KW" serve --data-dir "$DATA" --listen "127.0.0.1:$PORT" "${SERVE_ARGS[@]}" >"$WORK/serve.out" 2>>"$LOG" &
  SERVE_PID=$!
  PIDS+=("$SERVE_PID")
  for _ in $(seq 240); do
    grep -q 'listening on' "$WORK/serve.out" 2>/dev/null && return
    kill -0 "$SERVE_PID" 2>/dev/null || die "keyward serve exited (see $LOG)"
    sleep 0.25
  done
  die "keyward serve did not start (see $LOG)"
}
SERVE_ARGS=("$@")
serve
export KEYWARD_ADDR=https://127.0.0.1:$PORT KEYWARD_CACERT=$CA KEYWARD_TOKEN=$ADMIN
printf %s "$REAL_KEY" | "$KW" secret put openai --provider openai --upstream "http://127.0.0.1:$MOCK_PORT" \
  --allow-internal-upstream >>"$LOG" 2>&1 || die "secret put failed (see $LOG)"
AGENT=$("$KW" agent create bot --json 2>>"$LOG" | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
"$KW" grant add --agent bot --secret openai --mode proxy >>"$LOG" 2>&1 || die "grant add failed (see $LOG)"
stop_pid "$SERVE_PID"

post_n() { # post_n N: N sequential proxied POSTs on one connection; fails on any non-200
  python3 - "$1" "$PORT" "$CA" "$AGENT" <<'EOF'
import http.client, ssl, sys
n, port, ca, agent = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
conn = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(cafile=ca), timeout=120)
body = '{"model":"gpt-x","messages":[{"role":"user","content":"hi"}]}'
for i in range(n):
    conn.request("POST", "/proxy/openai/v1/chat/completions", body=body,
                 headers={"Authorization": "Bearer " + agent, "Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"request {i}: HTTP {r.status}")
EOF
}

count() { # count N: total instructions of a keyward run serving N requests
  local out=$WORK/callgrind.$1
  serve valgrind --tool=callgrind --callgrind-out-file="$out" --trace-children=no
  post_n "$1" || die "proxied requests failed under callgrind"
  kill -INT "$SERVE_PID"
  wait "$SERVE_PID" 2>/dev/null || true
  untrack "$SERVE_PID"
  callgrind_annotate --inclusive=yes --threshold=100 "$out" 2>/dev/null | grep -E '^ *[0-9,]+ \(' >"$out.txt"
}
# The anomaly detector reads an agent's recent trail (up to 2000 events)
# the first time a process sees the agent. Without this warm-up the second
# count's process would read more of it than the first's, and the
# difference would be charged to the requests. With 2000 events on record,
# both read exactly 2000.
say "warming up: 1100 requests (2200 audit events) without callgrind"
serve
post_n 1100 || die "warm-up requests failed"
stop_pid "$SERVE_PID"

say "counting $FEW requests under callgrind"
count "$FEW"
say "counting $MANY requests under callgrind"
count "$MANY"

python3 - "$WORK/callgrind.$FEW.txt" "$WORK/callgrind.$MANY.txt" "$((MANY - FEW))" "$TOP" "$*" <<'EOF'
import re, sys
few, many, n, top, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def load(path):
    rows = {}
    for line in open(path):
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(.*)", line)
        if m:
            rows[m.group(2)] = int(m.group(1).replace(",", ""))
    return rows
a, b = load(few), load(many)
total = (b["PROGRAM TOTALS"] - a["PROGRAM TOTALS"]) / n
print(f"keyward serve {args or '(defaults)'}: {total:,.0f} instructions per proxied request "
      f"({n} requests: {sys.argv[2].rsplit('.', 2)[-2]} minus {sys.argv[1].rsplit('.', 2)[-2]})")
print(f"top {top} functions, inclusive instructions per request:")
rows = sorted(((b[k] - a.get(k, 0)) / n, k) for k in b if k != "PROGRAM TOTALS")
for v, k in list(reversed(rows))[:top]:
    name = re.sub(r"^\?\?\?:", "", k)
    name = re.sub(r" \[[^\]]*\]$", "", name)
    print(f"  {v:10,.0f}  {name[:140]}")
EOF
