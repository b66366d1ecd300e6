#!/usr/bin/env bash
# Portcullis at its defaults beside nginx made to do the same work (benches/nginx-same-work.conf.in: the same
# forwarding fields, request id, secure headers and an access line per request), in interleaved rounds with
# benches/paired.sh; ratios are to NW. The harness's own nginx (N) runs too, as the reference the issue names.
#   ROUNDS=20 benches/same-work.sh        (loopback only; each round is bounded by wrk -d)
# Needs the shared bench harness in ../shared/bench, outside this repository (BENCH=DIR points elsewhere). The
# harness is not changed: it is copied to a temporary directory and target NW is added to the copy. Results go
# under $BENCH_STATE (~/.cache/portcullis-bench), through benches/paired.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${BENCH:-../shared/bench}
[[ -x $SRC/run.sh ]] || { echo "$0: needs the shared bench harness at $SRC (../shared/bench beside this repository, or set BENCH=DIR)" >&2; exit 1; }
COPY=$(mktemp -d)
trap 'rm -rf "$COPY"' EXIT
cp -r "$SRC/." "$COPY/"
cp benches/nginx-same-work.conf.in "$COPY/conf/"
cat >"$COPY/targets/NW.sh" <<'TARGET'
# NW: nginx doing Portcullis's default work (added by benches/same-work.sh).
DESC="nginx, Portcullis's default work"
PORT=18087
TOKEN=none
prepare() {
  mkdir -p "$RUN/$NAME.tmp"
  render "$BENCH/conf/nginx-same-work.conf.in" "$RUN/$NAME.conf"
}
CMD=(nginx -p "$RUN" -c "$RUN/$NAME.conf" -g 'daemon off;')
TARGET
BENCH=$COPY benches/paired.sh NW GW-plain N
