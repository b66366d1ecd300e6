#!/usr/bin/env bash
# What access logging costs on the request path: target GW-plain of ../shared/bench (one worker, plain proxy) with
# the access log off ([server] access_log = false) and on (the default: text lines to stderr, buffered per thread).
# Runs alternate (ROUNDS pairs); compare req/s and the gateway's own CPU µs per request.
#   benches/observability.sh     # 3 pairs of 10 s runs, loopback only
# Needs the shared bench harness in ../shared/bench, outside this repository, through benches/ab.sh (which says so
# when it is missing).
exec "$(dirname "$0")/ab.sh" GW-plain access-log off "$(cd "$(dirname "$0")" && pwd)/portcullis-nolog.toml.in" on -
