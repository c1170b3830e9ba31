#!/usr/bin/env bash
# The MCP route's added latency (issue 15, docs/design/0031): sequential
# `tools/call` of `add` in one MCP session, sent by one Python client (the
# standard library's http.client, keep-alive, TCP_NODELAY) straight to the official `mcp` SDK's server and through
# keymint's /mcp/tools route (token signature and audience, the lease through
# the cache, the session binding, the Cedar `call_tool` decision, one durable
# `mcp.tool_call` audit event, forwarding with keymint's own upstream
# credential). The two paths alternate in ROUNDS blocks so that a noisy
# machine disturbs both alike. Loopback only; every step bounded.
#
#   bench/mcp-route.sh KEYMINT [N=600] [ROUNDS=6]
#
# Needs: python3 with mcp (2.x), curl, jq.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 KEYMINT [N] [ROUNDS]" >&2; exit 2; }
BIN=$(realpath "$1"); N=${2:-600}; ROUNDS=${3:-6}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
for t in python3 curl jq timeout; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
unset KEYMINT_ADDR KEYMINT_TOKEN KEYMINT_CA_FILE KEYMINT_CLIENT_CERT KEYMINT_CLIENT_KEY
D=$(mktemp -d /tmp/keymint-mcp-bench.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The MCP server of the integration tests (prints {"port": N} once it listens).
# JSON answers: its SSE answers end ~40 ms late, a floor on both paths.
MCP_JSON_RESPONSE=${MCP_JSON_RESPONSE:-1} python3 "$ROOT/crates/keymint/tests/mcp/server.py" "$D/headers.jsonl" >"$D/mcp.out" 2>"$D/mcp.err" &
PIDS+=($!)
for _ in $(seq 300); do [[ -s $D/mcp.out ]] && break; sleep 0.1; done
MCP_PORT=$(jq -r .port <"$D/mcp.out")

KM=$(port)
RESOURCE="https://keymint.bench/mcp/tools"
printf '@id("bench-permit-all")\npermit(principal, action, resource);\n' >"$D/permit-all.cedar"
cat >"$D/keymint.toml" <<TOML
version = 1
[server]
listen = "127.0.0.1:$KM"
dangerous_plaintext = true
[storage]
data_dir = "$D/data"
[policy]
paths = ["$D/permit-all.cedar"]
[issuer]
algorithms = ["ES256"]

[[roles]]
name = "agent"
engine = "token"
scopes = ["agent"]
default_ttl = "1h"
max_ttl = "1h"

[[roles]]
name = "tools"
engine = "jwt"
scopes = ["tools:call"]
default_ttl = "30m"
max_ttl = "1h"
[roles.jwt]
audience = "$RESOURCE"

[[mcp.servers]]
name = "tools"
upstream = "http://127.0.0.1:$MCP_PORT/mcp"
resource = "$RESOURCE"
required_scopes = ["tools:call"]
credential = "bearer"
TOML
"$BIN" server --config "$D/keymint.toml" >"$D/keymint.log" 2>&1 &
PIDS+=($!)
ADDR=http://127.0.0.1:$KM
for _ in $(seq 300); do curl -fsS -o /dev/null --max-time 1 "$ADDR/v1/health" 2>/dev/null && break; sleep 0.1; done
ADMIN=$(cat "$D/data/admin.token")
curl -fsS -o /dev/null -X POST -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"token": "upstream-bench-credential-not-a-secret"}' "$ADDR/v1/mcp/tools/credential"
KMT=$(KEYMINT_ADDR=$ADDR KEYMINT_TOKEN=$ADMIN "$BIN" task start --role agent --workload bench \
  --ttl 1h --issue -o json | jq -r '.credential.token')
ACCESS=$(curl -fsS "$ADDR/oauth/token" \
  --data-urlencode grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
  --data-urlencode "subject_token=$KMT" \
  --data-urlencode subject_token_type=urn:ietf:params:oauth:token-type:access_token \
  --data-urlencode "resource=$RESOURCE" | jq -r .access_token)

timeout 600 python3 - "$MCP_PORT" "$ADDR" "$ACCESS" "$N" "$ROUNDS" <<'PY'
import http.client, json, socket, sys, time
from urllib.parse import urlsplit

mcp_port, addr, access, n, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "keymint-bench", "version": "0"}}})
CALL = json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": 1, "b": 2}}})

class Session:
    """One keep-alive connection (TCP_NODELAY) and one MCP session."""
    def __init__(self, url, token):
        u = urlsplit(url)
        self.path = u.path
        self.c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        self.c.connect()
        self.c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.h = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
        if token:
            self.h["authorization"] = "Bearer " + token
        status, headers, _ = self.post(INIT)
        assert status == 200, status
        self.h["mcp-session-id"] = headers["mcp-session-id"]
        self.h["mcp-protocol-version"] = "2025-06-18"
        status, _, _ = self.post(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        assert status == 202, status

    def post(self, body):
        self.c.request("POST", self.path, body=body, headers=self.h)
        r = self.c.getresponse()
        text = r.read().decode()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, text

paths = {"direct": (f"http://127.0.0.1:{mcp_port}/mcp", None),
         "keymint": (f"{addr}/mcp/tools", access)}
clients = {k: Session(u, t) for k, (u, t) in paths.items()}
took = {k: [] for k in paths}
for k, (u, _) in paths.items():          # warm-up
    for _ in range(20):
        assert '"3"' in clients[k].post(CALL)[2]
per = max(1, n // rounds)
for _ in range(rounds):
    for k, (u, _) in paths.items():
        c = clients[k]
        for _ in range(per):
            t = time.perf_counter()
            status, _, text = c.post(CALL)
            d = time.perf_counter() - t
            assert status == 200 and '"3"' in text, text
            took[k].append(d * 1e6)

def q(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))]

res = {}
for k, v in took.items():
    res[k] = (q(v, 0.5), q(v, 0.9), q(v, 0.99))
    print(f"{k}: n={len(v)} p50={res[k][0]:.0f}us p90={res[k][1]:.0f}us p99={res[k][2]:.0f}us")
print(f"added by keymint: p50 +{res['keymint'][0]-res['direct'][0]:.0f}us "
      f"p90 +{res['keymint'][1]-res['direct'][1]:.0f}us p99 +{res['keymint'][2]-res['direct'][2]:.0f}us")
PY
# The agent's token must never reach the MCP server.
if grep -q "$ACCESS" "$D/headers.jsonl"; then echo "the agent's token reached the MCP server" >&2; exit 1; fi
echo "calls audited: $(curl -fsS -H "Authorization: Bearer $ADMIN" "$ADDR/v1/audit?limit=1000" | jq '[.items[] | select(.kind == "mcp.tool_call")] | length')"
