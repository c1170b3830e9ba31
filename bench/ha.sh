#!/usr/bin/env bash
# keymint on PostgreSQL, several replicas (issue 13's figures):
#
#   bench/ha.sh target/release/keymint
#
# Every run is bounded in time and on 127.0.0.1 only. Each part uses a
# database of its own on the PostgreSQL at 127.0.0.1:5432 (user postgres,
# created here as `kmhb_<time>_<random>` and dropped on the way out):
#
#   issue       HTTP issuance (`keymint bench issue`, 64 in flight): SQLite
#               (`keymint dev`), one PostgreSQL replica, three PostgreSQL
#               replicas on one database with the load spread over them
#               round robin (`--addr a,b,c`); interleaved per round.
#   revocation  three replicas; a task ended on one, the time until the
#               other two refuse its token (`keymint bench revocation`).
#   restart     1,000,000 active leases in PostgreSQL, then `keymint server`
#               started on them: time to the first 200 from /v1/health
#               (`keymint bench restart --config`).
#   proxy       the egress proxy with durable budgets, SQLite and
#               PostgreSQL, next to a plain nginx reverse proxy on the same
#               nginx upstream (bench/compare.sh's stand-in and wrk load).
#
# With BEFORE=OTHER_BINARY, the issue part also runs OTHER_BINARY on SQLite
# and with one and three PostgreSQL replicas, each run before this one's.
#
# Environment: ONLY ("issue revocation restart proxy"), ROUNDS (2), DUR
# seconds per run (10), CONC in flight (64), SAMPLES (200), LEASES
# (1000000), PGHOST/PGPORT/PGUSER (127.0.0.1/5432/postgres), KEEP=1 keeps
# the work directory. Needs: psql, nginx, wrk, curl, jq, python3.
set -euo pipefail

