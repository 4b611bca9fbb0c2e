#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each, then print a summary.
#   fuzz/run.sh SECONDS [TARGET...]        (make fuzz / make fuzz-ci call this)
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). Stable Rust is enough:
# RUSTC_BOOTSTRAP=1 lets it accept the -Z flags libFuzzer's instrumentation needs.
# New inputs go to target/corpus/<target> (kept between runs, not committed); the seeds
# in corpus/<target> are read only. A crash leaves its input in artifacts/<target>/ and
# fails the run; reproduce with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET artifacts/TARGET/crash-…`.
set -uo pipefail
cd "$(dirname "$0")" || exit 2
export RUSTC_BOOTSTRAP=1
seconds=${1:-60}
shift || true
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz not installed: cargo install cargo-fuzz --locked" >&2; exit 2; }
cargo fuzz build || exit 2

# Per-target libFuzzer options: connect_response must reach the 16 KiB head cap.
opts_for() {
  case "$1" in
    connect_response) echo "-max_len=20000" ;;
    manifest) echo "-max_len=8192 -dict=dict/manifest.dict" ;;
    snapshot_wire) echo "-max_len=8192 -dict=dict/snapshot_wire.dict" ;;
    proxy_url) echo "-max_len=1024 -dict=dict/proxy_url.dict" ;;
    *) echo "" ;;
  esac
}

mkdir -p target/logs
failed=()
summary=()
for t in "${targets[@]}"; do
  mkdir -p "target/corpus/$t"
  log="target/logs/$t.log"
  echo "=== fuzz $t for ${seconds}s"
  # shellcheck disable=SC2046
  cargo fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=256 \
    -print_final_stats=1 $(opts_for "$t") >"$log" 2>&1
  rc=$?
  execs=$(grep -oP 'stat::number_of_executed_units:\s*\K\d+' "$log" | tail -1)
  rate=$(grep -oP 'stat::average_exec_per_sec:\s*\K\d+' "$log" | tail -1)
  cov=$(grep -oP '#\d+\s+DONE\s+cov: \K\d+' "$log" | tail -1)
  corpus=$(find "target/corpus/$t" -type f | wc -l)
  line=$(printf '%-18s rc=%d execs=%s exec/s=%s cov=%s corpus=%s' "$t" "$rc" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$corpus")
  summary+=("$line")
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    echo "--- $t FAILED (log: fuzz/$log); last lines:"
    tail -40 "$log"
  fi
done
echo "=== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: ${#targets[@]} passed, 0 failed"
