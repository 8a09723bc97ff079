# Helpers shared by the bench/*/run.sh scripts (sourced, not run). The
# sourcing script sets WORK (a temporary dir), LOG (its setup log) and the
# arrays PIDS (processes it started) and FAILURES (failed checks), and may
# define cleanup_extra (run at exit after its processes are stopped).

say() { printf '==> %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
fail() {
  printf 'CHECK FAILED: %s\n' "$*" >&2
  FAILURES+=("$*")
}

untrack() { # forget a finished process, so cleanup never signals a reused pid
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_pid() { # stop one process we started, wait for it, forget it
  local p=$1 i
  kill "$p" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$p" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  untrack "$p"
}

descendants() { # pids below $1 (children, grandchildren, ...), one a line
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$1" '
    { pid = $1; s = $0; sub(/^.*\) /, "", s); split(s, f, " "); parent[pid] = f[2] }
    END {
      n = 1; q[1] = root
      for (i = 1; i <= n; i++) for (p in parent) if (parent[p] == q[i]) { q[++n] = p; print p }
    }'
}

# A free TCP port on 127.0.0.1 (tried at random, so parallel runs rarely race).
free_port() {
  python3 - <<'EOF'
import random, socket
for _ in range(500):
    p = random.randint(20000, 60000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break
EOF
}

render() { # render TEMPLATE OUTPUT NAME=VALUE... : replace every @NAME@
  python3 - "$@" <<'EOF'
import re, sys
src, dst, *pairs = sys.argv[1:]
text = open(src).read()
for pair in pairs:
    name, value = pair.split("=", 1)
    text = text.replace("@" + name + "@", value)
left = re.findall(r"@[A-Z_]+@", text)
if left:
    sys.exit(f"{src}: unrendered placeholders {sorted(set(left))}")
open(dst, "w").write(text)
EOF
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p i kids=()
  # Processes started here may have children of their own (nginx workers,
  # LiteLLM's uvicorn workers): note them first, by pid, then stop the parents.
  for p in "${PIDS[@]}"; do
    while read -r i; do [[ -n $i ]] && kids+=("$i"); done < <(descendants "$p")
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  for p in "${kids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if declare -F cleanup_extra >/dev/null; then cleanup_extra || true; fi
  if [[ ${KEEP_WORK:-0} == 1 ]]; then
    say "kept work dir $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SUDO=
[[ $(id -u) == 0 ]] || SUDO=sudo
apt_install() {
  say "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q "$@" >>"$LOG" 2>&1 || {
    $SUDO apt-get update -q >>"$LOG" 2>&1 && $SUDO apt-get install -y -q "$@" >>"$LOG" 2>&1
  } || die "apt-get install $* failed (see $LOG)"
}
