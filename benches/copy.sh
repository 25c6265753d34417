#!/usr/bin/env bash
# Tree copy: runbook's `copy` against `cp -a`, side by side, on 2,000 files / 500 MB.
# Fair on durability: `copy` returns only after its data is on disk (one syncfs) and
# renamed into place, so `cp -a` is timed together with `sync -f` on the destination.
#
#   bash benches/copy.sh [files] [total_mb]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-2000}
total_mb=${2:-500}
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)"; exit 2; }
cargo build --release --quiet --bin runbook
bin="$PWD/target/release/runbook"
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/src" "$work/runbooks"
per_kb=$(( total_mb * 1024 / files ))
echo "building $files files of ${per_kb} KiB in $work/src"
python3 - "$work/src" "$files" "$per_kb" <<'PY'
import os, sys
root, n, kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(kb * 1024)
for i in range(n):
    d = os.path.join(root, f"seg{i % 40:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
        f.write(block[i % 97:] + block[: i % 97])
PY
du -sh "$work/src"
cat > "$work/runbooks/copy.yaml" <<YAML
version: 1
steps:
  - id: copy
    action: copy
    with: {from: "$work/src", to: "$work/dst-runbook"}
YAML
cd "$work"
export RUNBOOK_STATE_DIR="$work/state"
hyperfine --warmup 1 --runs 5 \
  --prepare "rm -rf $work/dst-runbook $work/dst-cp; sync" \
  -n "runbook copy (syncfs + rename)" "$bin -q run copy" \
  -n "cp -a && sync -f" "cp -a $work/src $work/dst-cp && sync -f $work/dst-cp" \
  -n "cp -a (no sync)" "cp -a $work/src $work/dst-cp"
