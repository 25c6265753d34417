#!/usr/bin/env bash
# Off-site push against the tools an operator would otherwise use, side by side in one
# run, over the same ssh to the same real host (`runbook-testkit offsite-host`: sshd in a
# network namespace behind a veth pair). The snapshot has a vector-store-like tree of
# FILES files and MB MiB (default 2,000 / 200: a chroma.sqlite3 and hnswlib-shaped
# segment directories of incompressible bytes, as float vectors are). For each tool: a
# first push and an unchanged second push, wall time and the bytes that crossed the veth
# (both directions, from its counters), then the ratios.
#
#   restic backup   to an sftp repository on the host (Debian's restic; encrypted, dedup)
#   rsync -a        over the same ssh (plaintext; the floor for "copy what changed")
#   runbook push    `runbook run` of a runbook with one `offsite-push` step (encrypted,
#                   content-addressed)
# Then the engine's fetch of it back (verified, decrypted), age alone encrypting the
# tree (the price of encryption, beside rsync's plaintext copy), and atocore/recover of
# the AtoCore sandbox onto a new one (the disaster-recovery RTO).
#
#   bash benches/offsite.sh                 # 2,000 files, 200 MiB
#   bash benches/offsite.sh 200 20          # a quick look
#   PROFILE=debug bash benches/offsite.sh
# Needs root, iproute2, openssh-server, rsync, restic, age (what .ci/run installs).
set -euo pipefail
cd "$(dirname "$0")/.."
files=${1:-2000}
mib=${2:-200}
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --quiet --bin runbook-testkit --bin runbook
else
  cargo build --quiet --bin runbook-testkit --bin runbook
fi
testkit="$PWD/target/$profile/runbook-testkit"
runbook="$PWD/target/$profile/runbook"
work=$(mktemp -d)
results="$work/results.tsv"
: >"$results"

