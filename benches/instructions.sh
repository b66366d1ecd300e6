#!/usr/bin/env bash
# User-space instructions per proxied request (callgrind: deterministic, unlike timings on a shared VM), Portcullis
# beside nginx as plain proxies of one worker in front of the same nginx upstream, with the harness's settings.
#   benches/instructions.sh            # needs valgrind, nginx and wrk (../shared/bench/setup.sh installs the last two)
#   ACCESS_LOG=false benches/instructions.sh   # Portcullis without its access line (nginx runs without one)
#   TRACING=1 benches/instructions.sh          # with [tracing], every request sampled, spans POSTed to the upstream
#   GATEWAY_BIN=/tmp/old/portcullis benches/instructions.sh   # another build, not rebuilt
#   TARGETS=3 benches/instructions.sh          # the upstream as a pool of 3 targets (round robin), nginx too
# Loopback only; each target runs 2 s of warm-up and 5 s measured under valgrind, then stops.
# Outside this repository it uses the system's valgrind, nginx and wrk, a temporary directory, and loopback ports
# 18380-18382; it does not need ../shared/bench.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_annotate callgrind_control nginx wrk; do
    command -v "$tool" >/dev/null || { echo "needs $tool"; exit 1; }
done
if [ -z "${GATEWAY_BIN:-}" ]; then # GATEWAY_BIN=/path/to/portcullis compares another build
    cargo build -q --release --locked --bin portcullis
fi
BIN=${GATEWAY_BIN:-$PWD/target/release/portcullis}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
UP=18380 N=18381 GW=18382

nginx_conf() { # name, listen port, location body[, more listen lines]
    mkdir -p "$DIR/$1.tmp"
    cat >"$DIR/$1.conf" <<EOF
worker_processes 1;
pid $DIR/$1.pid;
error_log $DIR/$1.error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path $DIR/$1.tmp/body;
    proxy_temp_path $DIR/$1.tmp/proxy;
    fastcgi_temp_path $DIR/$1.tmp/fastcgi;
    uwsgi_temp_path $DIR/$1.tmp/uwsgi;
    scgi_temp_path $DIR/$1.tmp/scgi;
    upstream u { $UPSTREAM_SERVERS keepalive 128; keepalive_requests 1000000; }
    server {
        listen 127.0.0.1:$2 backlog=4096; ${4:-}
        default_type application/json;
        location / { $3 }
    }
}
EOF
}
# With TARGETS=3 the upstream nginx also listens on the next two ports, and both proxies balance over the three.
UP2=18383 UP3=18384
if [ "${TARGETS:-1}" = 3 ]; then
    UPSTREAM_SERVERS="server 127.0.0.1:$UP; server 127.0.0.1:$UP2; server 127.0.0.1:$UP3;"
    GW_UPSTREAM="targets = [\"http://127.0.0.1:$UP\", \"http://127.0.0.1:$UP2\", \"http://127.0.0.1:$UP3\"]"
    MORE_LISTEN="listen 127.0.0.1:$UP2 backlog=4096; listen 127.0.0.1:$UP3 backlog=4096;"
else
    UPSTREAM_SERVERS="server 127.0.0.1:$UP;"
    GW_UPSTREAM="url = \"http://127.0.0.1:$UP\""
    MORE_LISTEN=""
fi
nginx_conf upstream $UP "return 200 '{\"ok\":true}';" "$MORE_LISTEN"
nginx_conf proxy $N 'proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection "";'
cat >"$DIR/gateway.toml" <<EOF
[listen]
http = "127.0.0.1:$GW"
[server]
access_log = ${ACCESS_LOG:-true}
[upstreams.up]
$GW_UPSTREAM
[[routes]]
name = "all"
path = "/*"
upstream = "up"
auth = "public"
EOF
if [ -n "${TRACING:-}" ]; then # the upstream nginx answers the OTLP POSTs too: a collector that costs nothing here
    printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0\n' "$UP" >>"$DIR/gateway.toml"
fi

taskset -c 1 nginx -c "$DIR/upstream.conf" -g 'daemon off;' &

WRK_ARGS=()
# shellcheck source=benches/callgrind.sh
source benches/callgrind.sh

export PORTCULLIS_WORKERS=1 # one worker, as in the harness (valgrind must start the binary itself)
gw=$(measure $GW / "$BIN" run --config "$DIR/gateway.toml")
ng=$(measure $N / nginx -c "$DIR/proxy.conf" -g 'daemon off; master_process off;')
echo "user-space instructions per proxied request: Portcullis $gw, nginx $ng (ratio $(echo "scale=2; $gw / $ng" | bc))"
