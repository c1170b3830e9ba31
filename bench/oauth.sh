#!/usr/bin/env bash
# The OAuth token endpoint's access tokens per second (issue 15, design
# 0026), next to the signature algorithm's own ceiling on this machine:
# `keymint bench oauth` for ES256 and EdDSA against one `keymint server`
# (SQLite, permit-all policy). Loopback only; every run bounded.
#
#   bench/oauth.sh KEYMINT [DURATION=10s] [CONCURRENCY=16]
#
# Needs: curl.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 KEYMINT [DURATION] [CONCURRENCY]" >&2; exit 2; }
BIN=$(realpath "$1"); DUR=${2:-10s}; CONC=${3:-16}
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
D=$(mktemp -d /tmp/keymint-oauth-bench.XXXXXX)
PID=
cleanup() { [[ -n $PID ]] && { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }; rm -rf "$D"; }
trap cleanup EXIT
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$D/permit-all.cedar"
cat >"$D/keymint.toml" <<TOML
version = 1
[server]
listen = "127.0.0.1:$PORT"
dangerous_plaintext = true
[storage]
data_dir = "$D/data"
[policy]
paths = ["$D/permit-all.cedar"]
[issuer]
algorithms = ["ES256", "EdDSA"]

[[roles]]
name = "demo"
engine = "token"
scopes = ["demo"]
default_ttl = "1h"
max_ttl = "1h"

[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:call"]
default_ttl = "5m"
max_ttl = "1h"
[roles.jwt]
audience = "https://mcp.example/tools"
algorithm = "ES256"

[[roles]]
name = "files"
engine = "jwt"
scopes = ["files:read"]
default_ttl = "5m"
max_ttl = "1h"
[roles.jwt]
audience = "https://mcp.example/files"
algorithm = "EdDSA"
TOML
"$BIN" server --config "$D/keymint.toml" >"$D/keymint.log" 2>&1 &
PID=$!
for _ in $(seq 300); do curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/v1/health" 2>/dev/null && break; sleep 0.1; done
[[ -f $D/data/admin.token ]] || { echo "keymint did not start:" >&2; cat "$D/keymint.log" >&2; exit 1; }
for pair in "https://mcp.example/tools ES256" "https://mcp.example/files EdDSA"; do
  read -r res alg <<<"$pair"
  echo "== $alg ($res), $CONC in flight, $DUR (load $(cut -d' ' -f1-3 /proc/loadavg))"
  timeout 120 "$BIN" bench oauth --addr "http://127.0.0.1:$PORT" --token-file "$D/data/admin.token" \
    --resource "$res" --alg "$alg" --concurrency "$CONC" --duration "$DUR"
done