[[ $# -eq 1 && -x $1 ]] || { echo "usage: $0 KEYMINT_BINARY" >&2; exit 2; }
BIN=$(realpath "$1")
BEFORE_BIN=${BEFORE:+$(realpath "$BEFORE")}
for t in psql nginx wrk curl jq python3 timeout; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
ONLY=${ONLY:-"issue revocation restart proxy"}
ROUNDS=${ROUNDS:-2}; DUR=${DUR:-10}; CONC=${CONC:-64}
SAMPLES=${SAMPLES:-200}; LEASES=${LEASES:-1000000}
export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
WORK=$(mktemp -d /tmp/keymint-ha.XXXXXX)
chmod 755 "$WORK"
RES=$WORK/results; mkdir -p "$RES"
PIDS=(); DBS=()

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# The machine's CPU counters (busy and total jiffies, every core) from
# /proc/stat, to tell how busy the cores were during a run.
cpu_ticks() { awk '/^cpu /{t=0; for (i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
cpu_report() {               # cpu_report "BUSY0 TOTAL0" "BUSY1 TOTAL1"
  local b0 t0 b1 t1
  read -r b0 t0 <<<"$1"; read -r b1 t1 <<<"$2"
  local hz; hz=$(getconf CLK_TCK)
  awk -v b="$((b1 - b0))" -v t="$((t1 - t0))" -v hz="$hz" -v n="$(nproc)" \
    'BEGIN { printf "cores busy %.0f%% (%.1f core-seconds of %.1f)\n", 100*b/t, b/hz, t/hz }'
}
# CPU ticks (user + system) of three groups of processes: "SERVERS CLIENT
# POSTGRES", each a space-separated list of pids (a process gone counts 0).
proc_ticks() {
  local g pid sum out=()
  for g in "$1" "$2" "$3"; do
    sum=0
    for pid in $g; do
      [[ -r /proc/$pid/stat ]] || continue
      sum=$((sum + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$pid/stat")))
    done
    out+=("$sum")
  done
  echo "${out[*]}"
}
# The issuances inside the window are estimated from the run's rate (the
# bench prints only its total), so the figure is per average issuance.
per_issuance() {             # per_issuance "S0 C0 P0" "S1 C1 P1" SECONDS BENCH_OUTPUT
  local s0 c0 p0 s1 c1 p1 rate
  read -r s0 c0 p0 <<<"$1"; read -r s1 c1 p1 <<<"$2"
  rate=$(grep -o '[0-9]*/s;' "$4" | head -1 | tr -d '/s;')
  [[ -n $rate && $rate -gt 0 ]] || return 0
  awk -v s="$((s1 - s0))" -v c="$((c1 - c0))" -v p="$((p1 - p0))" -v hz="$(getconf CLK_TCK)" \
    -v n="$((rate * $3))" 'BEGIN {
      f = 1e6 / hz / n
      printf "CPU per issuance: servers %.0f us, load client %.0f us, PostgreSQL %.0f us, in all %.0f us\n",
        s * f, c * f, p * f, (s + c + p) * f }'
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_http() {
  local i
  for ((i = 0; i < 600; i++)); do
    curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer from $1 within 60 s" >&2; return 1
}
stop_pid() {                 # stop one process we started, by its pid
  local pid=$1 i keep=()
  for i in "${PIDS[@]}"; do [[ $i == "$pid" ]] || keep+=("$i"); done
  PIDS=("${keep[@]}")
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
new_db() {                   # new_db -> prints the name of a fresh database
  local name
  name="kmhb_$(date +%s)_$(od -An -tx1 -N4 /dev/urandom | tr -d ' \n')"
  psql -d postgres -qAtc "CREATE DATABASE $name" >/dev/null
  DBS+=("$name")
  echo "$name"
}
drop_db() {
  psql -d postgres -qAtc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null 2>&1 || true
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local p d
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  for d in "${DBS[@]}"; do drop_db "$d"; done
  if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- configuration -----------------------------------------------------------------
UP_PORT=; FRONT_PORT=
CHAT_JSON='{"id":"chatcmpl-bench","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}'
CHAT_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'

config() {                   # config DIR PORT DB|sqlite
  cat <<EOF
version = 1
[server]
listen = "127.0.0.1:$2"
dangerous_plaintext = true
[storage]
data_dir = "$1/data"
EOF
  if [[ $3 != sqlite ]]; then
    cat <<EOF
backend = "postgres"
url = "postgres://$PGUSER@$PGHOST:$PGPORT/$3"
tls = "disable"
pool_size = 8
EOF
  fi
  cat <<EOF
[policy]
paths = ["$WORK/permit-all.cedar"]

[[roles]]
name = "demo"
engine = "token"
scopes = ["llm:chat"]
default_ttl = "15m"
max_ttl = "1h"
EOF
  if [[ -n $UP_PORT ]]; then
    cat <<EOF

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$UP_PORT/v1"
timeout = "10s"

[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

# Budgets on, far above what a run can use: the metered path (a durable
# reservation before forwarding, a settle after) is what is measured.
[[roles]]
name = "gpt"
engine = "token"
upstream = "openai"
scopes = ["llm:chat"]
default_ttl = "1h"
max_ttl = "1h"
[roles.proxy]
models = ["gpt-4o-mini"]
endpoints = ["chat.completions"]
max_requests = 1000000000
max_input_tokens = 1000000000000
max_output_tokens = 1000000000000
max_spend_usd = 1000000.0
EOF
  fi
}
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$WORK/permit-all.cedar"

# start_replicas NAME N DB|sqlite -> sets ADDRS (comma-separated) and TOKEN;
# the replicas share the first one's root key and admin token, as replicas
# behind one load balancer do.
ADDRS=; TOKEN=; REPLICA_PIDS=(); RBIN=$BIN
start_replicas() {
  local name=$1 n=$2 db=$3 i d port addrs=()
  REPLICA_PIDS=()
  for ((i = 1; i <= n; i++)); do
    d=$WORK/$name-$i; port=$(free_port)
    mkdir -p "$d/data"; chmod 700 "$d/data"
    if ((i > 1)); then cp -p "$WORK/$name-1/data/root.key" "$WORK/$name-1/data/admin.token" "$d/data/"; fi
    config "$d" "$port" "$db" >"$d/keymint.toml"
    "$RBIN" server --config "$d/keymint.toml" >"$d/server.log" 2>&1 &
    PIDS+=($!); REPLICA_PIDS+=($!)
    wait_http "http://127.0.0.1:$port/v1/health" || { tail -5 "$d/server.log" >&2; return 1; }
    addrs+=("http://127.0.0.1:$port")
  done
  ADDRS=$(IFS=,; echo "${addrs[*]}")
  TOKEN=$(cat "$WORK/$name-1/data/admin.token")
}
stop_replicas() {
  local p
  for p in "${REPLICA_PIDS[@]}"; do stop_pid "$p"; done
  REPLICA_PIDS=()
}

# --- issue -----------------------------------------------------------------------
run_issue() {                # run_issue LABEL ROUND N DB|sqlite [BINARY]
  local out=$RES/issue.$1.$2 db=$4
  RBIN=${5:-$BIN}
  [[ $db == new ]] && db=$(new_db)
  start_replicas "issue-$1-$2" "$3" "$db"
  log "issue $1 round $2: $3 replica(s) (load $(loadavg))"
  KEYMINT_ADDR=$ADDRS KEYMINT_TOKEN=$TOKEN timeout -k 5 $((DUR + 60)) \
    "$BIN" bench issue --concurrency "$CONC" --duration "${DUR}s" >"$out.out" 2>"$out.err" &
  local client=$!
  # Sampled inside the timed window only (from 1 s in to 1 s before its
  # end): the task's start before it and its end after it (every lease
  # revoked) are not issuance. The whole machine's cores (whether the run
  # was bound by them or by waiting), and the CPU time of the processes
  # under test alone, which other work on the machine does not inflate:
  # the servers, the load client, and PostgreSQL's backends of this
  # database (the `sqlite` runs have none).
  local win=$((DUR > 3 ? DUR - 2 : 1)) c0 p0 pgpids=""
  sleep 1
  client="$client $(pgrep -P "$client" | tr '\n' ' ')"   # `timeout` and keymint under it
  [[ $db != sqlite ]] && pgpids=$(psql -d postgres -qAtc \
    "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE datname = '$db'")
  c0=$(cpu_ticks)
  p0=$(proc_ticks "${REPLICA_PIDS[*]}" "$client" "$pgpids")
  sleep "$win"
  local c1 p1; c1=$(cpu_ticks)
  p1=$(proc_ticks "${REPLICA_PIDS[*]}" "$client" "$pgpids")
  wait "${client%% *}" || log "issue $1 failed: $(tail -1 "$out.err")"
  cpu_report "$c0" "$c1" >>"$out.out"
  per_issuance "$p0" "$p1" "$win" "$out.out" >>"$out.out"
  cat "$out.out" >&2
  stop_replicas
  RBIN=$BIN
  [[ $db != sqlite ]] && drop_db "$db"
  return 0
}

# --- revocation --------------------------------------------------------------------
run_revocation() {
  local db
  db=$(new_db)
  start_replicas revocation 3 "$db"
  log "revocation: 3 replicas, $SAMPLES samples (load $(loadavg))"
  KEYMINT_ADDR=$ADDRS KEYMINT_TOKEN=$TOKEN timeout -k 5 900 \
    "$BIN" bench revocation --samples "$SAMPLES" >"$RES/revocation.out" 2>"$RES/revocation.err" ||
    log "revocation failed: $(tail -1 "$RES/revocation.err")"
  cat "$RES/revocation.out" >&2
  stop_replicas
  drop_db "$db"
}

# --- restart -------------------------------------------------------------------------
run_restart() {
  local db d=$WORK/restart port
  db=$(new_db); port=$(free_port)
  mkdir -p "$d/data"; chmod 700 "$d/data"
  config "$d" "$port" "$db" >"$d/keymint.toml"
  log "restart: $LEASES active leases on PostgreSQL (load $(loadavg))"
  timeout -k 5 1800 "$BIN" bench restart --leases "$LEASES" --config "$d/keymint.toml" \
    --port "$port" --data-dir "$d/data" >"$RES/restart.out" 2>"$RES/restart.err" ||
    log "restart failed: $(tail -1 "$RES/restart.err")"
  cat "$RES/restart.out" >&2
  psql -d "$db" -qAtc "SELECT pg_size_pretty(pg_database_size(current_database()))" \
    >"$RES/restart.size" 2>/dev/null || true
  drop_db "$db"
}

# --- proxy ---------------------------------------------------------------------------
start_nginx() {              # start_nginx NAME SERVER_BLOCK
  local d=$WORK/nginx-$1
  mkdir -p "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
daemon off;
worker_processes auto;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $d/tmp/body;
  proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fastcgi;
  uwsgi_temp_path $d/tmp/uwsgi;
  scgi_temp_path $d/tmp/scgi;
$2
}
EOF
  nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >"$d/stdout.log" 2>&1 &
  PIDS+=($!)
}
write_lua() {                # write_lua FILE TOKEN
  {
    echo 'wrk.method = "POST"'
    printf "wrk.body = '%s'\n" "$CHAT_BODY"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$2"
  } >"$1"
  chmod 600 "$1"
}
wrk_run() {                  # wrk_run NAME URL LUA
  log "wrk $1: 32 connections, ${DUR}s (load $(loadavg))"
  timeout -k 5 $((DUR + 30)) wrk -t2 -c32 -d"${DUR}s" --latency -s "$3" "$2" >"$RES/$1.wrk" 2>&1 ||
    log "wrk $1 failed: $(tail -1 "$RES/$1.wrk")"
  grep -E 'Requests/sec|^ +50%|^ +99%|Non-2xx' "$RES/$1.wrk" >&2 || true
}
setup_nginx() {
  UP_PORT=$(free_port)
  start_nginx upstream "  server {
    listen 127.0.0.1:$UP_PORT;
    location = /v1/chat/completions { default_type application/json; return 200 '$CHAT_JSON'; }
    location / { return 404; }
  }"
  wait_http "http://127.0.0.1:$UP_PORT/v1/chat/completions"
  FRONT_PORT=$(free_port)
  start_nginx front "  upstream chat { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    listen 127.0.0.1:$FRONT_PORT;
    location / { proxy_pass http://chat; proxy_http_version 1.1; proxy_set_header Connection \"\"; }
  }"
  wait_http "http://127.0.0.1:$FRONT_PORT/v1/chat/completions"
  write_lua "$WORK/plain.lua" "sk-not-checked-by-nginx"
}
run_proxy() {                # run_proxy LABEL ROUND DB|sqlite
  local db=$3 d tok addr code
  [[ $db == new ]] && db=$(new_db)
  start_replicas "proxy-$1-$2" 1 "$db"
  d=$WORK/proxy-$1-$2-1; addr=$ADDRS
  printf 'sk-fake-bench-%s\n' "$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')" >"$d/openai.key"
  KEYMINT_ADDR=$addr KEYMINT_TOKEN=$TOKEN "$BIN" upstream set openai --key-file "$d/openai.key" >/dev/null
  tok=$(KEYMINT_ADDR=$addr KEYMINT_TOKEN=$TOKEN \
    "$BIN" task start --role gpt --workload bench --ttl 1h --issue -o json | jq -r '.credential.token')
  write_lua "$d/post.lua" "$tok"
  code=$(curl -sS -o "$d/probe.json" -w '%{http_code}' -H "Authorization: Bearer $tok" \
    -H 'Content-Type: application/json' --data "$CHAT_BODY" "$addr/proxy/openai/chat/completions")
  if [[ $code == 200 ]]; then
    wrk_run "proxy.$1.$2" "$addr/proxy/openai/chat/completions" "$d/post.lua"
    curl -fsS --max-time 5 "$addr/metrics" | grep -E '^keymint_proxy_(requests|denials)_total' \
      >"$RES/proxy-metrics.$1.$2.txt" || true
  else
    log "proxy $1: probe answered HTTP $code"
  fi
  stop_replicas
  [[ $db != sqlite ]] && drop_db "$db"
  return 0
}

# --- the run ---------------------------------------------------------------------------
START=$(date +%s)
{
  echo "date=$(date -u +%FT%TZ)"; echo "binary=$BIN ($("$BIN" --version 2>&1 | head -1))"
  [[ -n $BEFORE_BIN ]] && echo "before=$BEFORE_BIN"
  echo "postgres=$(psql -d postgres -qAtc 'SHOW server_version')"
  echo "cpus=$(nproc)"; echo "load_start=$(loadavg)"
  echo "rounds=$ROUNDS dur=$DUR conc=$CONC samples=$SAMPLES leases=$LEASES"
} >"$RES/meta.txt"
[[ $ONLY == *proxy* ]] && setup_nginx
for ((r = 1; r <= ROUNDS; r++)); do
  if [[ $ONLY == *issue* ]]; then
    [[ -n $BEFORE_BIN ]] && run_issue before-sqlite "$r" 1 sqlite "$BEFORE_BIN"
    run_issue sqlite "$r" 1 sqlite
    if [[ -n $BEFORE_BIN ]]; then
      run_issue before-pg1 "$r" 1 new "$BEFORE_BIN"
      run_issue before-pg3 "$r" 3 new "$BEFORE_BIN"
    fi
    run_issue pg1 "$r" 1 new
    run_issue pg3 "$r" 3 new
  fi
  if [[ $ONLY == *proxy* ]]; then
    wrk_run "proxy.nginx.$r" "http://127.0.0.1:$FRONT_PORT/v1/chat/completions" "$WORK/plain.lua"
    run_proxy sqlite "$r" sqlite
    run_proxy pg "$r" new
  fi
done
[[ $ONLY == *revocation* ]] && run_revocation
[[ $ONLY == *restart* ]] && run_restart
{ echo "load_end=$(loadavg)"; echo "seconds=$(($(date +%s) - START))"; } >>"$RES/meta.txt"

# --- summary ---------------------------------------------------------------------------
echo "## bench/ha.sh results"
cat "$RES/meta.txt"
for f in "$RES"/issue.*.out "$RES"/revocation.out "$RES"/restart.out; do
  [[ -f $f ]] && printf '%s: %s\n' "$(basename "$f" .out)" "$(tr '\n' ' ' <"$f")"
done
for f in "$RES"/proxy.*.wrk; do
  [[ -f $f ]] || continue
  printf '%s: %s req/s, p50 %s, p99 %s, non-2xx %s\n' "$(basename "$f" .wrk)" \
    "$(awk '/Requests\/sec/ {print $2}' "$f")" "$(awk '$1 == "50%" {print $2}' "$f")" \
    "$(awk '$1 == "99%" {print $2}' "$f")" "$(awk '/Non-2xx/ {print $5}' "$f" | head -1)"
done
for f in "$RES"/proxy-metrics.*.txt; do
  [[ -f $f ]] && printf '%s: %s\n' "$(basename "$f" .txt)" "$(tr '\n' ' ' <"$f")"
done
[[ -f $RES/restart.size ]] && echo "restart database size: $(cat "$RES/restart.size")"
exit 0
