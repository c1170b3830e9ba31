# Shared by the scanner benchmarks (compare.sh, compare-git.sh): source it
# with OUT (results directory) and LIMIT (seconds per tool) set.

# run NAME REPORT COMMAND...: runs COMMAND under GNU time and a timeout,
# stdout to REPORT, stderr to $OUT/NAME.err, and appends its wall time and
# peak RSS to $OUT/results.txt.
run() {
  local name=$1 report=$2; shift 2
  /usr/bin/time -v -o "$OUT/$name.time" timeout "$LIMIT" "$@" > "$report" 2> "$OUT/$name.err" || true
  local secs rss
  secs=$(grep "Elapsed (wall clock)" "$OUT/$name.time" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$OUT/$name.time" | awk '{print $NF}')
  echo "$name: wall $secs, peak RSS ${rss} KiB" | tee -a "$OUT/results.txt"
}
