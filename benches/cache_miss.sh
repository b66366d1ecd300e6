#!/usr/bin/env bash
# The verification (cache-miss) path through the whole gateway: a distinct valid token on every request, so
# Portcullis verifies each signature, beside HAProxy 2.6 jwt_verify (which verifies every request anyway).
# Same policy and setup as ../shared/bench (H1/H2/H3 vs GW/GW-es256/GW-hs256): one worker pinned to PROXY_CPU,
# wrk (Lua: one token per request) and the upstream nginx on LOAD_CPU. Prints req/s and the target's own CPU
# µs per request for each run, then the medians.
#   benches/cache_miss.sh        knobs: ROUNDS=3 DURATION=4 (seconds) PROXY_CPU=0 LOAD_CPU=1 CONNS=64
# Needs the shared bench harness in ../shared/bench, outside this repository (BENCH=DIR points elsewhere): its
# lib/common.sh, conf/ templates, and the venv and keys its setup.sh makes under $BENCH_STATE
# (~/.cache/portcullis-bench), where results are written too. Loopback only; every run is bounded by wrk -d and
# every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BENCH=${BENCH:-../shared/bench}
[[ -x $BENCH/run.sh ]] || { echo "$0: needs the shared bench harness at $BENCH (../shared/bench beside this repository, or set BENCH=DIR)" >&2; exit 1; }
BENCH=$(cd "$BENCH" && pwd)
STATE=${BENCH_STATE:-$HOME/.cache/portcullis-bench}
KEYS=$STATE/keys
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-4} PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1} CONNS=${CONNS:-64}
UPORT=${UPORT:-18180}
# shellcheck source=/dev/null
source "$BENCH/lib/common.sh"
[[ -x $STATE/.venv/bin/python && -f $KEYS/rs256.key.pem ]] || "$BENCH/setup.sh" >/dev/null
cargo build --release --locked --bin portcullis
RUN=$(mktemp -d)
OUT=$STATE/results/cache-miss-$(date +%Y%m%d-%H%M%S).txt
mkdir -p "$(dirname "$OUT")"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$RUN"; }
trap cleanup EXIT

# Enough tokens that no run wraps around: ~60k verifications/s is above any target here.
N=$((60000 * DURATION))
echo "minting $N distinct tokens per algorithm (plus a warm-up set)..."
for alg in RS256 ES256 HS256; do
  lower=${alg,,}
  keyfile=$KEYS/$lower.key.pem
  [[ $alg == HS256 ]] && keyfile=$KEYS/hs256.secret
  "$STATE/.venv/bin/python" "$ROOT/benches/mint_tokens.py" "$alg" "$keyfile" "$N" "$RUN/$lower.tokens"
  "$STATE/.venv/bin/python" "$ROOT/benches/mint_tokens.py" "$alg" "$keyfile" 20000 "$RUN/$lower.warm"
done

NAME=U-upstream PORT=$UPORT
mkdir -p "$RUN/$NAME.tmp"
render "$BENCH/conf/nginx-upstream.conf.in" "$RUN/upstream.conf"
taskset -c "$LOAD_CPU" nginx -p "$RUN" -c "$RUN/upstream.conf" -g 'daemon off;' >"$RUN/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$UPORT" 10 || { cat "$RUN/upstream.log"; exit 1; }

