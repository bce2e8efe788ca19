# Sourced by the benchmark scripts that start a fresh local cluster.
#
#   start_nodes BIN N HOST BASE DIR [NODE ARGS...]
#       starts N nodes of BIN on HOST: node i serves its API on BASE+i and
#       its RPC on BASE+50+i, keeps its data in DIRi and logs to DIRi.log
#       (appended), all with the same --initial-cluster and NODE ARGS; adds
#       their pids to the array `pids`, then waits up to 60 s for every
#       node's /health (exits 1 if a node dies or stays unhealthy).
start_nodes() {
    local bin=$1 n=$2 host=$3 base=$4 dir=$5
    shift 5
    local initial="" i
    for i in $(seq 1 "$n"); do initial+="${initial:+,}$i=$host:$((base + 50 + i))"; done
    local first=${#pids[@]}
    for i in $(seq 1 "$n"); do
        NO_COLOR=1 "$bin" --id "$i" --data-dir "$dir$i" --listen-api "$host:$((base + i))" \
            --listen-raft "$host:$((base + 50 + i))" --initial-cluster "$initial" "$@" \
            </dev/null >>"$dir$i.log" 2>&1 &
        pids+=($!)
    done
    local deadline=$((SECONDS + 60))
    for i in $(seq 1 "$n"); do
        until curl -fsS -o /dev/null --max-time 2 "http://$host:$((base + i))/health" 2>/dev/null; do
            kill -0 "${pids[$((first + i - 1))]}" 2>/dev/null || { echo "node $i exited; see $dir$i.log" >&2; exit 1; }
            ((SECONDS < deadline)) || { echo "node $i is not healthy after 60 s" >&2; exit 1; }
            sleep 0.3
        done
    done
}
