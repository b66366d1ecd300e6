#!/usr/bin/env bash
# gRPC unary through the gateway against calling the service directly: tonic's health service (examples/grpc_health.rs,
# one thread), `h2load` posting a framed `grpc.health.v1.Health/Check`, HTTP/2 with prior knowledge on both sides.
# The gateway runs one worker on CPU 0 with an HS256 route (`roles_any`, the token cached after the first request);
# the service and h2load share CPU 1, as the shared bench puts upstream and load generator together. nginx
# (`grpc_pass`, one worker, no auth, no access log) runs beside it on CPU 0 as the peer doing less work.
#   benches/grpc.sh                    # needs h2load (Debian nghttp2-client)
#   ROUNDS=5 DURATION=10 benches/grpc.sh
# Loopback only, ports 18390-18391; every process is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v h2load >/dev/null || { echo "needs h2load (apt-get install nghttp2-client)"; exit 1; }
cargo build -q --release --locked --bin portcullis --example grpc_health
BIN=$PWD/target/release/portcullis
SVC=$PWD/target/release/examples/grpc_health
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10}
DIR=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT
UP=18390 GW=18391 NG=18392
head -c 32 /dev/urandom | base64 >"$DIR/hs.secret"
cat >"$DIR/gateway.toml" <<TOML
[listen]
http = "127.0.0.1:$GW"
[upstreams.grpc]
url = "http://127.0.0.1:$UP"
protocol = "h2"
[[issuers]]
id = "bench"
issuer = "https://bench.test"
audiences = ["api"]
algorithms = ["HS256"]
secret_file = "hs.secret"
[[routes]]
name = "health"
path = "/grpc.health.v1.Health/*"
upstream = "grpc"
roles_any = ["admin"]
TOML
TOKEN=$("$BIN" token --config "$DIR/gateway.toml" --issuer bench --sub bench --roles admin --ttl 1h)
# One gRPC message: not compressed, 8 bytes long, HealthCheckRequest { service: "bench" } (field 1, length 5).
printf '\x00\x00\x00\x00\x07\x0a\x05bench' >"$DIR/check.bin"

mkdir -p "$DIR/nginx"
cat >"$DIR/nginx.conf" <<NGINX
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx.error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $DIR/nginx/body;
    proxy_temp_path $DIR/nginx/proxy;
    fastcgi_temp_path $DIR/nginx/fastcgi;
    uwsgi_temp_path $DIR/nginx/uwsgi;
    scgi_temp_path $DIR/nginx/scgi;
    keepalive_requests 100000000;
    upstream svc { server 127.0.0.1:$UP; keepalive 32; keepalive_requests 100000000; }
    server {
        listen 127.0.0.1:$NG http2;
        http2_max_concurrent_streams 1024;
        location / { grpc_pass grpc://svc; }
    }
}
NGINX
taskset -c 1 "$SVC" "127.0.0.1:$UP" &
taskset -c 0 nginx -c "$DIR/nginx.conf" -g 'daemon off;' &
PORTCULLIS_WORKERS=1 taskset -c 0 "$BIN" --log-level warn run --config "$DIR/gateway.toml" >"$DIR/gw.log" 2>&1 &
for port in $UP $GW $NG; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done

load() { # url, extra header args…: prints req/s
    local url=$1
    shift
    taskset -c 1 h2load -c16 -m32 -D "$DURATION" --warm-up-time=2 -d "$DIR/check.bin" \
        -H 'content-type: application/grpc' -H 'te: trailers' "$@" "$url" |
        awk '/^finished in/ {print int($4)}'
}
# The gateway's refusals are gRPC statuses in HTTP 200 answers, which h2load counts as successes: check first that
# the call really succeeds (grpc-status 0 in the trailers) both ways.
for url in "http://127.0.0.1:$UP" "http://127.0.0.1:$GW" "http://127.0.0.1:$NG"; do
    curl -s -D - -o /dev/null --http2-prior-knowledge -H 'content-type: application/grpc' -H 'te: trailers' \
        -H "authorization: Bearer $TOKEN" --data-binary @"$DIR/check.bin" "$url/grpc.health.v1.Health/Check" |
        grep -qi '^grpc-status: 0' || { echo "the gRPC call to $url did not succeed"; exit 1; }
done
printf 'round  direct req/s  gateway req/s  nginx req/s  gateway/direct  nginx/direct\n'
for r in $(seq "$ROUNDS"); do
    d=$(load "http://127.0.0.1:$UP/grpc.health.v1.Health/Check")
    g=$(load "http://127.0.0.1:$GW/grpc.health.v1.Health/Check" -H "authorization: Bearer $TOKEN")
    n=$(load "http://127.0.0.1:$NG/grpc.health.v1.Health/Check")
    printf '%5s  %12s  %13s  %11s  %14s  %12s\n' "$r" "$d" "$g" "$n" "$(echo "scale=2; $g / $d" | bc)" "$(echo "scale=2; $n / $d" | bc)"
done
