#!/usr/bin/env bash
# The AtoCore stand-in must start fast: the drill restarts it several times. Prints
# hyperfine's figures for building a sandbox, and, over 30 starts of the stand-in on a
# default sandbox: spawn -> `listening` line, spawn -> first 200 from /health (the
# first request runs `PRAGMA quick_check` over the whole database), and SIGTERM ->
# exit. The target is under 100 ms to a healthy answer.
#
#   bash benches/standin-start.sh            # release build
#   PROFILE=debug bash benches/standin-start.sh
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
  cargo build --release --quiet --bin runbook-testkit
else
  cargo build --quiet --bin runbook-testkit
fi
bin="$PWD/target/$profile/runbook-testkit"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "profile: $profile"
if command -v hyperfine >/dev/null; then
  hyperfine --warmup 1 --runs 5 -N \
    --prepare "rm -rf $work/sb" \
    "$bin atocore-sandbox $work/sb --seed 1"
fi
rm -rf "$work/sb"
"$bin" atocore-sandbox "$work/sb" --seed 1
python3 - "$bin" "$work/sb/srv/storage/atocore" <<'PY'
import socket, statistics, subprocess, sys, time
bin, root = sys.argv[1], sys.argv[2]

def get(port, path):
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split()[1])

listen, healthy, stop = [], [], []
for _ in range(30):
    t0 = time.perf_counter()
    p = subprocess.Popen([bin, "atocore-standin", "--root", root, "--listen", "127.0.0.1:0"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    port = int(p.stdout.readline().decode().rsplit(":", 1)[1])
    t1 = time.perf_counter()
    assert get(port, "/health") == 200
    t2 = time.perf_counter()
    p.terminate()
    assert p.wait() == 0
    t3 = time.perf_counter()
    listen.append(t1 - t0); healthy.append(t2 - t0); stop.append(t3 - t2)

def row(name, xs):
    ms = sorted(x * 1000 for x in xs)
    print(f"{name:<28} median {statistics.median(ms):7.1f} ms   min {ms[0]:7.1f}   max {ms[-1]:7.1f}")
row("spawn -> listening", listen)
row("spawn -> /health 200", healthy)
row("SIGTERM -> exit", stop)
share = statistics.median(listen) / statistics.median(healthy)
print(f"listening is {share:.0%} of the time to the first healthy answer")
PY
