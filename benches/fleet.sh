#!/usr/bin/env bash
# The fleet controller against what an operator would otherwise use, side by side in one
# run, on the same three real SSH hosts (`runbook-testkit offsite-host`: each an sshd in
# a network namespace of its own behind a veth pair). The work is a trivial runbook of 5
# steps (benches/fleet/runbooks/bench/five.yaml: each step appends a line to the host's
# count file), so what is timed is the controller and the transport. hyperfine times
# each command (RUNS runs after WARMUP warmup runs; wall time, mean and sigma):
#
#   ssh HOST true       one SSH connection setup (login, a command, logout): the unit
#                       of the per-host overhead target
#   remote shell        what sshd starts for each remote command, the user's login
#                       shell with -c (bash reads ~/.bashrc then), timed on its own: the
#                       hosts share this machine's filesystem and so its rc files
#   local run           `runbook run bench/five` on this machine, no SSH: the work
#   fleet first         `runbook fleet run bench/five --hosts hosts.yaml --parallel 3`
#                       on hosts with nothing installed (each run starts from an empty
#                       host dir, so each installs the engine and the runbook there)
#   fleet warm          the same, the engine already installed: the headline
#   sequential ssh      the three hosts one after another, each `ssh HOST
#                       DIR/bin/runbook run bench/five --yes` (engine put there by scp)
#   ansible             `ansible-playbook` (ansible-core from PyPI, in a venv under
#                       ${XDG_CACHE_HOME:-~/.cache}/runbook-bench) of the same 5 steps
#                       (benches/fleet/five.yml: `command` tasks), forks=3, no facts,
#                       its defaults (ControlPersist masters closed before each run,
#                       as for a playbook not run within the last minute)
#   ansible, best case  the same with pipelining on and the masters of the previous run
#                       kept (Ansible's fastest back-to-back configuration)
#
# Beside each mean: the SSH logins each host's sshd accepted per invocation (its log).
# A last fleet row runs the one host `a` alone (`--limit a`), the per-host cost without
# two other hosts sharing this machine's CPUs.
# Then the figures against the issue's targets: the fleet's overhead per host (a host's
# time in the fleet record, less the local run) at most one SSH connection setup, and
# the fleet at least 10x faster than Ansible. Each approach's count files are checked
# afterwards (5 lines per run, in step order, on every host), so a failure cannot pass
# for a fast run.
#
#   bash benches/fleet.sh
#   RUNS=10 WARMUP=2 bash benches/fleet.sh
#   RUNBOOK=path/to/static/runbook TESTKIT=path/to/runbook-testkit bash benches/fleet.sh
#                                             # prebuilt binaries: no cargo build
# Needs root, iproute2, openssh-server and -client, rsync, hyperfine, python3 (with
# venv and pip reachable, for ansible-core on the first run).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-5}
warmup=${WARMUP:-1}
if [ -z "${RUNBOOK:-}" ] || [ -z "${TESTKIT:-}" ]; then
  # A static build: the fleet installs this very engine on the hosts.
  RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --quiet \
    --target x86_64-unknown-linux-gnu --bin runbook --bin runbook-testkit
fi
runbook=${RUNBOOK:-$PWD/target/x86_64-unknown-linux-gnu/release/runbook}
testkit=${TESTKIT:-$PWD/target/x86_64-unknown-linux-gnu/release/runbook-testkit}
search="$PWD/benches/fleet/runbooks"
playbook="$PWD/benches/fleet/five.yml"

# ---------------------------------------------------------------- ansible-core
cache=${XDG_CACHE_HOME:-$HOME/.cache}/runbook-bench
venv="$cache/ansible-venv"
if [ ! -x "$venv/bin/ansible-playbook" ]; then
  echo "installing ansible-core into $venv"
  mkdir -p "$cache"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet ansible-core
fi
ansible_version=$("$venv/bin/ansible-playbook" --version) # (not through head: EPIPE)
ansible_version=${ansible_version%%$'\n'*}

