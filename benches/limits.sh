#!/usr/bin/env bash
# What rate limiting costs on the request path: target GW of ../shared/bench (RS256 + role rule, one worker) with
# and without a global per-IP limit and a per-subject route limit that are checked on every request but never hit.
# Runs alternate (ROUNDS pairs); compare req/s and the gateway's own CPU µs per request.
#   benches/limits.sh            # 3 pairs of 10 s runs, loopback only
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "no harness at $BENCH"; exit 1; }
"$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
STATE=${BENCH_STATE:-$HOME/.cache/portcullis-bench}
OUT=$STATE/results/limits-$(date +%Y%m%d-%H%M%S)
for i in $(seq "${ROUNDS:-3}"); do
  for variant in without with; do
    tpl=$BENCH/conf/portcullis.toml.in
    [[ $variant == with ]] && tpl=$PWD/benches/portcullis-limits.toml.in
    GATEWAY_CONFIG_TEMPLATE=$tpl ROUNDS=1 OUT=$OUT/$variant-$i GATEWAY_BIN=$PWD/target/release/portcullis \
      "$BENCH/run.sh" bench GW >/dev/null
    row=$(grep '^| GW ' "$OUT/$variant-$i/summary.md")
    echo "$variant limits, run $i: $(awk -F'|' '{gsub(/ /,"",$5); gsub(/ /,"",$11); print $5 " req/s, " $11 " µs CPU/req"}' <<<"$row")"
  done
done | tee "$OUT.txt"
