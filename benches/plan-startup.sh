#!/usr/bin/env bash
# How long `runbook plan` takes on a 20-step runbook (CI calls plan on every drill,
# so start-up must stay in milliseconds). Prints hyperfine's figures, and `runbook
# validate` beside it for the share that is parsing and checking alone.
#
#   bash benches/plan-startup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
bin="$PWD/target/release/runbook"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/runbooks" "$work/data"
for i in $(seq 1 5); do head -c 100000 /dev/urandom > "$work/data/file$i"; done
{
  echo "version: 1"
  echo "params:"
  echo "  data: {type: path, default: $work/data}"
  echo "  out: {type: path, default: $work/out}"
  echo "vars:"
  echo "  stamp: \"{{ now_utc('%Y%m%dT%H%M%SZ') }}\""
  echo "  dest: \"{{ out }}/{{ stamp }}\""
  echo "roots: [\"{{ out }}\"]"
  echo "steps:"
  echo "  - {id: make, action: mkdir, with: {path: \"{{ dest }}\"}}"
  for i in $(seq 1 5); do
    echo "  - {id: copy$i, action: copy, with: {from: \"{{ data }}/file$i\", to: \"{{ dest }}/file$i\"}}"
    echo "  - {id: sum$i, action: exec, with: {argv: [sha256sum, \"{{ dest }}/file$i\"]}}"
    echo "  - {id: note$i, action: write-file, with: {path: \"{{ dest }}/file$i.sum\", content: \"{{ steps.sum$i.outputs.stdout }}\"}}"
  done
  for i in $(seq 1 4); do
    echo "  - {id: check$i, action: assert, with: {that: \"steps.copy$i.outputs.bytes > 0\"}}"
  done
} > "$work/runbooks/twenty.yaml"
steps=$(grep -c '^  - {id' "$work/runbooks/twenty.yaml")
echo "runbook with $steps steps: $work/runbooks/twenty.yaml"
cd "$work"
export RUNBOOK_STATE_DIR="$work/state"
"$bin" plan twenty | tail -1
hyperfine --warmup 5 --runs 100 -N \
  "$bin validate twenty" \
  "$bin plan twenty" \
  "$bin plan twenty --format json"
