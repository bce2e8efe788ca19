#!/usr/bin/env bash
# Transactions next to single-key puts: one fresh 3-node cluster per run
# (--max-splits 0 --balance false), cleave-bench on it, for
#   put  on one shard,            uniform and zipfian;
#   txn  (two-key transfers: a read transaction, then a conditional write
#         transaction) on one shard, and over $TXN_RANGES ranges (cleave-bench
#         multi pre-splits them), uniform and zipfian.
# Prints each run's cleave-bench report and a summary table (`TXN:` lines).
# A transfer is two transactions; lost races (the compare failed) are
# counted by cleave-bench, not as errors.
#
# Env (defaults):
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target   binaries from `cargo build --release --bins`
#   CLEAVE_NODE_BIN, CLEAVE_BENCH_BIN            override the binaries
#   TXN_PORT_BASE=28400  node N: API on BASE+N, RPC on BASE+50+N
#   TXN_KEYS=10000  TXN_DURATION=20s  TXN_CONCURRENCY=32  TXN_RANGES=8
#   TXN_DATA   data dir [a new /tmp/cleave-txnbench.XXXXXX]; node logs stay there
#   TXN_CASES  only the runs whose names contain one of these words (e.g. "zipfian")
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/stop-pids.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bins.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/start-nodes.sh"

base="${TXN_PORT_BASE:-28400}"
keys="${TXN_KEYS:-10000}"
duration="${TXN_DURATION:-20s}"
conc="${TXN_CONCURRENCY:-32}"
ranges="${TXN_RANGES:-8}"
host=127.0.0.1
need_bins bench-txn "$node_bin" "$bench_bin"
need_tools bench-txn curl
data="${TXN_DATA:-$(mktemp -d /tmp/cleave-txnbench.XXXXXX)}"
mkdir -p "$data"

pids=()
stop_cluster() {
    stop_pids "${pids[@]}"
    pids=()
}
trap 'rc=$?; trap - EXIT; stop_cluster; echo "bench-txn: logs in $data" >&2; exit $rc' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_cluster() { # NAME
    stop_cluster
    local i
    for i in 1 2 3; do rm -rf "$data/$1-node$i"; done
    start_nodes "$node_bin" 3 "$host" "$base" "$data/$1-node" --max-splits 0 --balance false --merge-size 0
}

summary=()
run() { # NAME WORKLOAD DISTRIBUTION [multi]
    local name=$1 workload=$2 dist=$3 mode=${4:-run}
    if [[ -n "${TXN_CASES:-}" ]]; then
        local want=0 w
        for w in $TXN_CASES; do [[ "$name" == *"$w"* ]] && want=1; done
        ((want)) || return 0
    fi
    start_cluster "$name"
    local endpoints="$host:$((base + 1)),$host:$((base + 2)),$host:$((base + 3))"
    local args=(--endpoints "$endpoints" --workload "$workload" --distribution "$dist" --keys "$keys" --preload
        --duration "$duration" -c "$conc")
    [[ "$mode" == multi ]] && args=(--ranges "$ranges" "${args[@]}")
    echo "== $name: cleave-bench $mode ${args[*]}"
    "$bench_bin" "$mode" "${args[@]}" 2>&1 | tee "$data/$name.out"
    summary+=("TXN: $name  $(grep -E -m1 '^total' "$data/$name.out" | tr -s ' ')")
}

run put-one-shard-uniform write uniform
run put-one-shard-zipfian write zipfian
run txn-one-shard-uniform txn uniform
run txn-one-shard-zipfian txn zipfian
run "txn-$ranges-ranges-uniform" txn uniform multi
run "txn-$ranges-ranges-zipfian" txn zipfian multi
printf '%s\n' "${summary[@]}"
