#!/usr/bin/env bash
# NBD benchmark: fio's nbd engine against (a) Cairn, 3 nodes, replicas=3, (b) Cairn, replicas=1, and
# (c) qemu-nbd serving a raw file on the same disk, all in the same run. Prints IOPS, bandwidth, mean
# and p99 completion latency, and each Cairn row's IOPS as a ratio of qemu-nbd's.
#
# Usage: bench/nbd.sh [SECONDS_PER_JOB]      (default 8; needs fio, qemu-nbd, python3)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME="${1:-8}"
SIZE_MB=1024
cargo build --quiet --release -p cairn-cli --bin cairn --example stages
CAIRN="$PWD/target/release/cairn"
WORK="$(mktemp -d "$PWD/target/bench-nbd.XXXXXX")"
PORT_BASE=$(( 30000 + RANDOM % 5000 * 2 ))
QPORT=$(( PORT_BASE + 100 ))
cleanup() {
  [ -n "${UP_PID:-}" ] && kill -INT "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null || true
  [ -n "${QNBD_PID:-}" ] && kill "$QNBD_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

"$CAIRN" up --dir "$WORK/pool" --nodes 3 --port-base "$PORT_BASE" > "$WORK/up.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 300); do grep -q "pool is up" "$WORK/up.log" 2>/dev/null && break; sleep 0.2; done
grep -q "pool is up" "$WORK/up.log" || { cat "$WORK/up.log"; exit 1; }
API="127.0.0.1:$((PORT_BASE + 2))"
"$CAIRN" --addr "$API" volume create r3 --size "${SIZE_MB}M" --replicas 3 > /dev/null
"$CAIRN" --addr "$API" volume create r1 --size "${SIZE_MB}M" --replicas 1 > /dev/null
NBD="127.0.0.1:$((PORT_BASE + 1))"

truncate -s "${SIZE_MB}M" "$WORK/raw.img"
qemu-nbd -f raw -t -p "$QPORT" -b 127.0.0.1 -x raw "$WORK/raw.img" &
QNBD_PID=$!
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$QPORT) 2>/dev/null && break; sleep 0.1; done

echo "per-stage latency of the 4 KiB path (node RPC, store, volume client; see crates/cairn-cli/examples/stages.rs):"
"$PWD/target/release/examples/stages" "$API" r3 3000
"$PWD/target/release/examples/stages" "$API" r1 3000 | tail -2
echo

JOBS=(
  "seqwrite-1M-qd4 --rw=write --bs=1M --iodepth=4"
  "seqread-1M-qd4 --rw=read --bs=1M --iodepth=4"
  "randwrite-4K-qd1 --rw=randwrite --bs=4k --iodepth=1"
  "randwrite-4K-qd32 --rw=randwrite --bs=4k --iodepth=32"
  "randread-4K-qd1 --rw=randread --bs=4k --iodepth=1"
  "randread-4K-qd32 --rw=randread --bs=4k --iodepth=32"
)
TARGETS=(
  "cairn-r3 nbd://$NBD/r3"
  "cairn-r1 nbd://$NBD/r1"
  "qemu-nbd nbd://127.0.0.1:$QPORT/raw"
)
RESULTS="$WORK/results.txt"
: > "$RESULTS"
for t in "${TARGETS[@]}"; do
  set -- $t; TNAME=$1; URI=$2
  for j in "${JOBS[@]}"; do
    set -- $j; JNAME=$1; shift
    fio --name="$JNAME" --ioengine=nbd --uri="$URI" --size="${SIZE_MB}M" --runtime="$RUNTIME" --time_based \
        --ramp_time=1 --group_reporting --output-format=json "$@" > "$WORK/out.json" 2> "$WORK/fio.err" \
      || { echo "fio failed on $TNAME $JNAME:"; cat "$WORK/fio.err"; exit 1; }
    python3 - "$TNAME" "$JNAME" "$WORK/out.json" >> "$RESULTS" <<'PY'
import json, sys
t, j, path = sys.argv[1:4]
text = open(path).read()
job = json.loads(text[text.index("{"):])["jobs"][0]  # fio prints a line before the JSON
side = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
clat = side["clat_ns"]
p99 = clat.get("percentile", {}).get("99.000000", 0) / 1000
print(t, j, round(side["iops"]), round(side["bw"] / 1024, 1), round(clat["mean"] / 1000, 1), round(p99, 1))
PY
  done
done

python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
base = {r[1]: float(r[2]) for r in rows if r[0] == "qemu-nbd"}
print(f"{'target':<10} {'job':<18} {'IOPS':>9} {'MiB/s':>8} {'mean µs':>9} {'p99 µs':>9} {'vs qemu-nbd':>12}")
for t, j, iops, bw, mean, p99 in rows:
    ratio = float(iops) / base[j] if base.get(j) else 0
    print(f"{t:<10} {j:<18} {iops:>9} {bw:>8} {mean:>9} {p99:>9} {ratio:>12.2f}")
PY

# The local fast path is on the path when node 1's NBD server handled requests in-process.
HTTP1="127.0.0.1:$((PORT_BASE + 2))"
python3 - "$HTTP1" <<'PY' || true
import json, sys, urllib.request
status = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/v1/status"))
print(f"node 1 handled {status.get('local_requests', 'n/a')} requests in-process (local fast path)")
PY