# start_target NAME ALG: renders the config and starts the target on PROXY_CPU; sets TPID and PORT.
start_target() {
  local name=$1 alg=$2 lower=${2,,} key_line
  case $name in
    GW*)
      PORT=18190
      case $alg in
        HS256) key_line="secret_file = \"$KEYS/hs256.secret\"" ;;
        *) key_line="public_keys = [\"$KEYS/$lower.pub.pem\"]" ;;
      esac
      NAME=$name render "$BENCH/conf/portcullis.toml.in" "$RUN/$name.toml" LISTEN=http ADMIN_PORT=19190 TLS_SECTION= \
        ALG="$alg" KEY_LINE="$key_line" AUTH=required ROLES_LINE='roles_any = ["admin"]'
      taskset -c "$PROXY_CPU" "$ROOT/target/release/portcullis" run --config "$RUN/$name.toml" --log-level warn \
        >"$RUN/$name.log" 2>&1 &
      ;;
    H*)
      PORT=18191
      local jwt_key=$KEYS/$lower.pub.pem
      [[ $alg == HS256 ]] && jwt_key=$(<"$KEYS/hs256.secret")
      NAME=$name render "$BENCH/conf/haproxy-jwt.cfg.in" "$RUN/$name.cfg" BIND_OPTS= JWT_ALG="$alg" JWT_KEY="$jwt_key"
      taskset -c "$PROXY_CPU" haproxy -db -f "$RUN/$name.cfg" >"$RUN/$name.log" 2>&1 &
      ;;
  esac
  TPID=$!
  PIDS+=("$TPID")
  wait_port "$PORT" 15 || { cat "$RUN/$name.log"; exit 1; }
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

run_one() {
  local name=$1 alg=$2 lower=${2,,} t0 t1 json
  start_target "$name" "$alg"
  TOKENS=$RUN/$lower.warm taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d1s -s "$ROOT/benches/distinct_tokens.lua" \
    "http://127.0.0.1:$PORT/users/me" >/dev/null
  t0=$(cpu_ticks "$TPID")
  json=$(TOKENS=$RUN/$lower.tokens taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency \
    -s "$ROOT/benches/distinct_tokens.lua" "http://127.0.0.1:$PORT/users/me" | sed -n 's/^JSON://p')
  t1=$(cpu_ticks "$TPID")
  kill "$TPID"; wait "$TPID" 2>/dev/null || true
  python3 - "$name" "$alg" "$json" "$((t1 - t0))" "$(getconf CLK_TCK)" "$DURATION" <<'PY'
import json, sys
name, alg, j, ticks, hz, dur = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
req = j["requests"]
note = "" if req <= j["tokens"] else "  WRAPPED: tokens reused, cache hits included"
bad = "" if j["non2xx"] == 0 and j["sockerr"] == 0 else f"  ERRORS non2xx={j['non2xx']} sock={j['sockerr']}"
print(f"{name:9} {alg}  {req / dur:9.0f} req/s  p50 {j['p50_us'] / 1000:.2f} ms  p99 {j['p99_us'] / 1000:.2f} ms  "
      f"{ticks / hz * 1e6 / req:6.1f} µs CPU/req{note}{bad}")
PY
}

{
  echo "cache-miss runs: ROUNDS=$ROUNDS DURATION=${DURATION}s CONNS=$CONNS, $N distinct tokens per algorithm"
  for r in $(seq "$ROUNDS"); do
    for pair in "H1 RS256" "GW RS256" "H2 ES256" "GW-es256 ES256" "H3 HS256" "GW-hs256 HS256"; do
      # shellcheck disable=SC2086
      run_one $pair
    done
  done
} | tee "$OUT.raw"
echo "--- medians (target CPU µs per request; lower is better)"
python3 - "$OUT.raw" <<'PY' | tee "$OUT"
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"(\S+)\s+(\S+)\s+(\d+) req/s.*?([\d.]+) µs CPU/req", line)
    if m:
        rows.setdefault((m[1], m[2]), []).append((int(m[3]), float(m[4])))
for alg, h in (("RS256", "H1"), ("ES256", "H2"), ("HS256", "H3")):
    g = {"RS256": "GW", "ES256": "GW-es256", "HS256": "GW-hs256"}[alg]
    hr, hc = statistics.median(r for r, _ in rows[(h, alg)]), statistics.median(c for _, c in rows[(h, alg)])
    gr, gc = statistics.median(r for r, _ in rows[(g, alg)]), statistics.median(c for _, c in rows[(g, alg)])
    print(f"{alg}: HAProxy {hr:.0f} req/s {hc:.1f} µs/req | Portcullis {gr:.0f} req/s {gc:.1f} µs/req | "
          f"req/s x{gr / hr:.2f}, CPU/req x{gc / hc:.2f}")
PY
