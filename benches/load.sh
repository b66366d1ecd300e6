#!/usr/bin/env bash
# Whole-request load benchmark: a small GET directly against the upstream and through Portcullis (plain proxy,
# TLS keep-alive, RS256 token on a protected route), with nginx and HAProxy beside it, one worker each, loopback
# only. Uses the side-by-side harness in ../shared/bench (wrk, nginx, HAProxy from Debian).
#   benches/load.sh                      # default targets
#   ROUNDS=5 benches/load.sh U N H0 GW-plain GW
# Needs the shared bench harness in ../shared/bench, outside this repository (BENCH=DIR points elsewhere); it runs
# its setup.sh (installs nginx, HAProxy, wrk) and writes results under $BENCH_STATE (~/.cache/portcullis-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "$0: needs the shared bench harness at $BENCH (../shared/bench beside this repository, or set BENCH=DIR)" >&2; exit 1; }
"$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(U N H0 GW-plain N-tls-ka GW-tls-ka H1 H2 H3 GW GW-es256 GW-hs256)
GATEWAY_BIN=$PWD/target/release/portcullis "$BENCH/run.sh" bench "${targets[@]}"
