#!/usr/bin/env bash
# The engine-foundation benchmark set: compare-fio for each workload of docs/benchmarks.md,
# side by side with fio in one run, printed as one markdown row per workload.
# usage: bench/benchmarks.sh [DATA_DIR (default /var/tmp/tandem-bench)] [ROUNDS (3)] [RUNTIME_S (15)]
# The data file is 4 GiB, written once through Tandem before the first round, as fio's anchor
# does (reads of never-written extents never reach the device).
set -euo pipefail
dir=${1:-/var/tmp/tandem-bench}
rounds=${2:-3}
runtime=${3:-15}
mkdir -p "$dir"
cd "$(dirname "$0")/.."
cargo build --release -q -p tandem-bench
bin=target/release/tandem-bench
file="$dir/bench-a.dat"
common=(--filename="$file" --size=4G --runtime="$runtime" --time_based --ramp_time=2 --direct=1)
declare -A jobs=(
  [randread-4k-qd32]="--rw=randread --bs=4k --iodepth=32"
  [randwrite-4k-qd32]="--rw=randwrite --bs=4k --iodepth=32"
  [read-1m-qd16]="--rw=read --bs=1M --iodepth=16"
  [write-1m-qd16]="--rw=write --bs=1M --iodepth=16"
  [randread-4k-qd1]="--rw=randread --bs=4k --iodepth=1"
)
order=(randread-4k-qd32 randwrite-4k-qd32 read-1m-qd16 write-1m-qd16 randread-4k-qd1)
echo "| workload | fio IOPS | tandem IOPS | IOPS ratio | MiB/s ratio | p50 ratio | p99 ratio | CPU/IO ratio | spread (tandem IOPS min-max) |"
echo "|---|---|---|---|---|---|---|---|---|"
row() {
  python3 -c '
import json, sys
j = json.load(sys.stdin); r = j["ratios"]; f = j["fio"]; t = j["tandem"]
print("| %s | %.0f | %.0f | %.2fx | %.2fx | %.2fx | %.2fx | %.2fx | %.0f-%.0f |" % (sys.argv[1],
      f["iops"]["mean"], t["iops"]["mean"], r["iops"], r["mib_per_s"], r["clat_p50_us"], r["clat_p99_us"],
      r["cpu_us_per_io"], t["iops"]["min"], t["iops"]["max"]))' "$1"
}
for name in "${order[@]}"; do
  # shellcheck disable=SC2086
  "$bin" compare-fio --rounds="$rounds" --output-format=json --name="$name" "${common[@]}" ${jobs[$name]} 2>/dev/null | row "$name"
done
"$bin" compare-fio --rounds="$rounds" --output-format=json --name=null-4k-qd32 --ioengine=null --size=4G \
  --rw=randread --bs=4k --iodepth=32 --runtime="$runtime" --time_based --ramp_time=2 2>/dev/null | row null-4k-qd32