work=$(mktemp -d)
mkdir -p "$work/json" "$work/logs" "$work/count" "$work/ansible/cp" "$work/ansible/tmp" \
  "$work/ansible/home"
names=(a b c)
declare -A host_pid host_fd

# ---------------------------------------------------------------- the three hosts
# Each host's stdin is a FIFO whose write end only this script holds: closing it (on
# exit, whatever the reason) tears that host down; `offsite-host down` removes what a
# crash of the testkit left. The testkits are all started before any write end is
# opened, so none holds another's.
close_masters() {
  local s
  for s in "$work/ansible/cp"/*; do
    [ -S "$s" ] && ssh -o ControlPath="$s" -O exit bench >/dev/null 2>&1
  done
  return 0
}
cleanup() {
  set +e
  close_masters
  local n fd
  for n in "${names[@]}"; do
    fd=${host_fd[$n]:-}
    if [ -n "$fd" ]; then exec {fd}>&-; fi
  done
  for n in "${names[@]}"; do
    if [ -n "${host_pid[$n]:-}" ]; then wait "${host_pid[$n]}" 2>/dev/null; fi
    "$testkit" offsite-host down --dir "$work/host-$n/sshd" >/dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT
for n in "${names[@]}"; do
  mkdir -p "$work/host-$n"
  mkfifo "$work/host-$n.stdin"
  "$testkit" offsite-host --dir "$work/host-$n/sshd" --until-stdin-closes \
    <"$work/host-$n.stdin" >"$work/host-$n.json" 2>"$work/host-$n.log" &
  host_pid[$n]=$!
done
for n in "${names[@]}"; do
  exec {fd}>"$work/host-$n.stdin"
  host_fd[$n]=$fd
done
declare -A address port user key known
for n in "${names[@]}"; do
  for _ in $(seq 600); do
    grep -q '}' "$work/host-$n.json" 2>/dev/null && break
    if ! kill -0 "${host_pid[$n]}" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if ! grep -q '}' "$work/host-$n.json" 2>/dev/null; then
    echo "FAIL: host $n did not start:" >&2
    cat "$work/host-$n.log" >&2
    exit 1
  fi
  IFS=$'\t' read -r address[$n] port[$n] user[$n] key[$n] known[$n] < <(python3 -c '
import json, sys
d = json.loads(open(sys.argv[1]).readline())
print("\t".join(str(d[k]) for k in ("host", "port", "user", "ssh_key", "known_hosts")))
' "$work/host-$n.json")
  echo "host $n: ${user[$n]}@${address[$n]}:${port[$n]}"
done

# The ssh options the engine's transport uses (key, verified host key, no prompts), so
# that `ssh true` and the sequential loop pay what the fleet pays for a connection.
ssh_opts() {
  local n=$1
  printf '%s\n' -F /dev/null -i "${key[$n]}" -o BatchMode=yes -o IdentitiesOnly=yes \
    -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=${known[$n]}" \
    -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=10 -o ServerAliveInterval=5 \
    -o ServerAliveCountMax=3 -o LogLevel=ERROR
}
ssh_to() { # ssh_to HOST REMOTE_WORDS...: the argv of an ssh to HOST
  local n=$1
  shift
  local -a o
  mapfile -t o < <(ssh_opts "$n")
  printf '%q ' ssh "${o[@]}" -p "${port[$n]}" "${user[$n]}@${address[$n]}" "$@"
}

# bench NAME RUNS WARMUP [hyperfine options...] -- COMMAND: one hyperfine measurement.
bench() {
  local name=$1 r=$2 w=$3
  shift 3
  local -a opts=()
  while [ "$1" != -- ]; do
    opts+=("$1")
    shift
  done
  shift
  local cmd
  cmd=$(printf '%q ' "$@")
  echo "== $name ($r runs, $w warmup)"
  local -a before=()
  for n in "${names[@]}"; do before+=("$(logins "$n")"); done
  if ! hyperfine -N --style basic --runs "$r" --warmup "$w" "${opts[@]}" \
    --export-json "$work/json/$name.json" --output "$work/logs/$name.log" \
    --command-name "$name" "$cmd"; then
    echo "FAIL: $name: $cmd" >&2
    echo "once more, with its output:" >&2
    eval "$cmd" 2>&1 | tail -30 >&2
    exit 1
  fi
  # The SSH logins each host's sshd accepted during it (warmup runs included).
  local i=0
  for n in "${names[@]}"; do
    printf '%s\t%s\t%s\n' "$name" "$(($(logins "$n") - before[i]))" $((r + w)) >>"$work/logins.tsv"
    i=$((i + 1))
  done
}
logins() { grep -c '^Accepted publickey' "$work/host-$1/sshd/sshd.log" || true; }

# check_lines FILE RUNS WHAT: FILE holds RUNS times the five steps' lines, in order.
check_lines() {
  python3 - "$@" <<'PY'
import sys
path, runs, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
try:
    lines = open(path).read().splitlines()
except FileNotFoundError:
    lines = []
want = ["one", "two", "three", "four", "five"] * runs
if lines != want:
    print(f"FAIL: {what}: {path} has {len(lines)} lines, expected {len(want)} "
          f"(five per run, in step order)", file=sys.stderr)
    sys.exit(1)
print(f"  ok: {what}: {path}: {len(lines)} lines ({runs} runs x 5 steps)")
PY
}

# ---------------------------------------------------------------- inventories
echo "hosts:" >"$work/hosts.yaml"
for n in "${names[@]}"; do
  cat >>"$work/hosts.yaml" <<EOF
  $n:
    address: "${address[$n]}"
    port: ${port[$n]}
    user: "${user[$n]}"
    ssh_key: "${key[$n]}"
    known_hosts: "${known[$n]}"
    dir: "$work/host-$n/fleet"
    vars: {count_file: "$work/count/fleet-$n"}
EOF
done
# The hosts share this machine's filesystem: the host's python3 is this one's.
if [ -x /usr/bin/python3 ]; then
  python=/usr/bin/python3
else
  python=$(python3 -c 'import sys; print(sys.executable)')
fi
{
  echo "bench:"
  echo "  hosts:"
  for n in "${names[@]}"; do
    cat <<EOF
    $n:
      ansible_host: "${address[$n]}"
      ansible_port: ${port[$n]}
      ansible_user: "${user[$n]}"
      ansible_ssh_private_key_file: "${key[$n]}"
      ansible_ssh_common_args: "-o UserKnownHostsFile=${known[$n]} -o StrictHostKeyChecking=yes -o BatchMode=yes -o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes"
      ansible_python_interpreter: "$python"
      count_file: "$work/count/ansible-$n"
EOF
  done
} >"$work/inventory.yaml"
export ANSIBLE_HOME="$work/ansible/home" ANSIBLE_LOCAL_TEMP="$work/ansible/tmp" \
  ANSIBLE_REMOTE_TEMP="$work/ansible/remote-tmp" ANSIBLE_SSH_CONTROL_PATH_DIR="$work/ansible/cp" \
  ANSIBLE_HOST_KEY_CHECKING=True ANSIBLE_RETRY_FILES_ENABLED=False ANSIBLE_NOCOLOR=1 \
  ANSIBLE_FORKS=3 ANSIBLE_CONFIG="$work/ansible/ansible.cfg"
: >"$work/ansible/ansible.cfg" # no ansible.cfg of this machine or of the cwd
cat >"$work/close-masters.sh" <<EOF
for s in "$work/ansible/cp"/*; do
  [ -S "\$s" ] && ssh -o ControlPath="\$s" -O exit bench >/dev/null 2>&1
done
exit 0
EOF

# ---------------------------------------------------------------- one connection, the work
load_before=$(cut -d' ' -f1 /proc/loadavg)
mapfile -t o < <(ssh_opts a)
bench ssh-true $((2 * runs)) "$warmup" -- ssh "${o[@]}" -p "${port[a]}" "${user[a]}@${address[a]}" true
# What sshd starts for every remote command: the user's login shell with `-c` (and
# SSH_CLIENT set, which makes bash read ~/.bashrc). The hosts share this machine's
# filesystem, so this is the same shell and rc files as theirs.
IFS=: read -r _ _ _ _ _ rhome rshell < <(getent passwd "${user[a]}")
bench remote-shell $((2 * runs)) "$warmup" -- env -i "HOME=$rhome" PATH=/usr/bin:/bin \
  "SSH_CLIENT=${address[a]} 40000 22" "$rshell" -c true
bench local "$runs" "$warmup" -- "$runbook" --path "$search" --state-dir "$work/local-state" \
  --format json run bench/five --yes --set "count_file=$work/count/local"
check_lines "$work/count/local" $((runs + warmup)) "local run"

# ---------------------------------------------------------------- the fleet
fleet=("$runbook" --path "$search" --state-dir "$work/controller" fleet run bench/five
  --hosts "$work/hosts.yaml" --parallel 3 --engine "$runbook")
# First runs: every host dir removed before each run (the engine, the runbook files,
# the host's journal). The warmup run also builds the controller's stage, once.
bench fleet-first "$runs" "$warmup" \
  --prepare "rm -rf $work/host-a/fleet $work/host-b/fleet $work/host-c/fleet" -- "${fleet[@]}"
"$runbook" --state-dir "$work/controller" fleet runs --format json >"$work/fleet-first-runs.json"
bench fleet-warm "$runs" "$warmup" -- "${fleet[@]}"
"$runbook" --state-dir "$work/controller" fleet runs --format json >"$work/fleet-warm-runs.json"
# One host alone (warm): what a host costs without two others sharing the CPUs.
bench fleet-one "$runs" "$warmup" -- "${fleet[@]}" --limit a
for n in "${names[@]}"; do
  k=2
  [ "$n" = a ] && k=3
  check_lines "$work/count/fleet-$n" $((k * (runs + warmup))) "fleet host $n"
done
"$runbook" --state-dir "$work/controller" fleet runs --format json >"$work/fleet-runs.json"
for id in $(python3 -c 'import json,sys; print(" ".join(r["id"] for r in json.load(open(sys.argv[1]))))' \
  "$work/fleet-runs.json"); do
  "$runbook" --state-dir "$work/controller" fleet show "$id" --format json >"$work/json/show-$id.json"
done
python3 - "$work/fleet-runs.json" $((3 * (runs + warmup))) <<'PY'
import json, sys
rows, want = json.load(open(sys.argv[1])), int(sys.argv[2])
bad = [r for r in rows if r["status"] != "succeeded"]
if len(rows) != want or bad:
    print(f"FAIL: fleet record: {len(rows)} fleet runs (expected {want}), not succeeded: {bad}",
          file=sys.stderr)
    sys.exit(1)
print(f"  ok: fleet record: {len(rows)} fleet runs, every one succeeded")
PY

# ---------------------------------------------------------------- sequential ssh
# The engine and the runbook put on each host by scp (its own dir, not the fleet's).
for n in "${names[@]}"; do
  mapfile -t o < <(ssh_opts "$n")
  d="$work/host-$n/seq"
  ssh "${o[@]}" -p "${port[$n]}" "${user[$n]}@${address[$n]}" mkdir -p "$d/bin" "$d/runbooks"
  scp -q "${o[@]}" -P "${port[$n]}" "$runbook" "${user[$n]}@${address[$n]}:$d/bin/runbook"
  scp -q -r "${o[@]}" -P "${port[$n]}" "$search/bench" "${user[$n]}@${address[$n]}:$d/runbooks/"
done
{
  echo "set -e"
  for n in "${names[@]}"; do
    d="$work/host-$n/seq"
    echo "$(ssh_to "$n" "$d/bin/runbook" --path "$d/runbooks" --state-dir "$d/state" --format json \
      run bench/five --yes --set "count_file=$work/count/seq-$n")"
  done
} >"$work/sequential.sh"
bench sequential "$runs" "$warmup" -- bash "$work/sequential.sh"
for n in "${names[@]}"; do
  check_lines "$work/count/seq-$n" $((runs + warmup)) "sequential host $n"
done

# ---------------------------------------------------------------- ansible
echo "$ansible_version (python $python on the hosts)"
bench ansible "$runs" "$warmup" --prepare "bash $work/close-masters.sh" -- \
  "$venv/bin/ansible-playbook" -i "$work/inventory.yaml" -f 3 "$playbook"
for n in "${names[@]}"; do
  check_lines "$work/count/ansible-$n" $((runs + warmup)) "ansible host $n"
  mv "$work/count/ansible-$n" "$work/count/ansible-default-$n"
done
bench ansible-best "$runs" "$warmup" -- env ANSIBLE_PIPELINING=True \
  "$venv/bin/ansible-playbook" -i "$work/inventory.yaml" -f 3 "$playbook"
for n in "${names[@]}"; do
  check_lines "$work/count/ansible-$n" $((runs + warmup)) "ansible (best case) host $n"
done

# ---------------------------------------------------------------- the table
python3 - "$work/json" "$work/fleet-runs.json" "$work/fleet-first-runs.json" \
  "$work/fleet-warm-runs.json" "$work/logins.tsv" "$runs" "$warmup" "$ansible_version" "$rshell" \
  "$load_before" <<'PY'
import collections, json, os, statistics, sys
jdir, runs_file, first_file, warm_file, logins_file = sys.argv[1:6]
runs, warmup, ansible_version, rshell = int(sys.argv[6]), int(sys.argv[7]), sys.argv[8], sys.argv[9]
load_before = sys.argv[10]
names = ["ssh-true", "remote-shell", "local", "fleet-first", "fleet-warm", "fleet-one", "sequential",
         "ansible", "ansible-best"]
res = {n: json.load(open(os.path.join(jdir, n + ".json")))["results"][0] for n in names}
labels = {
    "ssh-true": "ssh HOST true (one connection setup)",
    "remote-shell": f"{rshell} -c true as sshd starts it",
    "local": "runbook run, local (no ssh; the work)",
    "fleet-first": "fleet run, first (installs)",
    "fleet-warm": "fleet run, warm  [headline]",
    "fleet-one": "fleet run, warm, one host (--limit a)",
    "sequential": "ssh HOST runbook run, one by one",
    "ansible": "ansible-playbook, forks=3",
    "ansible-best": "ansible, pipelining, kept masters",
}
# SSH logins per host per invocation, from the hosts' sshd logs.
# (`ssh true` and the one-host fleet run log in to host a only; the local rows to none.)
logins = collections.defaultdict(list)
for i, line in enumerate(open(logins_file)):
    name, n, invocations = line.split("\t")
    if name not in ("local", "remote-shell") and (name not in ("ssh-true", "fleet-one") or i % 3 == 0):
        logins[name].append(int(n) / int(invocations))
ms = lambda s: s * 1000
print(f"\n3 hosts, 5 exec steps on each; wall time per invocation in ms (hyperfine: {runs} runs "
      f"after {warmup} warmup; {2 * runs} for the first two rows)")
print(f"{'':<40}{'mean':>9}{'sigma':>8}{'median':>9}{'min':>9}{'max':>9}{'logins/host':>13}")
for n, r in res.items():
    li = f"{statistics.mean(logins[n]):.2f}" if logins[n] else "-"
    print(f"{labels[n]:<40}{ms(r['mean']):>9.1f}{ms(r['stddev'] or 0):>8.1f}{ms(r['median']):>9.1f}"
          f"{ms(r['min']):>9.1f}{ms(r['max']):>9.1f}{li:>13}")
print(f"({ansible_version})")

warm, first = res["fleet-warm"]["mean"], res["fleet-first"]["mean"]
ssh, local, shell = res["ssh-true"]["mean"], res["local"]["mean"], res["remote-shell"]["mean"]
# Each host's duration as the controller recorded it, over every fleet run (warmups too);
# first runs told from warm ones by the listing taken between the two.
first_ids = {r["id"] for r in json.load(open(first_file))}
warm_ids = {r["id"] for r in json.load(open(warm_file))} - first_ids
all_ids = [r["id"] for r in json.load(open(runs_file))]
def hosts_of(ids):
    return [[h["duration_secs"] for h in json.load(open(os.path.join(jdir, f"show-{i}.json")))["hosts"]]
            for i in ids]
warm_hosts = hosts_of([i for i in all_ids if i in warm_ids])
first_hosts = hosts_of([i for i in all_ids if i in first_ids])
one_hosts = hosts_of([i for i in all_ids if i not in warm_ids | first_ids])
host_warm = statistics.mean(d for run in warm_hosts for d in run)
host_one = statistics.mean(d for run in one_hosts for d in run)
host_first = statistics.mean(d for run in first_hosts for d in run)
slowest = statistics.mean(max(run) for run in warm_hosts)

print("\nratios (mean wall time)")
for a, b in [("sequential", "fleet-warm"), ("ansible", "fleet-warm"), ("ansible-best", "fleet-warm"),
             ("ansible", "fleet-first"), ("fleet-first", "fleet-warm"), ("fleet-warm", "ssh-true")]:
    print(f"  {a + ' / ' + b:<28}{res[a]['mean'] / res[b]['mean']:>8.2f}x")

print(f"\nper host, warm (host times from the fleet record: {len(warm_hosts)} runs x 3 hosts)")
print(f"  a host's time in the fleet record:      {ms(host_warm):8.1f} ms")
print(f"  less the local run = overhead per host: {ms(host_warm - local):8.1f} ms")
print(f"  one SSH connection setup (ssh true):    {ms(ssh):8.1f} ms "
      f"(of which the remote shell's start: {ms(shell):.1f} ms)")
print(f"  fleet wall time less the local run:     {ms(warm - local):8.1f} ms (hosts in parallel)")
print(f"  controller around the slowest host:     {ms(warm - slowest):8.1f} ms (wall - slowest host)")
print(f"  sequential, per host (mean / 3):        {ms(res['sequential']['mean'] / 3):8.1f} ms")
print(f"  one host alone, its time in the record: {ms(host_one):8.1f} ms "
      f"(less the local run: {ms(host_one - local):.1f} ms)")
print(f"  first run, a host's time in the record: {ms(host_first):8.1f} ms "
      f"(installing: +{ms(host_first - host_warm):.1f} ms)")

print("\ntargets (the issue's)")
over = host_warm - local
print(f"  fleet overhead per host <= one SSH connection setup: {ms(over):.1f} ms vs {ms(ssh):.1f} ms: "
      + ("MET" if over <= ssh else f"NOT MET ({over / ssh:.2f}x)"))
wall_over = warm - local
print(f"    (other readings: the fleet's wall time less the local run, {ms(wall_over):.1f} ms: "
      + ("met" if wall_over <= ssh else f"not met, {wall_over / ssh:.2f}x")
      + f"; that spread over the 3 hosts, {ms(wall_over / 3):.1f} ms: "
      + ("met" if wall_over / 3 <= ssh else f"not met, {wall_over / 3 / ssh:.2f}x")
      + f"; one host alone, {ms(host_one - local):.1f} ms: "
      + ("met" if host_one - local <= ssh else f"not met, {(host_one - local) / ssh:.2f}x") + ")")
r = res["ansible"]["mean"] / warm
print(f"  fleet >= 10x faster than Ansible (its defaults): {r:.2f}x: " + ("MET" if r >= 10 else "NOT MET"))
r = res["ansible-best"]["mean"] / warm
print(f"    (against Ansible's best case, pipelining and kept masters: {r:.2f}x: "
      + ("met" if r >= 10 else "not met") + ")")
print(f"\nload average: {load_before} before, {open('/proc/loadavg').read().split()[0]} after "
      f"({os.cpu_count()} CPUs); the three hosts and the controller share them")
if shell > 0.25 * ssh:
    print(f"\nnote: every remote command here pays {ms(shell):.0f} ms for {rshell} to start "
          f"({rshell} -c with SSH_CLIENT set reads the user's rc files), {100 * shell / ssh:.0f}% of "
          f"`ssh true`; the approaches that run more commands per host pay it more often.")
PY