# ---------------------------------------------------------------- the off-site host
# Its stdin is a pipe this script holds: closing it (on exit, whatever the reason) tears
# the host down; `offsite-host down` removes what a crash of the testkit left.
coproc HOST { exec "$testkit" offsite-host --dir "$work/host" --until-stdin-closes 2>"$work/host.log"; }
host_pid=$HOST_PID
cleanup() {
  if [ -n "${HOST[1]:-}" ]; then exec {HOST[1]}>&-; fi
  wait "$host_pid" 2>/dev/null || true
  "$testkit" offsite-host down --dir "$work/host" >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if ! read -r -t 60 host_json <&"${HOST[0]}"; then
  echo "FAIL: the off-site host did not start:" >&2
  cat "$work/host.log" >&2
  exit 1
fi
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$host_json" "$1"; }
host=$(field host)
user=$(field user)
key=$(field ssh_key)
known_hosts=$(field known_hosts)
repo=$(field repo_dir)
veth=$(field veth)
echo "profile: $profile; off-site host $user@$host (veth $veth), repository dirs below $repo"

# The ssh every tool uses: the engine's options (key, verified host key, no prompts).
ssh_opts=(-F /dev/null -i "$key" -o BatchMode=yes -o IdentitiesOnly=yes
  -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$known_hosts"
  -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=10)

crossed() {
  echo $(($(<"/sys/class/net/$veth/statistics/tx_bytes") + $(<"/sys/class/net/$veth/statistics/rx_bytes")))
}

# measure TOOL RUN COMMAND...: one timed run; a row "TOOL RUN seconds bytes" in results.
measure() {
  local tool=$1 run=$2
  shift 2
  local b0 t0 t1 b1
  sync
  b0=$(crossed)
  t0=$EPOCHREALTIME
  "$@" >"$work/$tool-$run.log" 2>&1 || {
    echo "FAIL: $tool $run: $*" >&2
    tail -20 "$work/$tool-$run.log" >&2
    exit 1
  }
  t1=$EPOCHREALTIME
  b1=$(crossed)
  printf '%s\t%s\t%s\t%s\n' "$tool" "$run" "$(python3 -c "print($t1 - $t0)")" "$((b1 - b0))" >>"$results"
  printf '  %-8s %-7s %8.2f s %14d bytes crossed\n' "$tool" "$run" "$(python3 -c "print($t1 - $t0)")" "$((b1 - b0))"
}

# ---------------------------------------------------------------- the snapshot
snapshot="$work/snapshot"
python3 - "$snapshot" "$files" "$mib" <<'PY'
import os, sys, uuid, random
root, files, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(8)
total = mib << 20
chroma = os.path.join(root, "chroma")
os.makedirs(chroma)
# A segment: hnswlib's files, the vectors dominating.
shape = [("data_level0.bin", 0.955), ("link_lists.bin", 0.03), ("length.bin", 0.01),
         ("index_metadata.pickle", 0.004), ("header.bin", 0.001)]
sqlite_share = 0.05
made = 1
segments = (files - 1 + len(shape) - 1) // len(shape)
per_segment = total * (1 - sqlite_share) / segments
with open(os.path.join(chroma, "chroma.sqlite3"), "wb") as f:
    f.write(os.urandom(int(total * sqlite_share)))
for _ in range(segments):
    seg = os.path.join(chroma, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    os.makedirs(seg)
    for name, share in shape:
        if made == files:
            break
        with open(os.path.join(seg, name), "wb") as f:
            f.write(os.urandom(max(1, int(per_segment * share))))
        made += 1
size = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(root) for n in ns)
print(f"snapshot: {made} files, {size / 2**20:.1f} MiB below {root}")
PY

# ---------------------------------------------------------------- restic
echo "== restic backup to sftp:$user@$host:$repo/restic"
export RESTIC_PASSWORD=offsite-bench RESTIC_CACHE_DIR="$work/restic-cache"
restic_repo="sftp:$user@$host:$repo/restic"
# restic runs this as `ssh` with the sftp subsystem; a string, as its option takes.
restic_ssh="ssh ${ssh_opts[*]} $user@$host -s sftp"
restic -q -r "$restic_repo" -o sftp.command="$restic_ssh" init >/dev/null
for run in first second; do
  measure restic "$run" restic -r "$restic_repo" -o sftp.command="$restic_ssh" \
    backup --host bench "$snapshot"
done

# ---------------------------------------------------------------- rsync
echo "== rsync -a over ssh to $user@$host:$repo/rsync/"
for run in first second; do
  measure rsync "$run" rsync -a -e "ssh ${ssh_opts[*]}" "$snapshot/" "$user@$host:$repo/rsync/"
done

# ---------------------------------------------------------------- the engine
# `runbook run` of one `offsite-push` step to the same host, encrypted to a fresh age
# recipient: a first and an unchanged second push (two stamps of the same snapshot).
age-keygen -o "$work/age.key" 2>/dev/null
recipient=$(age-keygen -y "$work/age.key")
repo_yaml="{host: \"$host\", port: 22, user: \"$user\", dir: \"$repo/runbook\", ssh_key: \"$key\", known_hosts: \"$known_hosts\"}"
mkdir -p "$work/runbooks/bench"
cat >"$work/runbooks/bench/push.yaml" <<EOF
version: 1
description: Benchmark - push one snapshot to the off-site host.
params:
  stamp: {type: string, required: true, description: The stamp to ship the snapshot under.}
steps:
  - id: push
    action: offsite-push
    with:
      repo: $repo_yaml
      source: "$snapshot"
      stamp: "{{ stamp }}"
      recipients: ["$recipient"]
EOF
cat >"$work/runbooks/bench/fetch.yaml" <<EOF
version: 1
description: Benchmark - fetch, verify and decrypt one snapshot from the off-site host.
steps:
  - id: fetch
    action: offsite-fetch
    with:
      repo: $repo_yaml
      stamp: latest
      identity: "$work/age.key"
      dest: "$work/fetched"
EOF
rb=("$runbook" --path "$work/runbooks" --state-dir "$work/state")
echo "== runbook offsite-push (runbook run) to $user@$host:$repo/runbook"
measure runbook first "${rb[@]}" run bench/push --set stamp=20260101T000000Z --yes
measure runbook second "${rb[@]}" run bench/push --set stamp=20260102T000000Z --yes
echo "== runbook offsite-fetch (runbook run): the same snapshot back, verified and decrypted"
measure fetch first "${rb[@]}" run bench/fetch --yes
if ! diff -r "$snapshot" "$work/fetched" >/dev/null; then
  echo "FAIL: the fetched tree differs from the snapshot" >&2
  exit 1
fi

# ---------------------------------------------------------------- the price of encryption
# The engine has no plaintext mode (nothing leaves unencrypted): its first push is set
# against rsync -a of the same tree over the same ssh (the same bytes, unencrypted), and
# age alone encrypting the whole tree (one stream, Debian's age CLI) is timed apart.
echo "== age alone: tar of the snapshot through age -r (to /dev/null)"
t0=$EPOCHREALTIME
tar -C "$snapshot" -cf - . | age -r "$recipient" >/dev/null
t1=$EPOCHREALTIME
printf 'age\tfirst\t%s\t0\n' "$(python3 -c "print($t1 - $t0)")" >>"$results"
printf '  %-8s %-7s %8.2f s\n' age encrypt "$(python3 -c "print($t1 - $t0)")"

# ---------------------------------------------------------------- disaster recovery
# The AtoCore sandbox's snapshot shipped with atocore/offsite, then atocore/recover on a
# brand-new sandbox from the off-site copy alone: the RTO of the disaster (fetch,
# decrypt, validate, restore, start, verify), as the drill measures it.
echo "== atocore/recover onto a new host (the sandbox; RTO)"
"$testkit" atocore-sandbox "$work/old" >/dev/null
"$testkit" atocore-sandbox "$work/new" --empty >/dev/null
cat >"$work/offsite-vars.yaml" <<EOF
offsite_host: "$host"
offsite_user: "$user"
offsite_dir: "$repo/atocore"
offsite_ssh_key: "$key"
offsite_known_hosts: "$known_hosts"
age_recipients: ["$recipient"]
age_identity: "$work/age.key"
EOF
atocore=("$runbook" --path "$PWD/runbooks")
RUNBOOK_STATE_DIR="$work/old/state" "${atocore[@]}" run atocore/backup --vars "$work/old/sandbox.yaml" \
  --set include_chroma=true --yes >"$work/old-backup.log"
RUNBOOK_STATE_DIR="$work/old/state" "${atocore[@]}" run atocore/offsite --vars "$work/old/sandbox.yaml" \
  --vars "$work/offsite-vars.yaml" --yes >"$work/old-offsite.log"
measure recover first env RUNBOOK_STATE_DIR="$work/new/state" "${atocore[@]}" run atocore/recover \
  --vars "$work/new/sandbox.yaml" --vars "$work/offsite-vars.yaml" --yes
RUNBOOK_STATE_DIR="$work/new/state" "${atocore[@]}" run atocore/service --vars "$work/new/sandbox.yaml" \
  --set state=stopped --yes >/dev/null
sandbox_bytes=$(du -sb "$work/old/srv/storage/atocore/backups/snapshots" | cut -f1)

# ---------------------------------------------------------------- the table
python3 - "$results" "$files" "$mib" "$sandbox_bytes" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    tool, run, secs, nbytes = line.rstrip("\n").split("\t")
    rows[(tool, run)] = None if secs == "n/a" else (float(secs), int(nbytes))
print(f"\n{sys.argv[2]} files, {sys.argv[3]} MiB; seconds (wall) and MB (10^6 bytes) crossed the link")
tools = ["runbook", "restic", "rsync"]
head = f"{'run':<8}" + "".join(f"{t + ' s':>11}{t + ' MB':>12}" for t in tools)
print(head)
for run in ["first", "second"]:
    line = f"{run:<8}"
    for t in tools:
        r = rows.get((t, run))
        line += f"{'n/a':>11}{'n/a':>12}" if r is None else f"{r[0]:>11.2f}{r[1] / 1e6:>12.2f}"
    print(line)
print("\nratios (time, bytes)")
pairs = [("runbook", "restic"), ("runbook", "rsync"), ("restic", "rsync")]
print(f"{'run':<8}" + "".join(f"{a + '/' + b:>22}" for a, b in pairs))
for run in ["first", "second"]:
    line = f"{run:<8}"
    for a, b in pairs:
        ra, rb = rows.get((a, run)), rows.get((b, run))
        if ra is None or rb is None:
            line += f"{'n/a':>22}"
        else:
            line += f"{ra[0] / rb[0]:>10.2f}x{ra[1] / max(rb[1], 1):>10.2f}x "
    print(line)
print("\nsecond push as a share of the snapshot's bytes (the issue's bound for the engine: 1%):")
total = int(sys.argv[3]) << 20
for t in tools:
    r = rows.get((t, "second"))
    print(f"  {t:<8} " + ("n/a" if r is None else f"{100 * r[1] / total:.2f}%"))
push, rsync, age = rows[("runbook", "first")], rows[("rsync", "first")], rows[("age", "first")]
print("\nthe price of encryption (first push; the engine has no plaintext mode):")
print(f"  runbook (encrypted) / rsync -a (plaintext, same ssh): {push[0] / rsync[0]:.2f}x time, "
      f"{push[1] / max(rsync[1], 1):.3f}x bytes (+{100 * (push[0] - rsync[0]) / rsync[0]:.0f}% time)")
print(f"  age alone over the whole tree: {age[0]:.2f} s = {100 * age[0] / push[0]:.1f}% of the push")
fetch = rows[("fetch", "first")]
print(f"\nfetch back (verify + decrypt): {fetch[0]:.2f} s, {fetch[1] / 1e6:.2f} MB crossed")
rec = rows[("recover", "first")]
print(f"disaster-recovery RTO, atocore/recover of the sandbox ({int(sys.argv[4]) / 1e6:.1f} MB of snapshots "
      f"on the old host) onto a new one: {rec[0]:.2f} s, {rec[1] / 1e6:.2f} MB crossed")
PY
