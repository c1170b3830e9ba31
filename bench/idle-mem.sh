#!/usr/bin/env bash
# Resident memory of a fresh, idle `keymint dev`, for each binary given.
#
#   bench/idle-mem.sh BIN [BIN...]        # WAIT=8 (seconds idle), ROUNDS=3
#
# For each round and binary: a new data directory, `keymint dev` on a free
# loopback port, WAIT seconds without a request, then VmRSS, RssAnon and
# RssFile from /proc/PID/status, the thread count, and the five largest
# mappings by resident size from /proc/PID/smaps. DESIGN.md's target is
# "server resident memory, idle < 40 MB"; VmRSS is the figure compared.
# With DROP=1 (root) the page cache is dropped before each start, so that
# every binary's file-backed pages are read the same way (a binary the
# linker has just written sits in the page cache in large folios, which
# the kernel maps whole: several MB more RssFile than after a cold read).
set -euo pipefail
WAIT=${WAIT:-8}
ROUNDS=${ROUNDS:-3}
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
port=$((20000 + RANDOM % 20000))
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    dir=$(mktemp -d /tmp/km-idle.XXXXXX)
    if [ "${DROP:-0}" = 1 ]; then sync; echo 1 >/proc/sys/vm/drop_caches; fi
    port=$((port + 1))
    "$bin" dev --data-dir "$dir/data" --listen "127.0.0.1:$port" >"$dir/log" 2>&1 &
    pid=$!
    sleep "$WAIT"
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$bin exited early:" >&2; cat "$dir/log" >&2; exit 1
    fi
    awk -v b="$bin" -v r="$round" '
      /^VmRSS|^RssAnon|^RssFile|^Threads/ { v[$1] = $2 }
      END { printf "round %s %s: VmRSS %.1f MB (anon %.1f, file %.1f), %d threads\n",
            r, b, v["VmRSS:"]/1000, v["RssAnon:"]/1000, v["RssFile:"]/1000, v["Threads:"] }' \
      "/proc/$pid/status"
    awk '
      /^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "" ? "[anon]" : $6) }
      /^Rss:/ { rss[name] += $2 }
      END { for (n in rss) printf "    %8.1f MB  %s\n", rss[n]/1000, n }' \
      "/proc/$pid/smaps" | sort -rn | head -5
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
  done
done
