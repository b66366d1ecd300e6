# Sourced by benches/instructions.sh and benches/decision.sh: user-space instructions per request under callgrind.
# Needs $DIR (a scratch folder) and, optionally, the array WRK_ARGS (more wrk arguments: headers).

# Instructions per request of the process started by "$@", listening on port $1, loaded at path $2 (2 s of warm-up,
# 5 s counted). Fails when any answer is not 2xx: a refusal would be measured as the thing asked about.
measure() {
    local port=$1 path=$2
    shift 2
    valgrind --tool=callgrind --callgrind-out-file="$DIR/cg.%p" "$@" >"$DIR/target.log" 2>&1 &
    local pid=$!
    for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    taskset -c 1 wrk -t1 -c16 -d2s "${WRK_ARGS[@]}" "http://127.0.0.1:$port$path" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    local out requests non2xx total
    out=$(taskset -c 1 wrk -t1 -c16 -d5s "${WRK_ARGS[@]}" "http://127.0.0.1:$port$path")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 0.5
    total=$(callgrind_annotate "$DIR/cg.$pid.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$DIR"/cg.*
    [ -z "$non2xx" ] || { echo "non-2xx answers at $path: $non2xx" >&2; return 1; }
    echo $((total / requests))
}
