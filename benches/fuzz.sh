#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECONDS each (default 600) and prints
# libFuzzer's closing stats per target. Usage: bash benches/fuzz.sh [SECONDS] [TARGET...]
# Targets: loader (YAML -> validated runbook), template (templates and `when`
# expressions rendered with params), vars_file (a --vars file parsed and resolved).
#
# The machine's toolchain is stable: cargo-fuzz passes -Z flags, which stable rustc
# accepts with RUSTC_BOOTSTRAP=1; no sanitizer (`-s none`), since the code under test is
# safe Rust and libFuzzer's own checks (panics, timeouts, RSS) are what we look for.
# New inputs the fuzzer finds go to fuzz/corpus/TARGET (minimize before committing:
# `cargo fuzz cmin -s none TARGET`); crashes go to fuzz/artifacts/TARGET (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(loader template vars_file)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
for t in "${targets[@]}"; do
  echo "== $t (${seconds}s)"
  log=$(mktemp)
  # -timeout: one input taking over 10 s is a finding; -rss_limit_mb: a template that
  # blows up memory is one too.
  if cargo fuzz run -s none "$t" -- -max_total_time="$seconds" -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    status=ok
  else
    status="FOUND SOMETHING (see fuzz/artifacts/$t)"
  fi
  grep -E '^(#[0-9]+.*(DONE|pulse)|stat::|Done )' "$log" | tail -12
  echo "$t: $status"
  rm -f "$log"
done
