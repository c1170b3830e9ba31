#!/usr/bin/env bash
# Instructions per token issuance over HTTP, counted by callgrind: a figure
# that the load of a shared machine does not move (docs/design/0036).
#
#   bench/issue-profile.sh KEYMINT [SECONDS] [CONCURRENCY]   # defaults 20 and 8
#   PG=postgres://postgres@127.0.0.1:5432 bench/issue-profile.sh KEYMINT
#
# Starts `keymint server` once natively (it makes its keys: an RSA key
# costs billions of instructions, which would swamp the count), then again
# on the same store under `valgrind --tool=callgrind` with instrumentation
# off; warms up with wrk for 3 s, then switches instrumentation on for
# SECONDS of wrk posting leases to one open task (the load client runs
# natively, not counted) and off again. Prints the instructions counted (every thread of the server:
# HTTP, broker, policy, store writer, syncer, checkpointer, audit sink) and
# the leases the server's /metrics counted meanwhile, and their ratio.
# With PG the store is a PostgreSQL database of its own (created and
# dropped here): PostgreSQL's own work is not counted.
# The callgrind file is kept for `callgrind_annotate --inclusive=yes FILE`.
# Needs: valgrind, wrk, curl, python3 (and psql with PG).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 KEYMINT [SECONDS] [CONCURRENCY]" >&2; exit 2; }
BIN=$(realpath "$1"); SECS=${2:-20}; CONC=${3:-8}
for t in valgrind callgrind_control callgrind_annotate curl python3 timeout wrk; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
D=$(mktemp -d /tmp/keymint-issue-profile.XXXXXX)
PIDS=()
SCHEMA=
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [[ -n $SCHEMA ]]; then psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $SCHEMA WITH (FORCE)" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
KM=$(port)
# As bench/ha.sh: a permit-all policy (`keymint bench policy` measures
# decisions) and the `demo` role; with PG, a database of its own. Under
# valgrind a decision outlasts its 50 ms budget: the budget is 10 s here.
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$D/permit-all.cedar"
STORAGE="data_dir = \"$D/data\""
if [[ -n ${PG:-} ]]; then
  command -v psql >/dev/null || { echo "missing: psql" >&2; exit 2; }
  DB=kmip_$(date +%s)_$RANDOM
  psql "$PG/postgres" -qc "CREATE DATABASE $DB" >/dev/null
  SCHEMA=$DB
  STORAGE="$STORAGE
backend = \"postgres\"
url = \"$PG/$DB\"
tls = \"disable\"
pool_size = 8"
fi
cat >"$D/keymint.toml" <<EOF2
version = 1
[server]
listen = "127.0.0.1:$KM"
dangerous_plaintext = true
[storage]
$STORAGE
[policy]
paths = ["$D/permit-all.cedar"]
decision_budget_ms = 10000
[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
EOF2
CMD=(server --config "$D/keymint.toml")
health() { curl -fs -o /dev/null "http://127.0.0.1:$KM/v1/health"; }
# First start, natively: the keys are made and stored.
"$BIN" "${CMD[@]}" >"$D/first.log" 2>&1 &
FIRST=$!
for ((i = 0; i < 240; i++)); do health && break; sleep 0.5; done
sleep 2
kill "$FIRST"; wait "$FIRST" 2>/dev/null || true
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/callgrind.out" \
  "$BIN" "${CMD[@]}" >"$D/server.log" 2>&1 &
VG=$!; PIDS+=("$VG")
for ((i = 0; i < 480; i++)); do health && break; sleep 0.5; done
health || { echo "the server did not start; see $D/server.log" >&2; exit 1; }
export KEYMINT_ADDR=http://127.0.0.1:$KM
KEYMINT_TOKEN=$(cat "$D/data/admin.token"); export KEYMINT_TOKEN
count() { curl -fsS "http://127.0.0.1:$KM/metrics" | awk '/^keymint_leases_issued_total/ {s += $2} END {print s + 0}'; }
# wrk as the client, on one task that stays open: `keymint bench issue`
# ends its task when it stops, and the revocation of every lease it issued
# would be counted as issuance (it was, before session 27: about 40 % of
# the count).
TASK=$(curl -fsS -H "Authorization: Bearer $KEYMINT_TOKEN" -H 'Content-Type: application/json' \
  -d '{"workload":"bench","role":"demo","ttl_secs":3600,"intent":"bench/issue-profile.sh"}' \
  "http://127.0.0.1:$KM/v1/tasks" | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
{
  echo 'wrk.method = "POST"'
  echo "wrk.body = '{}'"
  echo 'wrk.headers["Content-Type"] = "application/json"'
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$KEYMINT_TOKEN"
} >"$D/issue.lua"
chmod 600 "$D/issue.lua"
URL=http://127.0.0.1:$KM/v1/tasks/$TASK/leases
wrk -t1 -c"$CONC" -d3s --timeout 30s -s "$D/issue.lua" "$URL" >/dev/null 2>&1 || true
before=$(count)
callgrind_control -i on "$VG" >/dev/null
wrk -t1 -c"$CONC" -d"${SECS}s" --timeout 60s --latency -s "$D/issue.lua" "$URL" >"$D/bench.txt" 2>&1 || true
callgrind_control -i off "$VG" >/dev/null
after=$(count)
callgrind_control -d "$VG" >/dev/null
sleep 1
OUT=$(ls -S "$D"/callgrind.out.* | head -1)
IR=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
N=$((after - before))
echo "binary: $BIN ($("$BIN" --version 2>/dev/null | head -1))"
echo "store: ${SCHEMA:+postgres }${SCHEMA:-sqlite}"
echo "client: wrk, $CONC connections: $(grep -E 'Requests/sec|Non-2xx' "$D/bench.txt" | tr -s ' ' | paste -sd';')"
echo "leases issued while counted: $N"
echo "instructions: $IR"
echo "instructions per issuance: $((IR / (N > 0 ? N : 1)))"
echo "callgrind file: $OUT"
