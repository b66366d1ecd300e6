#!/usr/bin/env bash
# User-space instructions per request (callgrind) of the gateway answering a forward-auth decision against the same
# gateway proxying the same request: an HS256 token with a role rule, cached after its first use, one worker.
#   benches/decision.sh                 # needs valgrind, nginx and wrk
#   GATEWAY_BIN=/path/to/portcullis benches/decision.sh
# Loopback only, ports 18385-18386; 2 s of warm-up and 5 s measured per mode, then everything stops.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_annotate callgrind_control nginx wrk; do
    command -v "$tool" >/dev/null || { echo "needs $tool"; exit 1; }
done
if [ -z "${GATEWAY_BIN:-}" ]; then
    cargo build -q --release --locked --bin portcullis
fi
BIN=${GATEWAY_BIN:-$PWD/target/release/portcullis}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
UP=18385 GW=18386
mkdir -p "$DIR/tmp"
cat >"$DIR/upstream.conf" <<NGINX
worker_processes 1;
pid $DIR/upstream.pid;
error_log $DIR/upstream.error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $DIR/tmp/body; proxy_temp_path $DIR/tmp/proxy; fastcgi_temp_path $DIR/tmp/fastcgi;
    uwsgi_temp_path $DIR/tmp/uwsgi; scgi_temp_path $DIR/tmp/scgi;
    keepalive_requests 1000000;
    server { listen 127.0.0.1:$UP backlog=4096; default_type application/json; location / { return 200 '{"ok":true}'; } }
}
NGINX
head -c 32 /dev/urandom | base64 >"$DIR/hs.secret"
cat >"$DIR/gateway.toml" <<TOML
[listen]
http = "127.0.0.1:$GW"
[server]
access_log = ${ACCESS_LOG:-true}
[rate_limit]
trusted_proxies = ["127.0.0.1/32"]
[forward_auth]
path = "/auth"
[upstreams.up]
url = "http://127.0.0.1:$UP"
[[issuers]]
id = "bench"
issuer = "https://bench.test"
audiences = ["api"]
algorithms = ["HS256"]
secret_file = "hs.secret"
[[routes]]
name = "api"
path = "/api/*"
upstream = "up"
roles_any = ["admin"]
TOML
TOKEN=$("$BIN" token --config "$DIR/gateway.toml" --issuer bench --sub bench --roles admin --ttl 1h)
taskset -c 1 nginx -c "$DIR/upstream.conf" -g 'daemon off;' &

# shellcheck source=benches/callgrind.sh
source benches/callgrind.sh
export PORTCULLIS_WORKERS=1
WRK_ARGS=(-H "authorization: Bearer $TOKEN")
proxied=$(measure $GW /api/x "$BIN" run --config "$DIR/gateway.toml")
WRK_ARGS+=(-H "x-original-uri: /api/x" -H "x-original-method: GET")
decided=$(measure $GW /auth "$BIN" run --config "$DIR/gateway.toml")
echo "user-space instructions per request: proxied $proxied, decision $decided (ratio $(echo "scale=2; $decided / $proxied" | bc))"
