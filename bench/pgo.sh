#!/usr/bin/env bash
# The shipped binary, built with profile-guided optimisation (PGO):
#   bench/pgo.sh          (make release, make bench, make bench-instructions and the
#                          Dockerfile call this)
# 1. builds provider-proxy with instrumentation (target/pgo/instrumented),
# 2. trains it: the benchmark's own workloads on loopback, one short round each (JSON at 32
#    and 256 connections and SSE at 32 and 256 streams, direct, via Squid, via Dante and
#    over h2; `provider-proxy-bench run` starts nginx, Squid and Dante as `make bench`
#    does), the sidecar stopped with SIGTERM after each so that it writes its profile,
# 3. merges the profiles with the llvm-profdata of rustc's own LLVM,
# 4. builds again with the profile: target/pgo/provider-proxy.
# Why: the compiler then lays out the hot path (hyper's h1 codec, rustls records, our
# forwarder) by how it really runs: callgrind counts ~20 % fewer instructions per request
# and a third fewer instruction-cache misses (bench/results/instructions.md, which also
# counts the build without the profile).
# Needs the apt packages of `make bench` (nginx-light squid dante-server apache2-utils) and
# llvm-profdata of rustc's LLVM major version: $LLVM_PROFDATA, rustup's llvm-tools
# component, or Debian's llvm-<major> (installed here when apt-get is there). PGO=off
# builds without the profile.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-$PWD/target}
pgo=$target/pgo

# PGO=off: the plain release build in the same place, for a toolchain without llvm-tools
# (cross builds, say). It is ~20 % slower per request; say so.
case "${PGO:-on}" in
  on) ;;
  off)
    echo "pgo: PGO=off: plain release build, without the profile (~20 % more CPU per request)" >&2
    "$cargo" build --release --locked -p provider-proxy
    mkdir -p "$pgo"
    install -m 0755 "$target/release/provider-proxy" "$pgo/provider-proxy"
    echo "pgo: wrote $pgo/provider-proxy (no PGO)"
    exit 0
    ;;
  *)
    echo "pgo: PGO is on or off, not ${PGO}" >&2
    exit 2
    ;;
esac

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
host=$(rustc -vV | sed -n 's/^host: //p')
find_profdata() {
  local c
  for c in "${LLVM_PROFDATA:-}" "$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata" \
    "llvm-profdata-$llvm_major" llvm-profdata; do
    if [ -z "$c" ] || ! command -v "$c" >/dev/null 2>&1; then continue; fi
    # A profile from one LLVM major version is unreadable to another.
    if "$c" --version 2>/dev/null | grep -q "LLVM version $llvm_major\."; then
      echo "$c"
      return 0
    fi
  done
  return 0
}
profdata=$(find_profdata)
if [ -z "$profdata" ] && command -v apt-get >/dev/null; then
  echo "pgo: installing llvm-$llvm_major for llvm-profdata"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends "llvm-$llvm_major" >/dev/null; }; then
    echo "pgo: apt-get could not install llvm-$llvm_major" >&2
  fi
  profdata=$(find_profdata)
fi
if [ -z "$profdata" ]; then
  echo "pgo: no llvm-profdata of LLVM $llvm_major (rustc's): set LLVM_PROFDATA, or" \
    "'rustup component add llvm-tools', or install llvm-$llvm_major" >&2
  exit 2
fi

echo "pgo: 1/4 instrumented build"
RUSTFLAGS="-Cprofile-generate=$pgo/profiles" \
  "$cargo" build --release --locked -p provider-proxy --target-dir "$pgo/instrumented"
# The plain build too: the bench binary that trains is built with it, and the same package
# set as `make bench` keeps one set of dependency builds.
"$cargo" build --release --locked -p provider-proxy -p provider-proxy-bench --bins

train_and_merge() {
  echo "pgo: 2/4 training on loopback (log: $pgo/training.log)"
  rm -rf "$pgo/profiles" "$pgo/training"
  mkdir -p "$pgo/profiles"
  if ! LLVM_PROFILE_FILE="$pgo/profiles/sidecar-%p-%m.profraw" \
    BENCH_SIDECAR_BIN="$pgo/instrumented/release/provider-proxy" \
    BENCH_PEERS=sidecar,sidecar-squid,sidecar-dante,sidecar-h2 \
    BENCH_SCENARIOS=json-32,json-256,sse-32,sse-256 BENCH_SIDECAR_LOG=warn \
    BENCH_SECONDS=1 BENCH_WARMUP=0.3 BENCH_ROUNDS=1 BENCH_OUT="$pgo/training" \
    "$target/release/provider-proxy-bench" run >"$pgo/training.log" 2>&1; then
    tail -20 "$pgo/training.log" >&2
    echo "pgo: the training run failed" >&2
    exit 1
  fi
  profiles=$(find "$pgo/profiles" -name '*.profraw' | wc -l)
  # One per sidecar started: 4 routes × 4 scenarios.
  if [ "$profiles" -lt 16 ]; then
    echo "pgo: $profiles profiles written, 16 expected: did the sidecar not exit on SIGTERM?" >&2
    exit 1
  fi

  echo "pgo: 3/4 merging $profiles profiles ($profdata)"
  "$profdata" merge -o "$pgo/provider-proxy.profdata" "$pgo/profiles"
}

# A profile newer than the instrumented build came from this very code: train again only
# when the code changed (or PGO_RETRAIN=1), so that `make bench` after `make release` does
# not rebuild everything.
if [ -z "${PGO_RETRAIN:-}" ] && [ "$pgo/provider-proxy.profdata" -nt "$pgo/instrumented/release/provider-proxy" ]; then
  echo "pgo: 2-3/4 the profile in $pgo is from this build's code: kept (PGO_RETRAIN=1 trains again)"
else
  train_and_merge
fi

echo "pgo: 4/4 optimised build"
RUSTFLAGS="-Cprofile-use=$pgo/provider-proxy.profdata" \
  "$cargo" build --release --locked -p provider-proxy --target-dir "$pgo/optimised"
install -m 0755 "$pgo/optimised/release/provider-proxy" "$pgo/provider-proxy"
echo "pgo: wrote $pgo/provider-proxy"
