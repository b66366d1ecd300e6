#!/usr/bin/env bash
# Interleaved ../shared/bench rounds (BASE, then each TARGET, ROUNDS times, one 10 s round each), then each
# target's per-round ratios to BASE with benches/paired.py. Each round's access log is deleted as soon as it
# is measured (a GW round writes ~150 MB of it).
#   ROUNDS=20 benches/paired.sh [BASE TARGET...]     (defaults: N GW-plain; GATEWAY_CONFIG_TEMPLATE is honoured)
# Needs the shared bench harness in ../shared/bench, outside this repository (BENCH=DIR points elsewhere); it runs
# its setup.sh (installs nginx, HAProxy, wrk) and writes results under $BENCH_STATE (~/.cache/portcullis-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[[ $# -ge 2 ]] || targets=(N GW-plain)
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "$0: needs the shared bench harness at $BENCH (../shared/bench beside this repository, or set BENCH=DIR)" >&2; exit 1; }
"$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
OUT=${BENCH_STATE:-$HOME/.cache/portcullis-bench}/results/paired-$(date +%Y%m%d-%H%M%S)
for i in $(seq "${ROUNDS:-20}"); do
  for t in "${targets[@]}"; do
    ROUNDS=1 OUT=$OUT/$t-$i GATEWAY_BIN=$PWD/target/release/portcullis "$BENCH/run.sh" bench "$t" >/dev/null
    find "$OUT/$t-$i" -name "*.log" -size +1M -delete
    echo "round $i $t: $(grep "^| $t " "$OUT/$t-$i/summary.md" | awk -F'|' '{print $5 "req/s, p99" $8 "ms," $11 "µs CPU/req"}')"
  done
done
python3 benches/paired.py "$OUT" "${targets[@]}" | tee "$OUT/paired.md"
