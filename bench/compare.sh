#!/usr/bin/env bash
# Side-by-side benchmark of two keymint binaries (issue 12: "the restructure
# must not make the hot paths slower"; issue 19: the proxy against nginx).
#
#   bench/compare.sh BEFORE AFTER          # two `keymint` executables
#
# In one invocation, interleaved (before, after, before, after, ... so that
# the noise of a shared machine hits both alike), every run bounded in time
# and on 127.0.0.1 only:
#
#   1. in-process issuance: `keymint bench broker --concurrency 64`, fresh
#      data directory each run;
#   2. HTTP issuance: `keymint dev` on a fresh data directory and
#      `keymint bench issue`, closed loop (64 in flight) and open loop
#      (2,000/s, for the p99); then the closed loop again with wrk as the
#      client (64 connections POSTing to one task's leases), whose own CPU
#      per request is a third of `bench issue`'s, with the CPU per issuance
#      of the server and of wrk;
#   3. egress proxy: nginx serving a static chat-completion JSON as the
#      upstream; `keymint server --config` (a proxy role with budgets on:
#      request, token and spend limits, with prices) in front of it; a plain
#      nginx reverse proxy in front of the same upstream as comparator; wrk
#      POSTing a chat-completions body, 32 connections for throughput and
#      1 connection for latency. Around each keymint and nginx 32-connection
#      run (ACCT=1, the default), bench/acct.py reads the CPU time (user,
#      system) and context switches of the proxy, of the upstream nginx and of
#      wrk, and a separate SYS_DUR-second run (3; 0 skips it) counts their
#      syscalls with `perf stat`: the report prints both per request.
#
# Then prints Markdown tables ready for docs/benchmarks.md, with the commands.
# Needs: nginx, wrk, curl, jq, python3 (apt-get install nginx-light wrk jq).
#
# Environment: ROUNDS (2), DUR seconds per throughput run (10), LAT_DUR
# seconds per 1-connection run (5), BEFORE_LABEL / AFTER_LABEL (the column
# names; default "before" / "after"), KEEP=1 keeps the work directory,
# ONLY="broker http proxy" to run a subset, TMPDIR=/dev/shm to keep the
# data directories on tmpfs (no disk in the commit path), TLS=1 to serve the
# proxy runs over TLS (keymint's `[server.tls]` and nginx's `listen ... ssl`
# with one self-signed P-256 certificate made by openssl; wrk keeps its
# connections, so this measures the records, not the handshakes),
# PROMPT_BYTES=N to send a chat body whose prompt is about N bytes of
# generated prose and code words instead of one short sentence (the proxy
# screens and reads every byte of it; nginx passes it on). About 2
# minutes per round.
set -euo pipefail

