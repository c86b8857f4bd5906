#!/usr/bin/env bash
# Chunk-store microbenchmark: 4 KiB random writes with a flush every 64 writes, and 4 KiB random
# reads, single process, single thread, against a raw file on the same disk measured in the same run.
# Usage: bench/store.sh [DIR] [OPS]   (DIR: where to put the files, default ./target; OPS default 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet --release -p cairn-store --example store_bench -- "${1:-target}" "${2:-20000}"
