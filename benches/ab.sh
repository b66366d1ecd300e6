#!/usr/bin/env bash
# A/B runs of one ../shared/bench target with two gateway config templates, alternating (ROUNDS pairs), printing
# req/s, p99 and the gateway's own CPU µs per request for each run. Used by limits.sh and observability.sh.
#   benches/ab.sh TARGET NAME LABEL_A TEMPLATE_A LABEL_B TEMPLATE_B   ("-" = the harness's own template)
# Needs the shared bench harness in ../shared/bench, outside this repository (BENCH=DIR points elsewhere); it runs
# its setup.sh (installs nginx, HAProxy, wrk) and writes results under $BENCH_STATE (~/.cache/portcullis-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -eq 6 ]] || { echo "usage: $0 TARGET NAME LABEL_A TEMPLATE_A LABEL_B TEMPLATE_B"; exit 2; }
target=$1 name=$2
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "$0: needs the shared bench harness at $BENCH (../shared/bench beside this repository, or set BENCH=DIR)" >&2; exit 1; }
"$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
STATE=${BENCH_STATE:-$HOME/.cache/portcullis-bench}
OUT=$STATE/results/$name-$(date +%Y%m%d-%H%M%S)
for i in $(seq "${ROUNDS:-3}"); do
  for side in "$3=$4" "$5=$6"; do
    label=${side%%=*} tpl=${side#*=}
    [[ $tpl == - ]] && tpl=$BENCH/conf/portcullis.toml.in
    GATEWAY_CONFIG_TEMPLATE=$tpl ROUNDS=1 OUT=$OUT/$label-$i GATEWAY_BIN=$PWD/target/release/portcullis \
      "$BENCH/run.sh" bench "$target" >/dev/null
    row=$(grep "^| $target " "$OUT/$label-$i/summary.md")
    echo "$name $label, run $i: $(awk -F'|' '{gsub(/ /,"",$5); gsub(/ /,"",$8); gsub(/ /,"",$11); print $5 " req/s, p99 " $8 " ms, " $11 " µs CPU/req"}' <<<"$row")"
  done
done | tee "$OUT.txt"
