#!/usr/bin/env bash
# Where the CPU of one issuance goes by thread, and how many times it
# changes threads: context switches, futex calls and CPU time per issuance
# of each thread group of `keymint server` (SQLite), next to the same
# accounting for a trivial request (`GET /v1/health` under wrk) on the same
# server and cores (docs/design/0036, "Fifth pass").
#
#   bench/issue-switches.sh KEYMINT [SECONDS] [CONCURRENCY]   # defaults 8 and 64
#
# Starts one `keymint server` on a fresh SQLite store with a permit-all
# policy and the `demo` role (as bench/ha.sh), then:
#  1. `keymint bench issue` at CONCURRENCY in flight for SECONDS; inside the
#     timed window (1 s in to 1 s before the end) it samples, per thread of
#     the server, voluntary and involuntary context switches and CPU ticks
#     (/proc/PID/task/*/{status,stat}), the server's futex calls
#     (`perf stat -e syscalls:sys_enter_futex`, when perf can) and the load
#     client's CPU, and divides by the leases /metrics counted meanwhile;
#  2. wrk with CONCURRENCY connections on 2 threads against /v1/health for
#     SECONDS, with the same accounting per request.
# With SEED=N the store is first filled with N active leases (in tasks of
# 1,000) by `keymint bench restart --leases N`, to measure on a store that
# is no longer small.
# Needs: curl, wrk, python3; perf (optional).
set -euo pipefail
[[ $# -ge 1 && -x $1 ]] || { echo "usage: $0 KEYMINT [SECONDS] [CONCURRENCY]" >&2; exit 2; }
BIN=$(realpath "$1"); SECS=${2:-8}; CONC=${3:-64}
for t in curl wrk python3 timeout; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
D=$(mktemp -d "${TMPDIR:-/tmp}/keymint-switches.XXXXXX")
SERVER=
cleanup() {
  if [[ -n $SERVER ]]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$D"
}
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$D/permit-all.cedar"
if [[ -n ${SEED:-} ]]; then
  SEED_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$BIN" bench restart --leases "$SEED" --data-dir "$D/data" --port "$SEED_PORT" | sed 's/^/seed: /'
fi
mkdir -p "$D/data"; chmod 700 "$D/data"
cat >"$D/keymint.toml" <<EOF
version = 1
[server]
listen = "127.0.0.1:$PORT"
dangerous_plaintext = true
[storage]
data_dir = "$D/data"
[policy]
paths = ["$D/permit-all.cedar"]

[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
EOF
"$BIN" server --config "$D/keymint.toml" >"$D/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
  curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/v1/health" 2>/dev/null && break
  sleep 0.1
done
export KEYMINT_ADDR=http://127.0.0.1:$PORT KEYMINT_TOKEN
KEYMINT_TOKEN=$(cat "$D/data/admin.token")

# One line per thread: name/tid, voluntary, involuntary switches, user and
# system ticks. Names are cut to 15 characters by the kernel: the SQLite threads
# start in the order checkpointer, syncer, writer (ascending tids), and
# tokio's workers and blocking threads share one name.
threads() {
  local t
  for t in /proc/"$SERVER"/task/*; do
    [[ -r $t/status ]] || continue
    awk -v stat="$(cat "$t/stat" 2>/dev/null)" -v tid="${t##*/}" '
      /^Name:/ { name = $2 "/" tid }
      /^voluntary_ctxt_switches/ { v = $2 }
      /^nonvoluntary_ctxt_switches/ { n = $2 }
      END { sub(/^.*\) /, "", stat); split(stat, f, " "); print name, v, n, f[12], f[13] }' "$t/status"
  done
}
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
issued() { curl -fsS "$KEYMINT_ADDR/metrics" | awk '/^keymint_leases_issued_total/ {s += $2} END {print s + 0}'; }

# report LABEL N BEFORE AFTER CLIENT_TICKS FUTEX: per-thread-group figures per unit.
report() {
  python3 - "$1" "$2" "$3" "$4" "$5" "$6" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import sys, collections
label, n, before, after, client, futex, hz, workers = sys.argv[1:]
n = float(n); hz = float(hz); workers = int(workers)
def parse(path):
    out = collections.defaultdict(lambda: [0, 0, 0, 0])
    for line in open(path):
        name, v, i, u, k = line.split()
        g = out[name]
        g[0] += int(v); g[1] += int(i); g[2] += int(u); g[3] += int(k)
    return out
b, a = parse(before), parse(after)
# Labels: tokio's first `workers` threads are its workers, later ones its
# blocking pool; the three SQLite threads start as checkpointer, syncer,
# writer.
def tid(k): return int(k.split("/")[1])
tok = sorted((k for k in a if k.startswith("tokio-")), key=tid)
sql = sorted((k for k in a if k.startswith("keymint-sqlite")), key=tid)
names = {}
for i, k in enumerate(tok):
    names[k] = "tokio worker" if i < workers else "tokio blocking pool"
for k, l in zip(sql, ["sqlite checkpointer", "sqlite syncer", "sqlite writer"]):
    names[k] = l
groups = collections.OrderedDict()
for k in sorted(a, key=tid):
    d = [a[k][j] - b.get(k, [0, 0, 0, 0])[j] for j in range(4)]
    g = groups.setdefault(names.get(k, k.split("/")[0]), [0, 0, 0, 0, 0])
    for j in range(4):
        g[j] += d[j]
    g[4] += 1
print(f"{label}: {int(n)} in the window")
print(f"  {'threads':<30} {'vol/unit':>9} {'invol/unit':>10} {'user us':>8} {'sys us':>8}")
tot = [0.0, 0.0, 0.0, 0.0]
for name, g in groups.items():
    if not any(g[:4]):
        continue
    row = [g[0] / n, g[1] / n, g[2] / hz * 1e6 / n, g[3] / hz * 1e6 / n]
    tot = [x + y for x, y in zip(tot, row)]
    print(f"  {name + f' ({g[4]})':<30} {row[0]:9.2f} {row[1]:10.2f} {row[2]:8.1f} {row[3]:8.1f}")
print(f"  {'server, all threads':<30} {tot[0]:9.2f} {tot[1]:10.2f} {tot[2]:8.1f} {tot[3]:8.1f}   (CPU {tot[2] + tot[3]:.1f} us per unit)")
print(f"  load client CPU per unit: {float(client) / hz * 1e6 / n:.1f} us")
if futex:
    print(f"  server futex calls per unit: {futex}")
PY
}

# The server's futex calls while it runs, over about the same window as
# the thread counters (perf's own start-up is not counted: the figure per
# unit divides by the rate of the thread window times perf's lifetime, so
# it is a slight underestimate). Empty without a usable perf.
PERF=; PERF_T0=
perf_start() {
  PERF=; rm -f "$D/futex"
  command -v perf >/dev/null || return 0
  PERF_T0=$(date +%s.%N)
  perf stat -e syscalls:sys_enter_futex -p "$SERVER" -x, -o "$D/futex" -- sleep "$1" 2>/dev/null &
  PERF=$!
}
perf_end() {   # perf_end UNITS_PER_SECOND -> futex calls per unit, or empty
  [[ -n $PERF ]] || { echo ""; return 0; }
  wait "$PERF" 2>/dev/null || true
  local t1; t1=$(date +%s.%N)
  awk -F, -v r="$1" -v t0="$PERF_T0" -v t1="$t1" \
    '/sys_enter_futex/ && $1 ~ /^[0-9]+$/ { printf "%.2f", $1 / (r * (t1 - t0)) }' "$D/futex" 2>/dev/null || true
}

# 1. issuance
# The load runs 2 s longer than SECONDS; the window is from 1 s in to
# SECONDS, clear of its start and its end.
"$BIN" bench issue --concurrency "$CONC" --duration "$((SECS + 2))s" >"$D/issue.out" 2>&1 &
CLIENT=$!
WIN=$((SECS > 2 ? SECS - 1 : 1))
sleep 1
perf_start "$WIN"
threads >"$D/t0"; c0=$(ticks "$CLIENT"); i0=$(issued)
sleep "$WIN"
threads >"$D/t1"; c1=$(ticks "$CLIENT"); i1=$(issued)
F=$(perf_end "$(((i1 - i0) / WIN))")
wait "$CLIENT"
cat "$D/issue.out"
report "issuance (keymint bench issue, $CONC in flight)" "$((i1 - i0))" "$D/t0" "$D/t1" "$((c1 - c0))" "$F"

# 2. a trivial request on the same server: GET /v1/health under wrk
wrk -t2 -c"$CONC" -d"$((SECS + 2))s" "$KEYMINT_ADDR/v1/health" >"$D/wrk.out" 2>&1 &
WRK=$!
sleep 1
perf_start "$WIN"
threads >"$D/h0"; w0=$(ticks "$WRK")
sleep "$WIN"
threads >"$D/h1"; w1=$(ticks "$WRK")
wait "$WRK"
RPS=$(awk '/Requests\/sec/ { print $2 }' "$D/wrk.out")
F=$(perf_end "$RPS")
echo "wrk /v1/health: $RPS req/s"
report "GET /v1/health (wrk -t2 -c$CONC)" "$(python3 -c "print(int(float('$RPS') * $WIN))")" "$D/h0" "$D/h1" "$((w1 - w0))" "$F"
