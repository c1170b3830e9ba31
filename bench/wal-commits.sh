#!/usr/bin/env bash
# What the SQLite writer's commits write, under issuance load on disk.
#
#   bench/wal-commits.sh KEYMINT [SECONDS]
#
# Starts `keymint dev` on a fresh data directory (under TMPDIR, /tmp by
# default: a disk, not tmpfs), issues leases with wrk (64 connections, one
# task, POST /v1/tasks/ID/leases) for SECONDS (4), reads the bytes the
# process wrote to the disk and the leases it issued, kills it with -9 (so
# the WAL is left as it was), and prints, from the WAL's valid frames: the
# frames per commit, and the pages per commit of each b-tree (SQLite's
# `dbstat`, through Python's sqlite3). docs/design/0036, "Sixth pass".
# Needs: wrk, curl, jq, python3. Loopback only; bounded in time.
set -euo pipefail
BIN=$(realpath "$1"); SECS=${2:-4}
d=$(mktemp -d "${TMPDIR:-/tmp}/keymint-wal.XXXXXX")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" dev --data-dir "$d/data" --listen "127.0.0.1:$port" >"$d/log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -rf "$d"' EXIT
for _ in $(seq 150); do curl -fs "http://127.0.0.1:$port/v1/health" >/dev/null && break; sleep 0.2; done
tok=$(cat "$d/data/admin.token")
task=$(curl -fsS -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' \
  -d '{"workload":"bench","role":"demo","ttl_secs":3600,"intent":"bench/wal-commits.sh"}' \
  "http://127.0.0.1:$port/v1/tasks" | jq -r .id)
{ echo 'wrk.method = "POST"'; echo "wrk.body = '{}'"; echo 'wrk.headers["Content-Type"] = "application/json"'
  printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$tok"; } >"$d/issue.lua"
chmod 600 "$d/issue.lua"
timeout -k 5 $((SECS + 30)) wrk -t1 -c64 -d"${SECS}s" -s "$d/issue.lua" \
  "http://127.0.0.1:$port/v1/tasks/$task/leases" | grep -E 'Requests/sec|99%' || true
issued=$(curl -fsS -H "Authorization: Bearer $tok" "http://127.0.0.1:$port/metrics" |
  awk '/^keymint_leases_issued_total/ {print $2; exit}')
written=$(awk '/^write_bytes/ {print $2}' "/proc/$pid/io")
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "issued $issued; written to disk $written bytes: $((written / ${issued:-1})) bytes per issuance"
python3 - "$d/data/keymint.db" <<'PY'
import collections, shutil, sqlite3, struct, sys, tempfile, os
db = sys.argv[1]
wal = open(db + "-wal", "rb").read()
_, _, psz, _, s1, s2, _, _ = struct.unpack(">8I", wal[:32])
off, commits, cur, frames = 32, [], set(), 0
while off + 24 + psz <= len(wal):
    pg, dbsz, f1, f2, _, _ = struct.unpack(">6I", wal[off:off + 24])
    if (f1, f2) != (s1, s2):
        break
    frames += 1
    cur.add(pg)
    if dbsz:
        commits.append(cur)
        cur = set()
    off += 24 + psz
tmp = tempfile.mkdtemp()
for ext in ("", "-wal"):
    shutil.copy(db + ext, os.path.join(tmp, "k.db" + ext))
c = sqlite3.connect(os.path.join(tmp, "k.db"))
owner = dict((p, n) for n, p in c.execute("SELECT name, pageno FROM dbstat"))
n = max(len(commits), 1)
print(f"WAL: {frames} valid frames of {psz} bytes, {len(commits)} commits, {frames / n:.1f} frames per commit")
tally = collections.Counter(owner.get(p, "?") for s in commits for p in s)
for name, k in tally.most_common(12):
    print(f"  {k / n:6.1f} pages per commit  {name}")
shutil.rmtree(tmp)
PY
