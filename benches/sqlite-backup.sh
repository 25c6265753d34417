#!/usr/bin/env bash
# sqlite-backup against `sqlite3 src.db ".backup out.db"`:
#   1. an idle ~500 MB WAL database: both, side by side (hyperfine), with the ratio;
#   2. the same database while `runbook-testkit sqlite-writer` commits every 5 ms:
#      our backup's time (target: finishes, within 2x of idle) and the writer's worst
#      commit latency during each copy; then the sqlite3 CLI under `timeout 30`;
#   3. peak memory (max RSS, /usr/bin/time -v) of our backup at ~100 MB and ~500 MB.
# Needs the Debian packages hyperfine, sqlite3 and time. Takes 2-4 minutes and
# about 2 GB of disk in a temp dir.
#
#   bash benches/sqlite-backup.sh [SIZE_MB]      # default 500
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in hyperfine sqlite3 /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y hyperfine sqlite3 time" >&2; exit 2; }
done
size_mb=${1:-500}
cargo build --release --quiet --bins
bin="$PWD/target/release/runbook"
testkit="$PWD/target/release/runbook-testkit"
work=$(mktemp -d)
writer_pid=
cleanup() {
  if [ -n "$writer_pid" ]; then kill "$writer_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/runbooks" "$work/out"
export RUNBOOK_STATE_DIR="$work/state"
cd "$work"

# A database of SIZE_MB of random 4000-byte blobs (about one page per row), written in
# one transaction without a journal, then switched to WAL.
generate() { # path size_mb
  local rows=$(( $2 * 256 ))
  sqlite3 "$1" <<SQL >/dev/null
PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
CREATE TABLE items(id INTEGER PRIMARY KEY, body BLOB);
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $rows)
INSERT INTO items(body) SELECT randomblob(4000) FROM n;
COMMIT;
PRAGMA journal_mode=WAL;
SQL
}

mb() { echo $(( $(stat -c %s "$1") / 1000000 )); }
now_ms() { date +%s%3N; }

for check in quick none; do
  cat > "runbooks/backup-$check.yaml" <<YAML
version: 1
params:
  source: {type: path, required: true}
  dest: {type: path, required: true}
roots: ["$work/out"]
steps:
  - id: backup
    action: sqlite-backup
    with: {source: "{{ source }}", dest: "{{ dest }}", check: $check}
YAML
done
ours() { # source dest [check]
  "$bin" -q run "backup-${3:-quick}" --set "source=$1" --set "dest=$2" > /dev/null
}

t0=$(now_ms)
generate src.db "$size_mb"
generate small.db 100
echo "generated src.db ($(mb src.db) MB) and small.db ($(mb small.db) MB) in $(( $(now_ms) - t0 )) ms"

echo
echo "== 1. idle database, $(mb src.db) MB (warm page cache; each run writes and fsyncs a fresh file)"
hyperfine --runs 5 --warmup 1 \
  --prepare "rm -f $work/out/ours.db $work/out/cli.db" \
  -n "runbook sqlite-backup (check: quick)" "$bin -q run backup-quick --set source=$work/src.db --set dest=$work/out/ours.db" \
  -n "runbook sqlite-backup (check: none)" "$bin -q run backup-none --set source=$work/src.db --set dest=$work/out/ours.db" \
  -n "sqlite3 .backup" "sqlite3 $work/src.db '.backup $work/out/cli.db'" \
  --export-json idle.json
idle_ms=$(python3 -c "import json; r=json.load(open('idle.json'))['results']; print(round(r[0]['mean']*1000))")
cli_ms=$(python3 -c "import json; r=json.load(open('idle.json'))['results']; print(round(r[2]['mean']*1000))")
echo "idle: ours $idle_ms ms, sqlite3 .backup $cli_ms ms, ratio ours/sqlite3 = $(python3 -c "print(f'{$idle_ms/$cli_ms:.2f}')")"
rm -f out/*.db

echo
echo "== 2. the same database while a writer commits every 5 ms"
"$testkit" sqlite-writer src.db 5 --seconds 200 --log writer.log --stop-file writer.stop > writer.out &
writer_pid=$!
until [ "$(cat writer.log 2>/dev/null | wc -l)" -ge 200 ]; do sleep 0.05; done
# The writer's own latency with nothing else running, for reference.
base_from=$(now_ms); sleep 3; base_to=$(now_ms)
stall() { # from_ms to_ms: commits that overlap the window, and the worst latency
  awk -v a="$1" -v b="$2" '$2 <= b && $2 + $3 / 1000 >= a { n++; if ($3 > m) m = $3 }
    END { printf "%d commits, worst commit latency %.1f ms", n, m / 1000 }' writer.log
}
echo "writer alone (3 s): $(stall "$base_from" "$base_to")"
worst_busy=0
total_busy=0
for i in 1 2 3; do
  rm -f out/busy.db
  from=$(now_ms)
  ours "$work/src.db" "$work/out/busy.db"
  to=$(now_ms)
  took=$(( to - from ))
  total_busy=$(( total_busy + took ))
  if (( took > worst_busy )); then worst_busy=$took; fi
  echo "ours, run $i: $took ms ($(sqlite3 "$work/out/busy.db" 'PRAGMA page_count') pages); writer during the copy: $(stall "$from" "$to")"
done
echo "busy/idle: mean $(python3 -c "print(f'{$total_busy/3/$idle_ms:.2f}')")x, slowest $(python3 -c "print(f'{$worst_busy/$idle_ms:.2f}')")x (against the idle mean with check: quick; target < 2x)"
rm -f out/*.db
from=$(now_ms)
set +e
timeout 30 sqlite3 src.db ".backup $work/out/cli-busy.db"
code=$?
set -e
to=$(now_ms)
if [ "$code" = 124 ]; then
  echo "sqlite3 .backup: did not finish within 30 s (killed by timeout); writer meanwhile: $(stall "$from" "$to")"
else
  echo "sqlite3 .backup: exit $code after $(( to - from )) ms; writer meanwhile: $(stall "$from" "$to")"
fi
touch writer.stop
wait "$writer_pid"
writer_pid=
echo "writer: $(cat writer.out)"
rm -f out/*.db

echo
echo "== 3. peak memory of our backup (max RSS of the runbook process)"
for db in small.db src.db; do
  /usr/bin/time -v "$bin" -q run backup-quick --set "source=$work/$db" --set "dest=$work/out/mem.db" 2> time.txt > /dev/null
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' time.txt)
  echo "$(mb "$db") MB database: max RSS $(( rss / 1024 )) MB"
  rm -f out/mem.db
done
