#!/usr/bin/env bash
# What rate limiting costs on the request path: target GW of ../shared/bench (RS256 + role rule, one worker) with
# and without a global per-IP limit and a per-subject route limit that are checked on every request but never hit.
# Runs alternate (ROUNDS pairs); compare req/s and the gateway's own CPU µs per request.
#   benches/limits.sh            # 3 pairs of 10 s runs, loopback only
# Needs the shared bench harness in ../shared/bench, outside this repository, through benches/ab.sh (which says so
# when it is missing).
exec "$(dirname "$0")/ab.sh" GW limits without - with "$(cd "$(dirname "$0")" && pwd)/portcullis-limits.toml.in"
