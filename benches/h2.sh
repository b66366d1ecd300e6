#!/usr/bin/env bash
# HTTP/2 over TLS 1.3 beside nginx and HAProxy (../shared/bench/h2.sh), with the per-client request cap raised
# for h2load's 512 streams in flight from one address (benches/portcullis-h2.toml.in). Needs a release build.
#   benches/h2.sh [TARGET ...]        # default: N-h2 GW-h2 GW-h2-plain H1-h2
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
"$root/../shared/bench/setup.sh" >/dev/null
GATEWAY_BIN=${GATEWAY_BIN:-$root/target/release/portcullis} \
  GATEWAY_CONFIG_TEMPLATE=$here/portcullis-h2.toml.in \
  exec "$root/../shared/bench/h2.sh" "$@"
