#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: a figure that the
# load of a shared machine does not move (docs/design/0029-proxy-hot-path.md).
#
#   bench/proxy-profile.sh KEYMINT [SECONDS] [CONNECTIONS]   # defaults 20 and 4
#
# Starts nginx (a static chat completion, as in bench/compare.sh) as the
# upstream and `keymint server` under `valgrind --tool=callgrind` with
# instrumentation off, sets the upstream's key, issues a task token, warms
# up with wrk for 3 s, then switches instrumentation on for SECONDS of wrk
# (bounded, 127.0.0.1 only) and off again. Prints the instructions counted
# (every thread of the server: HTTP, proxy, store writer and syncer) and
# the requests the proxy's /metrics counted meanwhile, and their ratio.
# The callgrind file is kept for `callgrind_annotate --inclusive=yes FILE`.
#
# TOOL=perf runs the server natively instead and samples it with
# `perf record -g` (frame pointers are not kept, so `--call-graph dwarf`)
# for the same SECONDS of wrk; it prints the hottest symbols, self time,
# and keeps perf.data for `perf report -i FILE`. Samples are wall-clock
# CPU on this machine: they say where the time goes, not how much.
# CALLGRAPH=fp follows the kernel's own frames (what a wake-up or a
# context switch was called from) where dwarf stops at the syscall.
# Needs: valgrind (or perf), nginx, wrk, curl, jq, python3.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 KEYMINT [SECONDS] [CONNECTIONS]" >&2; exit 2; }
BIN=$(realpath "$1"); SECS=${2:-20}; CONNS=${3:-4}
TOOL=${TOOL:-callgrind}
case $TOOL in
  callgrind) NEED="valgrind callgrind_control" ;;
  perf) NEED=perf ;;
  *) echo "TOOL must be callgrind or perf" >&2; exit 2 ;;
esac
for t in $NEED nginx wrk curl jq python3 timeout; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
D=$(mktemp -d /tmp/keymint-profile.XXXXXX); chmod 755 "$D"; mkdir -p "$D/tmp"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
UP=$(port); KM=$(port)
CHAT_JSON='{"id":"chatcmpl-bench","object":"chat.completion","created":1760000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":14,"completion_tokens":2,"total_tokens":16}}'
CHAT_BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
cat >"$D/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $D/nginx.pid; error_log $D/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $D/tmp/b; proxy_temp_path $D/tmp/p; fastcgi_temp_path $D/tmp/f;
  uwsgi_temp_path $D/tmp/u; scgi_temp_path $D/tmp/s;
  server { listen 127.0.0.1:$UP;
    location = /v1/chat/completions { default_type application/json; return 200 '$CHAT_JSON'; } }
}
EOF
nginx -p "$D" -c "$D/nginx.conf" -e "$D/nginx-error.log" >/dev/null 2>&1 &
PIDS+=($!)
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$D/permit-all.cedar"
cat >"$D/keymint.toml" <<EOF
version = 1
[server]
listen = "127.0.0.1:$KM"
dangerous_plaintext = true
[storage]
data_dir = "$D/data"
[policy]
paths = ["$D/permit-all.cedar"]
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:$UP/v1"
timeout = "10s"
[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60
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
if [[ $TOOL == perf ]]; then
  "$BIN" server --config "$D/keymint.toml" >"$D/server.log" 2>&1 &
else
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$D/callgrind.out" \
    "$BIN" server --config "$D/keymint.toml" >"$D/server.log" 2>&1 &
fi
VG=$!; PIDS+=("$VG")
for ((i = 0; i < 240; i++)); do curl -fs -o /dev/null "http://127.0.0.1:$KM/v1/health" && break; sleep 0.5; done
export KEYMINT_ADDR=http://127.0.0.1:$KM
KEYMINT_TOKEN=$(cat "$D/data/admin.token"); export KEYMINT_TOKEN
printf 'sk-fake-bench-%s\n' "$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')" >"$D/openai.key"
"$BIN" upstream set openai --key-file "$D/openai.key" >/dev/null
TOK=
for ((i = 0; i < 10; i++)); do   # under valgrind a policy decision can time out: retry
  TOK=$("$BIN" task start --role gpt --workload bench --ttl 1h --issue -o json 2>/dev/null | jq -r '.credential.token') || true
  [[ $TOK == kmt_* ]] && break
  sleep 1
done
[[ $TOK == kmt_* ]] || { echo "no kmt_ token issued" >&2; exit 1; }
{
  echo 'wrk.method = "POST"'
  printf "wrk.body = '%s'\n" "$CHAT_BODY"
  echo 'wrk.headers["Content-Type"] = "application/json"'
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$TOK"
} >"$D/post.lua"
URL=http://127.0.0.1:$KM/proxy/openai/chat/completions
count() { curl -fsS "http://127.0.0.1:$KM/metrics" | awk '/^keymint_proxy_requests_total/ {s += $2} END {print s + 0}'; }
timeout 60 wrk -t1 -c"$CONNS" -d3s -s "$D/post.lua" "$URL" >/dev/null
if [[ $TOOL == perf ]]; then
  perf record -q -F 1999 --call-graph "${CALLGRAPH:-dwarf,16384}" -p "$VG" -o "$D/perf.data" -- sleep "$SECS" >/dev/null 2>&1 &
  PERF=$!
  timeout $((SECS + 60)) wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$D/post.lua" "$URL" >"$D/wrk.txt"
  wait "$PERF" || true
  echo "binary: $BIN ($("$BIN" --version 2>/dev/null | head -1))"
  grep -E 'Requests/sec|Non-2xx' "$D/wrk.txt" || true
  perf report -i "$D/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.7 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -60
  echo "perf file: $D/perf.data"
  exit 0
fi
before=$(count)
callgrind_control -i on "$VG" >/dev/null
timeout $((SECS + 60)) wrk -t1 -c"$CONNS" -d"${SECS}s" -s "$D/post.lua" "$URL" >"$D/wrk.txt"
callgrind_control -i off "$VG" >/dev/null
after=$(count)
callgrind_control -d "$VG" >/dev/null
sleep 1
non2xx=$(awk '/Non-2xx/ {print $NF}' "$D/wrk.txt"); non2xx=${non2xx:-0}
OUT=$(ls -S "$D"/callgrind.out.* | head -1)
IR=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
N=$((after - before))
echo "binary: $BIN ($("$BIN" --version 2>/dev/null | head -1))"
echo "requests profiled: $N (non-2xx answers: $non2xx)"
echo "instructions: $IR"
echo "instructions per request: $((IR / (N > 0 ? N : 1)))"
echo "callgrind file: $OUT"
