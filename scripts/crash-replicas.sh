#!/usr/bin/env bash
# Kills keymint replicas at random under concurrent issuance and proxying:
# three `keymint server` processes on one PostgreSQL database (127.0.0.1:5432,
# user postgres, database test), ITERATIONS rounds, one kill -9 per round
# (docs/design/0022-duties-and-replicas.md). Fails unless every acknowledged
# lease is in the store, no budget is overspent, every answered proxied
# request is in the audit trail and every replica's audit file verifies.
# Then measures the duty take-over after a kill -9 of the holder RUNS times.
#
#   scripts/crash-replicas.sh [ITERATIONS] [RUNS]     (defaults: 30, 5)
set -euo pipefail
cd "$(dirname "$0")/.."
iterations="${1:-30}"
runs="${2:-5}"
export CI=true CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo test -p keymint --test it --no-run >/dev/null 2>&1 || cargo test -p keymint --test it --no-run

echo "== random kills: $iterations iterations"
status=0
out=$(KEYMINT_CRASH_ITERATIONS="$iterations" cargo test -q -p keymint --test it \
  failover::random_kills_under_issuance_and_proxying_lose_nothing -- --exact --nocapture 2>&1) || status=$?
grep -E "kills;|test result|panicked|assert" <<<"$out" || true
if [[ $status -ne 0 ]]; then echo "$out" | tail -30; exit "$status"; fi

echo "== duty take-over after kill -9 of the holder: $runs runs"
times=()
for _ in $(seq "$runs"); do
  out=$(cargo test -q -p keymint --test it \
    failover::kill_9_of_the_duty_holder_hands_the_duties_over -- --exact --nocapture 2>&1)
  t=$(grep -oE "in [0-9.]+(ms|s)$" <<<"$out" | head -1 | awk '{print $2}')
  if [[ -z "$t" ]]; then echo "$out" | tail -20; exit 1; fi
  echo "take-over: $t"
  times+=("$t")
done
printf '%s\n' "${times[@]}" | awk '
  { v=$1; if (v ~ /ms$/) { sub(/ms$/,"",v); v=v/1000 } else { sub(/s$/,"",v) } a[NR]=v }
  END { n=asort(a); printf "take-over p50 %.2fs max %.2fs over %d runs\n", a[int((n+1)/2)], a[n], n }'
