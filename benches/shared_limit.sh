#!/usr/bin/env bash
# Req/s, p99 and the gateway's CPU per request of a route whose limit is shared in Redis against the same route with a local limit: one gateway
# worker, Redis and the upstream on loopback, an HS256 token cached after its first use, a limit far above the
# load (every request admitted), interleaved rounds.
#   benches/shared_limit.sh             # needs redis-server, nginx and wrk
#   ROUNDS=5 SECONDS_EACH=5 GATEWAY_BIN=/path/to/portcullis benches/shared_limit.sh
# Loopback only, ports 18391-18393; everything stops when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in redis-server nginx wrk; do
    command -v "$tool" >/dev/null || { echo "needs $tool"; exit 1; }
done
if [ -z "${GATEWAY_BIN:-}" ]; then
    cargo build -q --release --locked --bin portcullis
fi
BIN=${GATEWAY_BIN:-$PWD/target/release/portcullis}
ROUNDS=${ROUNDS:-3} SECONDS_EACH=${SECONDS_EACH:-5} CONNS=${CONNS:-32}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
UP=18391 GW=18392 REDIS=18393
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
LIMIT='key = "subject", rate = "1000000/s", burst = 1000000'
cat >"$DIR/gateway.toml" <<TOML
[listen]
http = "127.0.0.1:$GW"
[server]
access_log = false
[store]
url = "redis://127.0.0.1:$REDIS/0"
pool_size = ${POOL_SIZE:-2}
[upstreams.up]
url = "http://127.0.0.1:$UP"
[[issuers]]
id = "bench"
issuer = "https://bench.test"
audiences = ["api"]
algorithms = ["HS256"]
secret_file = "hs.secret"
[[routes]]
name = "local"
path = "/local/*"
upstream = "up"
rate_limit = { $LIMIT }
[[routes]]
name = "shared"
path = "/shared/*"
upstream = "up"
rate_limit = { $LIMIT, store = "shared" }
TOML
TOKEN=$("$BIN" token --config "$DIR/gateway.toml" --issuer bench --sub bench --ttl 1h)
taskset -c 1 redis-server --port $REDIS --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" >/dev/null &
taskset -c 1 nginx -c "$DIR/upstream.conf" -g 'daemon off;' &
PORTCULLIS_WORKERS=1 taskset -c 0 "$BIN" --log-level warn run --config "$DIR/gateway.toml" &
GW_PID=$!
for _ in $(seq 100); do
    curl -sf -o /dev/null -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/shared/x" && break
    sleep 0.1
done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$GW_PID/stat"; }
run() { # path -> "req/s p99 gateway-CPU-µs-per-request"
    local before after out
    before=$(cpu_ticks)
    out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECONDS_EACH}s" --latency -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$GW$1" |
        awk '/Requests\/sec/ {r=$2} /^ +99%/ {p=$2} END {print r, p}')
    after=$(cpu_ticks)
    read -r r p <<<"$out"
    echo "$r $p $(echo "scale=1; ($after - $before) * 1000000 / $(getconf CLK_TCK) / ($r * $SECONDS_EACH)" | bc)"
}
run /local/x >/dev/null # warm-up
for i in $(seq "$ROUNDS"); do
    read -r lr lp lc < <(run /local/x)
    read -r sr sp sc < <(run /shared/x)
    echo "round $i: local $lr req/s p99 $lp ${lc}µs CPU/req; shared $sr req/s p99 $sp ${sc}µs CPU/req; req/s ratio $(echo "scale=2; $sr / $lr" | bc)"
done
