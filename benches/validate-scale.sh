#!/usr/bin/env bash
# Does `runbook validate` stay linear in the number of steps? Generates runbooks of
# 1,000 / 10,000 / 100,000 steps (a mkdir, then a write-file reading its outputs, so
# every step's templates and step references are checked), times `validate` on each
# with hyperfine, and prints the time per step: linear means that column stays flat.
#
#   bash benches/validate-scale.sh [sizes...]     # default: 1000 10000 100000
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(1000 10000 100000)
cargo build --release --quiet --bin runbook
bin="$PWD/target/release/runbook"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/runbooks"
for n in "${sizes[@]}"; do
  {
    echo "version: 1"
    echo "params:"
    echo "  base: {type: path, default: $work/out}"
    echo "roots: [\"{{ base }}\"]"
    echo "steps:"
    for ((i = 0; i < n; i += 2)); do
      echo "  - id: make$i"
      echo "    action: mkdir"
      echo "    with: {path: \"{{ base }}/d$i\"}"
      echo "  - id: note$i"
      echo "    action: write-file"
      echo "    with: {path: \"{{ steps.make$i.outputs.path }}/note\", content: \"step $i of $n\"}"
    done
  } > "$work/runbooks/steps$n.yaml"
done
cd "$work"
args=()
for n in "${sizes[@]}"; do args+=("$bin validate steps$n"); done
hyperfine --warmup 1 --runs 5 -N --export-json "$work/times.json" "${args[@]}"
echo
echo "steps      mean      per step"
python3 - "$work/times.json" "${sizes[@]}" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))["results"]
for n, r in zip(sys.argv[2:], results):
    mean = r["mean"]
    print(f"{int(n):>7}  {mean:7.3f} s  {mean / int(n) * 1e6:7.1f} µs")
PY
