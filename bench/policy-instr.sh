#!/usr/bin/env bash
# Instructions per Cedar decision of `keymint bench policy`, counted by
# callgrind (a figure the load of a shared machine does not move): the
# program's totals for two numbers of decisions, their difference divided
# by the difference in decisions, so that start-up (schema, 200 generated
# policies) cancels out.
#
#   bench/policy-instr.sh KEYMINT [FEW=2000] [MANY=12000]
#
# Needs: valgrind (callgrind_annotate).
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: $0 KEYMINT [FEW] [MANY]" >&2; exit 2; }
BIN=$(realpath "$1"); FEW=${2:-2000}; MANY=${3:-12000}
(( MANY > FEW )) || { echo "MANY must be larger than FEW" >&2; exit 2; }
D=$(mktemp -d /tmp/keymint-policy-instr.XXXXXX)
trap 'rm -rf "$D"' EXIT
total() {
  valgrind --tool=callgrind --callgrind-out-file="$D/out" "$BIN" bench policy --decisions "$1" >"$D/log" 2>&1
  callgrind_annotate "$D/out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !n++ { gsub(",", "", $1); print $1 }'
}
a=$(total "$FEW"); b=$(total "$MANY")
echo "$BIN: $(( (b - a) / (MANY - FEW) )) instructions per decision (callgrind; bench policy, $MANY minus $FEW decisions)"
