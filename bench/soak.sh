#!/usr/bin/env bash
# Soak: thousands of idle and slow connections on every protocol (NBD, admin HTTP, node RPC) of a
# 3-node pool while a verifying fio workload runs. Prints the workload's p99 latency without and
# with the connection flood (as a ratio: it should stay within 2x), what the flood held open, and
# every node's peak RSS (documented bound in docs/benchmarks.md).
#
# Usage: bench/soak.sh [CONNECTIONS_PER_KIND] [SECONDS]   (defaults 1000 and 20; needs fio, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PER_KIND="${1:-1000}"
RUNTIME="${2:-20}"
cargo build --quiet --release -p cairn-cli --bin cairn
CAIRN="$PWD/target/release/cairn"
WORK="$(mktemp -d "$PWD/target/bench-soak.XXXXXX")"
PORT_BASE=$(( 20000 + RANDOM % 4000 * 2 ))
cleanup() {
  [ -n "${FLOOD_PID:-}" ] && kill "$FLOOD_PID" 2>/dev/null || true
  [ -n "${RSS_PID:-}" ] && kill "$RSS_PID" 2>/dev/null || true
  [ -n "${UP_PID:-}" ] && kill -INT "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

"$CAIRN" up --dir "$WORK/pool" --nodes 3 --port-base "$PORT_BASE" > "$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 300); do grep -q "pool is up" "$WORK/up.log" 2>/dev/null && break; sleep 0.2; done
grep -q "pool is up" "$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }
API="127.0.0.1:$((PORT_BASE + 2))"
"$CAIRN" --addr "$API" volume create soak --size 1G > /dev/null 2>&1
NBD="127.0.0.1:$((PORT_BASE + 1))"
PIDS=$(python3 -c "import json; print(' '.join(str(n['pid']) for n in json.load(open('$WORK/pool/pool.json'))['nodes']))")

# The workload: 4 KiB random writes and reads at QD8 with every block verified (crc32c) as read.
workload() {
  fio --name=soak --ioengine=nbd --uri="nbd://$NBD/soak" --size=256M --rw=randrw --bs=4k --iodepth=8 \
      --verify=crc32c --verify_fatal=1 --runtime="$RUNTIME" --time_based --ramp_time=1 \
      --output-format=json > "$WORK/$1.json" 2> "$WORK/$1.err" \
    || { echo "fio failed ($1):"; cat "$WORK/$1.err"; exit 1; }
}
p99() {
  python3 - "$WORK/$1.json" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
out = []
for side in ("read", "write"):
    s = job[side]
    out.append(f"{s['iops']:.0f} {s['clat_ns'].get('percentile', {}).get('99.000000', 0) / 1000:.0f}")
print(" ".join(out))
PY
}

workload baseline
read -r B_RIOPS B_RP99 B_WIOPS B_WP99 <<< "$(p99 baseline)"

# Peak RSS of every node, sampled every 200 ms.
( while true; do
    for p in $PIDS; do awk -v p="$p" '/VmRSS/ {print p, $2}' "/proc/$p/status" 2>/dev/null; done
    sleep 0.2
  done > "$WORK/rss.txt" ) &
RSS_PID=$!

# The flood, on every node: idle NBD connections past the handshake, NBD handshakes left
# half-done, idle and half-sent HTTP requests, RPC connections that never say hello. Whatever a
# node closes (caps, handshake timeouts) is reopened at once, so the pressure stays on.
python3 - "$PORT_BASE" "$PER_KIND" "$WORK/flood.txt" <<'PY' &
import socket, struct, sys, time, selectors
base, per_kind, report = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
nodes = [base, base + 10, base + 20]
sel = selectors.DefaultSelector()
held = {"nbd-idle": 0, "nbd-half": 0, "http-idle": 0, "http-half": 0, "rpc-silent": 0}
reopened = 0

def nbd_idle(port):
    s = socket.create_connection(("127.0.0.1", port + 1), timeout=5)
    s.recv(18)
    s.sendall(struct.pack(">I", 3))
    opt = struct.pack(">QII", 0x49484156454F5054, 1, 4) + b"soak"
    s.sendall(opt)
    s.recv(10)
    return s

def open_one(kind, port):
    if kind == "nbd-idle":
        return nbd_idle(port)
    if kind == "nbd-half":
        return socket.create_connection(("127.0.0.1", port + 1), timeout=5)
    if kind == "http-idle":
        s = socket.create_connection(("127.0.0.1", port + 2), timeout=5)
        return s
    if kind == "http-half":
        s = socket.create_connection(("127.0.0.1", port + 2), timeout=5)
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        return s
    return socket.create_connection(("127.0.0.1", port), timeout=5)

for kind in held:
    for i in range(per_kind):
        port = nodes[i % 3]
        try:
            s = open_one(kind, port)
        except OSError:
            continue
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, (kind, port))
        held[kind] += 1
end = time.time() + 3600
while time.time() < end:
    for key, _ in sel.select(timeout=1):
        kind, port = key.data
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if data:
            continue
        sel.unregister(key.fileobj)
        key.fileobj.close()
        try:
            s = open_one(kind, port)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, (kind, port))
            reopened += 1
        except OSError:
            held[kind] -= 1
    with open(report, "w") as f:
        f.write(" ".join(f"{k}={v}" for k, v in held.items()) + f" reopened={reopened}\n")
PY
FLOOD_PID=$!
sleep 3

workload flood
read -r F_RIOPS F_RP99 F_WIOPS F_WP99 <<< "$(p99 flood)"
kill "$RSS_PID" 2>/dev/null || true
RSS_PID=""

echo "soak: $PER_KIND connections of each kind spread over 3 nodes, fio randrw 4 KiB QD8 with crc32c verify, ${RUNTIME} s"
echo "flood held: $(cat "$WORK/flood.txt" 2>/dev/null || echo n/a)"
python3 - "$B_RIOPS" "$B_RP99" "$B_WIOPS" "$B_WP99" "$F_RIOPS" "$F_RP99" "$F_WIOPS" "$F_WP99" <<'PY'
import sys
br, brp, bw, bwp, fr, frp, fw, fwp = map(float, sys.argv[1:9])
print(f"{'run':<10} {'read IOPS':>10} {'read p99 µs':>12} {'write IOPS':>11} {'write p99 µs':>13}")
print(f"{'baseline':<10} {br:>10.0f} {brp:>12.0f} {bw:>11.0f} {bwp:>13.0f}")
print(f"{'flood':<10} {fr:>10.0f} {frp:>12.0f} {fw:>11.0f} {fwp:>13.0f}")
print(f"{'ratio':<10} {fr / br:>10.2f} {frp / brp:>12.2f} {fw / bw:>11.2f} {fwp / bwp:>13.2f}")
PY
python3 - "$WORK/rss.txt" <<'PY'
import sys, collections
peak = collections.defaultdict(int)
for line in open(sys.argv[1]):
    pid, kb = line.split()
    peak[pid] = max(peak[pid], int(kb))
print("peak RSS per node (MiB): " + ", ".join(f"pid {p}: {kb // 1024}" for p, kb in sorted(peak.items())))
PY