usage() { echo "usage: $0 BEFORE_BINARY AFTER_BINARY" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
BEFORE=$(realpath "$1"); AFTER=$(realpath "$2")
for b in "$BEFORE" "$AFTER"; do [[ -x $b ]] || { echo "not an executable: $b" >&2; exit 2; }; done
for t in nginx wrk curl jq python3 timeout; do
  command -v "$t" >/dev/null || { echo "missing: $t (apt-get install nginx-light wrk jq)" >&2; exit 2; }
done

ROUNDS=${ROUNDS:-2}; DUR=${DUR:-10}; LAT_DUR=${LAT_DUR:-5}
ONLY=${ONLY:-"broker http proxy"}
ACCT=${ACCT:-1}; SYS_DUR=${SYS_DUR:-3}; TLS=${TLS:-0}; PROMPT_BYTES=${PROMPT_BYTES:-0}
if [[ $SYS_DUR -gt 0 ]] && ! perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
  echo "perf cannot count syscalls here (apt-get install linux-perf; perf_event_paranoid): SYS_DUR=0" >&2
  SYS_DUR=0
fi
BEFORE_LABEL=${BEFORE_LABEL:-before}; AFTER_LABEL=${AFTER_LABEL:-after}
HERE=$(cd "$(dirname "$0")" && pwd)
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
WORK=$(mktemp -d "${TMPDIR:-/tmp}/keymint-compare.XXXXXX")
chmod 755 "$WORK"            # nginx workers run as nobody when started by root
RES=$WORK/results; mkdir -p "$RES"
PIDS=()

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

stop_pid() {                 # stop one process we started, by its pid
  local pid=$1 i keep=()
  for i in "${PIDS[@]}"; do [[ $i == "$pid" ]] || keep+=("$i"); done
  PIDS=("${keep[@]}")
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  if [[ ${KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_http() {                # wait (at most 30 s) until URL answers
  local i
  for ((i = 0; i < 300; i++)); do
    curl -fsS "${CURL_CA[@]}" -o /dev/null --max-time 1 "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no answer from $1 within 30 s" >&2; return 1
}
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# TLS=1: the proxy runs' front (keymint, nginx) over TLS with this certificate.
SCHEME=http; CURL_CA=()
if [[ $TLS == 1 ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -keyout "$WORK/tls.key" -out "$WORK/tls.pem" -subj /CN=localhost \
    -addext subjectAltName=IP:127.0.0.1 -addext basicConstraints=critical,CA:FALSE 2>/dev/null
  chmod 644 "$WORK/tls.key"  # nginx's workers (nobody) read it
  SCHEME=https; CURL_CA=(--cacert "$WORK/tls.pem")
fi
bin_of() { if [[ $1 == before ]]; then echo "$BEFORE"; else echo "$AFTER"; fi; }

# --- upstream and comparator: nginx -------------------------------------------
CHAT_JSON='{"id":"chatcmpl-bench","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}'
CHAT_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
if [[ $PROMPT_BYTES -gt 0 ]]; then
  # A prompt of about PROMPT_BYTES of generated prose and code words (the
  # same for every run; no quote, backslash or secret in it), as agents send.
  PROMPT=$(python3 - "$PROMPT_BYTES" <<'PY'
import sys
words = ("the model should answer with a short summary of this function fn let mut return self "
         "config value key token secret password user request response error handle async await "
         "import from def class if else for in list map string please explain why test fails when "
         "input is empty and database query select where id = { } ( ) ; -> :: README.md 42 user_id").split()
n, x, out = int(sys.argv[1]), 0x9E3779B97F4A7C15, []
size = 0
while size < n:
    x ^= (x << 13) & (2**64 - 1); x ^= x >> 7; x ^= (x << 17) & (2**64 - 1)
    w = words[x % len(words)]
    out.append(w); size += len(w) + 1
print(" ".join(out))
PY
)
  CHAT_BODY="{\"model\":\"gpt-4o-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"$PROMPT\"}],\"max_tokens\":16}"
fi

start_nginx() {              # start_nginx NAME SERVER_BLOCK  (prints nothing; pid in PIDS)
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

# --- parsers for wrk ------------------------------------------------------------
# wrk_run NAME URL CONNECTIONS SECONDS LUA [LABEL=PID ...] -> writes $RES/NAME.wrk;
# with processes named (and ACCT=1), their CPU time and context switches over
# the run, and wrk's own CPU time, go to $RES/NAME.cpu (bench/acct.py).
wrk_run() {
  local name=$1 url=$2 conns=$3 secs=$4 lua=$5 threads=2 rc
  shift 5
  [[ $conns -lt 2 ]] && threads=1
  [[ $ACCT == 1 ]] || set --
  log "wrk $name: $conns connection(s), ${secs}s (load $(loadavg))"
  (($#)) && python3 "$HERE/acct.py" snap "$RES/$name.snap0" "$@"
  rc=0
  (
    timeout -k 5 $((secs + 30)) wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s "$lua" "$url" >"$RES/$name.wrk" 2>&1
    r=$?; times >"$RES/$name.times"; exit $r
  ) || rc=$?
  ((rc == 0)) || log "wrk $name failed: $(tail -1 "$RES/$name.wrk")"
  if (($#)); then
    python3 "$HERE/acct.py" snap "$RES/$name.snap1" "$@"
    python3 "$HERE/acct.py" diff "$RES/$name.snap0" "$RES/$name.snap1" "$RES/$name.wrk" "$RES/$name.times" "$RES/$name.cpu"
  fi
}
# The processes and children of LABEL=PID, as a comma list for perf.
pid_list() {
  local p=${1#*=}
  { echo "$p"; pgrep -P "$p" || true; } | paste -sd,
}
# sys_run NAME URL LUA LABEL=PID ...: a separate SYS_DUR-second run, 32
# connections, with `perf stat` counting the syscalls (in all and the
# common ones by name), context switches and migrations of each labelled
# process group and of wrk; CPU as in wrk_run. -> $RES/NAME.cpu
PERF_EVENTS=raw_syscalls:sys_enter,context-switches,cpu-migrations
for s in read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait epoll_ctl futex sched_yield accept4 pwrite64 fdatasync; do
  PERF_EVENTS+=,syscalls:sys_enter_$s
done
sys_run() {
  local name=$1 url=$2 lua=$3 spec perfs=() ppids=() p label
  shift 3
  [[ $ACCT == 1 && $SYS_DUR -gt 0 ]] || return 0
  log "wrk $name: 32 connections, ${SYS_DUR}s under perf stat (load $(loadavg))"
  python3 "$HERE/acct.py" snap "$RES/$name.snap0" "$@"
  for spec in "$@"; do
    label=${spec%%=*}
    perf stat -x, -o "$RES/$name.$label.perf" -e "$PERF_EVENTS" -p "$(pid_list "$spec")" >/dev/null 2>&1 &
    ppids+=($!); PIDS+=($!); perfs+=("$RES/$name.$label.perf")
  done
  sleep 0.5                  # perf attached
  (
    timeout -k 5 $((SYS_DUR + 30)) perf stat -x, -o "$RES/$name.wrk.perf" -e "$PERF_EVENTS" -- \
      wrk -t2 -c32 -d"${SYS_DUR}s" -s "$lua" "$url" >"$RES/$name.wrk" 2>&1
    r=$?; times >"$RES/$name.times"; exit $r
  ) || log "wrk $name failed: $(tail -1 "$RES/$name.wrk")"
  for p in "${ppids[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for p in "${ppids[@]}"; do wait "$p" 2>/dev/null || true; stop_pid "$p"; done
  python3 "$HERE/acct.py" snap "$RES/$name.snap1" "$@"
  python3 "$HERE/acct.py" diff "$RES/$name.snap0" "$RES/$name.snap1" "$RES/$name.wrk" "$RES/$name.times" \
    "$RES/$name.cpu" "${perfs[@]}" "$RES/$name.wrk.perf"
}
write_lua() {                # write_lua FILE [TOKEN]
  {
    echo 'wrk.method = "POST"'
    printf "wrk.body = '%s'\n" "$CHAT_BODY"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    if [[ -n ${2:-} ]]; then printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$2"; fi
  } >"$1"
  chmod 600 "$1"
}

# --- 1. in-process issuance -----------------------------------------------------
run_broker() {               # run_broker LABEL ROUND
  local bin d=$WORK/bb-$1-$2
  bin=$(bin_of "$1")
  log "broker $1 round $2 (load $(loadavg))"
  timeout -k 5 $((DUR + 60)) "$bin" bench broker --concurrency 64 --duration "${DUR}s" --data-dir "$d" \
    >"$RES/broker.$1.$2.out" 2>"$RES/broker.$1.$2.err" || log "broker $1 failed: $(tail -1 "$RES/broker.$1.$2.err")"
  rm -rf "$d"
}

# --- 2. HTTP issuance -----------------------------------------------------------
start_dev() {                # start_dev LABEL DIR PORT; sets DEV_PID
  "$(bin_of "$1")" dev --data-dir "$2" --listen "127.0.0.1:$3" >"$2.log" 2>&1 &
  DEV_PID=$!
  PIDS+=("$DEV_PID")
  wait_http "http://127.0.0.1:$3/v1/health"
}
run_http() {                 # run_http LABEL ROUND KIND(closed|open)
  local bin port d=$WORK/dev-$1-$2-$3 args
  bin=$(bin_of "$1"); port=$(free_port)
  if [[ $3 == closed ]]; then args=(--concurrency 64); else args=(--concurrency 32 --rate 2000); fi
  start_dev "$1" "$d" "$port"
  log "http $3 $1 round $2 (load $(loadavg))"
  KEYMINT_ADDR=http://127.0.0.1:$port KEYMINT_TOKEN=$(cat "$d/admin.token") \
    timeout -k 5 $((DUR + 60)) "$bin" bench issue "${args[@]}" --duration "${DUR}s" \
    >"$RES/http-$3.$1.$2.out" 2>"$RES/http-$3.$1.$2.err" || log "http $3 $1 failed: $(tail -1 "$RES/http-$3.$1.$2.err")"
  stop_pid "$DEV_PID"
  rm -rf "$d" "$d.log"
}
# The same closed loop with wrk as the client (64 connections, one task,
# `POST /v1/tasks/ID/leases` with the admin token), so that the load
# client's own cost on the shared cores is wrk's rather than
# `keymint bench issue`'s; CPU per issuance of the server and of wrk go
# to $RES/http-wrk.LABEL.ROUND.cpu.
run_http_wrk() {             # run_http_wrk LABEL ROUND
  local port d=$WORK/dev-$1-$2-wrk token task
  port=$(free_port)
  start_dev "$1" "$d" "$port"
  token=$(cat "$d/admin.token")
  task=$(curl -fsS -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"workload":"bench","role":"demo","ttl_secs":3600,"intent":"bench/compare.sh issuance with wrk"}' \
    "http://127.0.0.1:$port/v1/tasks" | jq -r .id)
  {
    echo 'wrk.method = "POST"'
    echo "wrk.body = '{}'"
    echo 'wrk.headers["Content-Type"] = "application/json"'
    printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$token"
  } >"$d/issue.lua"
  chmod 600 "$d/issue.lua"
  log "http wrk $1 round $2 (load $(loadavg))"
  wrk_run "http-wrk.$1.$2" "http://127.0.0.1:$port/v1/tasks/$task/leases" 64 "$DUR" "$d/issue.lua" \
    "keymint=$DEV_PID"
  stop_pid "$DEV_PID"
  rm -rf "$d" "$d.log"
}

# --- 3. proxy -------------------------------------------------------------------
UP_PORT=; FRONT_PORT=; UP_PID=; FRONT_PID=
setup_nginx() {
  UP_PORT=$(free_port)
  start_nginx upstream "  server {
    listen 127.0.0.1:$UP_PORT;
    location = /v1/chat/completions { default_type application/json; return 200 '$CHAT_JSON'; }
    location / { return 404; }
  }"
  UP_PID=${PIDS[-1]}
  wait_http "http://127.0.0.1:$UP_PORT/v1/chat/completions"
  FRONT_PORT=$(free_port)
  local listen="listen 127.0.0.1:$FRONT_PORT;"
  [[ $TLS == 1 ]] && listen="listen 127.0.0.1:$FRONT_PORT ssl;
    ssl_certificate $WORK/tls.pem;
    ssl_certificate_key $WORK/tls.key;"
  start_nginx front "  upstream chat { server 127.0.0.1:$UP_PORT; keepalive 64; }
  server {
    $listen
    location / {
      proxy_pass http://chat;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
    }
  }"
  FRONT_PID=${PIDS[-1]}
  wait_http "$SCHEME://127.0.0.1:$FRONT_PORT/v1/chat/completions"
  write_lua "$WORK/plain.lua" "sk-not-checked-by-nginx"
}

server_config() {            # server_config DIR PORT
  local front="dangerous_plaintext = true"
  [[ $TLS == 1 ]] && front="[server.tls]
cert_file = \"$WORK/tls.pem\"
key_file = \"$WORK/tls.key\""
  cat <<EOF
version = 1
[server]
listen = "127.0.0.1:$2"
$front
[storage]
data_dir = "$1/data"
[policy]
paths = ["$1/permit-all.cedar"]

[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$UP_PORT/v1"
timeout = "10s"

[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

# Budgets on, so that the metered path (reserve, settle) is measured; far
# above what a run can use.
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
}

run_proxy() {                # run_proxy LABEL ROUND
  local bin port d=$WORK/srv-$1-$2 pid addr
  bin=$(bin_of "$1"); port=$(free_port); addr=$SCHEME://127.0.0.1:$port
  mkdir -p "$d"
  printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$d/permit-all.cedar"
  server_config "$d" "$port" >"$d/keymint.toml"
  cp "$d/keymint.toml" "$RES/keymint-proxy.toml"
  log "proxy $1 round $2: keymint server"
  "$bin" server --config "$d/keymint.toml" >"$d/server.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  proxy_measure "$1" "$2" "$bin" "$addr" "$d" "$pid" || log "proxy $1 round $2 failed: $(tail -3 "$d/server.log")"
  stop_pid "$pid"
  rm -rf "$d"
}
proxy_measure() {            # proxy_measure LABEL ROUND BIN ADDR DIR PID
  local bin=$3 addr=$4 d=$5 pid=$6 tok code
  wait_http "$addr/v1/health" || return 1
  # An obviously fake provider key: the upstream (nginx) never checks it.
  printf 'sk-fake-bench-%s\n' "$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')" >"$d/openai.key"
  local ca=()                 # the CLI's trust: the test certificate over TLS
  [[ $TLS == 1 ]] && ca=(--ca-file "$WORK/tls.pem")
  KEYMINT_ADDR=$addr KEYMINT_TOKEN=$(cat "$d/data/admin.token") "$bin" upstream set openai "${ca[@]}" --key-file "$d/openai.key" >/dev/null ||
    return 1
  tok=$(KEYMINT_ADDR=$addr KEYMINT_TOKEN=$(cat "$d/data/admin.token") \
    "$bin" task start "${ca[@]}" --role gpt --workload bench --ttl 1h --issue -o json | jq -r '.credential.token')
  [[ $tok == kmt_* ]] || { echo "no kmt_ token issued" >&2; return 1; }
  write_lua "$d/post.lua" "$tok"
  code=$(curl -sS "${CURL_CA[@]}" -o "$d/probe.json" -w '%{http_code}' -H "Authorization: Bearer $tok" \
    -H 'Content-Type: application/json' --data "$CHAT_BODY" "$addr/proxy/openai/chat/completions")
  [[ $code == 200 ]] || { echo "probe through the proxy: HTTP $code: $(head -c 300 "$d/probe.json")" >&2; return 1; }
  wrk_run "proxy-tput.$1.$2" "$addr/proxy/openai/chat/completions" 32 "$DUR" "$d/post.lua" \
    "keymint=$pid" "upstream=$UP_PID"
  sys_run "proxy-sys.$1.$2" "$addr/proxy/openai/chat/completions" "$d/post.lua" "keymint=$pid" "upstream=$UP_PID"
  wrk_run "proxy-lat.$1.$2" "$addr/proxy/openai/chat/completions" 1 "$LAT_DUR" "$d/post.lua"
  # What the proxy metered: requests and spend (proves budgets were on the path).
  curl -fsS "${CURL_CA[@]}" --max-time 5 "$addr/metrics" | grep -E '^keymint_proxy_(requests|spend_nanodollars|denials)_total' \
    >"$RES/proxy-metrics.$1.$2.txt" || true
}

run_nginx() {                # run_nginx ROUND
  wrk_run "proxy-tput.nginx.$1" "$SCHEME://127.0.0.1:$FRONT_PORT/v1/chat/completions" 32 "$DUR" "$WORK/plain.lua" \
    "nginx=$FRONT_PID" "upstream=$UP_PID"
  sys_run "proxy-sys.nginx.$1" "$SCHEME://127.0.0.1:$FRONT_PORT/v1/chat/completions" "$WORK/plain.lua" \
    "nginx=$FRONT_PID" "upstream=$UP_PID"
  wrk_run "proxy-lat.nginx.$1" "$SCHEME://127.0.0.1:$FRONT_PORT/v1/chat/completions" 1 "$LAT_DUR" "$WORK/plain.lua"
  wrk_run "proxy-lat.direct.$1" "http://127.0.0.1:$UP_PORT/v1/chat/completions" 1 "$LAT_DUR" "$WORK/plain.lua"
}

# --- the run --------------------------------------------------------------------
START=$(date +%s)
{
  echo "date=$(date -u +%FT%TZ)"
  echo "before=$BEFORE"; echo "before_label=$BEFORE_LABEL"; echo "before_version=$("$BEFORE" --version 2>&1 | head -1)"
  echo "after=$AFTER"; echo "after_label=$AFTER_LABEL"; echo "after_version=$("$AFTER" --version 2>&1 | head -1)"
  echo "rounds=$ROUNDS"; echo "dur=$DUR"; echo "lat_dur=$LAT_DUR"; echo "tls=$TLS"
  echo "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')"; echo "wrk=$(wrk -v 2>&1 | head -1 | awk '{print $2}')"
  echo "cpus=$(nproc)"; echo "load_start=$(loadavg)"
  if [[ $PROMPT_BYTES -gt 0 ]]; then
    echo "chat_body=${CHAT_BODY:0:100}… (${#CHAT_BODY} bytes, PROMPT_BYTES=$PROMPT_BYTES)"
  else
    echo "chat_body=$CHAT_BODY"
  fi
  echo "chat_json=$CHAT_JSON"
} >"$RES/meta.txt"

[[ $ONLY == *proxy* ]] && setup_nginx
for ((r = 1; r <= ROUNDS; r++)); do
  if [[ $ONLY == *broker* ]]; then for l in before after; do run_broker "$l" "$r"; done; fi
  if [[ $ONLY == *http* ]]; then
    for l in before after; do run_http "$l" "$r" closed; done
    for l in before after; do run_http "$l" "$r" open; done
    for l in before after; do run_http_wrk "$l" "$r"; done
  fi
  if [[ $ONLY == *proxy* ]]; then
    run_nginx "$r"
    for l in before after; do run_proxy "$l" "$r"; done
  fi
done
{ echo "load_end=$(loadavg)"; echo "seconds=$(($(date +%s) - START))"; } >>"$RES/meta.txt"
python3 "$HERE/report.py" "$RES"
[[ ${KEEP:-0} == 1 ]] && log "raw outputs in $RES"
exit 0
