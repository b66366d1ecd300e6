#!/usr/bin/env bash
# What access logging costs on the request path: target GW-plain of ../shared/bench (one worker, plain proxy) with
# the access log on (the default: text lines to stderr, buffered per thread) and off ([server] access_log = false).
# Runs alternate (ROUNDS pairs); compare req/s and the gateway's own CPU µs per request.
#   benches/observability.sh     # 3 pairs of 10 s runs, loopback only
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "no harness at $BENCH"; exit 1; }
"$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
STATE=${BENCH_STATE:-$HOME/.cache/portcullis-bench}
OUT=$STATE/results/observability-$(date +%Y%m%d-%H%M%S)
for i in $(seq "${ROUNDS:-3}"); do
  for variant in off on; do
    tpl=$BENCH/conf/portcullis.toml.in
    [[ $variant == off ]] && tpl=$PWD/benches/portcullis-nolog.toml.in
    GATEWAY_CONFIG_TEMPLATE=$tpl ROUNDS=1 OUT=$OUT/$variant-$i GATEWAY_BIN=$PWD/target/release/portcullis \
      "$BENCH/run.sh" bench GW-plain >/dev/null
    row=$(grep '^| GW-plain ' "$OUT/$variant-$i/summary.md")
    echo "access log $variant, run $i: $(awk -F'|' '{gsub(/ /,"",$5); gsub(/ /,"",$11); print $5 " req/s, " $11 " µs CPU/req"}' <<<"$row")"
  done
done | tee "$OUT.txt"
