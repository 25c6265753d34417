#!/usr/bin/env bash
# Incremental vector-store snapshot (follow-up 5): `copy` with `link_from` of an
# unchanged 2,000-file / ~200 MB store against the full `copy` and `cp -a`, side by
# side in one hyperfine run, then the new disk the incremental snapshot takes
# (st_blocks of the inodes the earlier snapshot does not have).
# Targets: >= 10x faster than the full copy, <= 1 MiB new disk.
# Fair on durability: both `copy`s return after one syncfs, so `cp -a` is also timed
# with `sync -f`.
#
#   bash benches/incremental-snapshot.sh [files] [total_mb]
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-2000}
total_mb=${2:-200}
command -v hyperfine >/dev/null || { echo "needs hyperfine (apt-get install hyperfine)"; exit 2; }
cargo build --release --quiet --bin runbook
bin="$PWD/target/release/runbook"
work=$(mktemp -d -p "${BENCH_DIR:-/var/tmp}")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/store" "$work/runbooks"
per_kb=$(( total_mb * 1024 / files ))
echo "building a vector-store-like tree: $files files of ${per_kb} KiB in $work/store"
python3 - "$work/store" "$files" "$per_kb" <<'PY'
import os, sys
root, n, kb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(kb * 1024)
# chroma.sqlite3 at the top, the rest in UUID-like segment directories.
with open(os.path.join(root, "chroma.sqlite3"), "wb") as f:
    f.write(block)
for i in range(1, n):
    d = os.path.join(root, f"{i % 40:08x}-0000-4000-8000-{i % 40:012x}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"data_level{i:05d}.bin"), "wb") as f:
        f.write(block[i % 97:] + block[: i % 97])
PY
du -sh "$work/store"
runbook() { # name to link_from
  cat > "$work/runbooks/$1.yaml" <<YAML
version: 1
steps:
  - id: copy
    action: copy
    with: {from: "$work/store", to: "$work/$2", link_from: "$3"}
YAML
}
runbook base base ""
runbook incremental incr "$work/base"
runbook full full ""
cd "$work"
export RUNBOOK_STATE_DIR="$work/state"
"$bin" -q run base   # the previous snapshot
hyperfine --warmup 2 --runs 10 --export-json "$work/times.json" \
  --prepare "rm -rf $work/incr $work/full $work/cp; sync" \
  -n "incremental copy (link_from, unchanged)" "$bin -q run incremental" \
  -n "full copy" "$bin -q run full" \
  -n "cp -a && sync -f" "cp -a $work/store $work/cp && sync -f $work/cp"
rm -rf "$work/incr" && sync && "$bin" -q run incremental
python3 - "$work/times.json" "$work/incr" "$work/base" <<'PY'
import json, os, sys
results = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
def pick(stat):
    return [results[n][stat] for n in ("incremental copy (link_from, unchanged)", "full copy", "cp -a && sync -f")]
def inodes(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for name in [d] + [os.path.join(d, f) for f in files]:
            st = os.lstat(name)
            out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out
old = inodes(sys.argv[3])
new = {k: v for k, v in inodes(sys.argv[2]).items() if k not in old}
disk = sum(new.values())
print()
# The disk is shared with whatever else runs: the median is the steadier figure.
for stat in ("mean", "median"):
    incr, full, cp = pick(stat)
    print(f"{stat}: incremental {incr*1000:.1f} ms, full copy {full*1000:.1f} ms, cp -a && sync -f {cp*1000:.1f} ms")
    print(f"  full copy / incremental: {full/incr:.1f}x   (target >= 10x: {'met' if full/incr >= 10 else 'NOT met'})")
    print(f"  cp -a && sync -f / incremental: {cp/incr:.1f}x")
print(f"new disk of the incremental snapshot: {disk} bytes in {len(new)} new inodes "
      f"(target <= 1 MiB: {'met' if disk <= 1 << 20 else 'NOT met'})")
PY
