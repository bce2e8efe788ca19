#!/usr/bin/env bash
# Measures one live split under write load: the figures of README "Latest
# split figures" (issue 14).
#
# Starts a fresh 3-node cluster on 127.0.0.1 with --max-splits 0 --balance
# false --merge-size 0, then runs
#   cleave-bench split --fill-mb $SPLIT_FILL_MB --value-size 1024
#                      --before 10s --after 10s -c 16
# (preload, writes before, the split of the loaded range, writes during and
# after) and prints its report. Run once per size; each run starts over.
#
# Env (defaults):
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target   binaries from `cargo build --release --bins`
#   CLEAVE_NODE_BIN, CLEAVE_BENCH_BIN            override the binaries
#   SPLIT_SCENARIO=split  or merge: fill, split at the median (not measured), then
#                         measure the merge of the two halves under the same writes
#   SPLIT_FILL_MB=256     data in the range before the split
#   SPLIT_PORT_BASE=28400 node N: API on BASE+N, RPC on BASE+50+N
#   SPLIT_DATA            data dir [a new /tmp/cleave-split.XXXXXX]; logs nodeN.log stay there
#   SPLIT_KEEP=0          1: keep the nodes' data dirs (RocksDB's LOG files tell what
#                         the database did)
#   SPLIT_NODE_ARGS       further arguments for every node (e.g. --split-backfill-rate 64)
#   SPLIT_BENCH_ARGS      further arguments for cleave-bench split
#   SPLIT_PERF=0          1: `perf record` every node for SPLIT_PERF_SECS (3) from the moment
#                         the split begins (profiles in $SPLIT_DATA/perf-nodeN.data)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/stop-pids.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bins.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/start-nodes.sh"

fill_mb="${SPLIT_FILL_MB:-256}"
base="${SPLIT_PORT_BASE:-28400}"
perf="${SPLIT_PERF:-0}"
host=127.0.0.1
nodes=3

need_tools bench-split curl
need_bins bench-split "$node_bin" "$bench_bin"
data="${SPLIT_DATA:-$(mktemp -d /tmp/cleave-split.XXXXXX)}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
api() { echo "$host:$((base + $1))"; }

pids=()
perf_pids=()
stop() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pids "${pids[@]}"
    [[ ${#perf_pids[@]} -gt 0 ]] && { kill "${perf_pids[@]}" 2>/dev/null; wait "${perf_pids[@]}" 2>/dev/null; }
    if [[ "${SPLIT_KEEP:-0}" != 1 ]]; then
        for i in $(seq 1 "$nodes"); do rm -rf "$data/node$i"; done
    fi
    echo "bench-split: logs in $data/node{1..$nodes}.log" >&2
    exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r -a extra <<<"${SPLIT_NODE_ARGS:-}"
for i in $(seq 1 "$nodes"); do rm -rf "$data/node$i"; done
start_nodes "$node_bin" "$nodes" "$host" "$base" "$data/node" --max-splits 0 --balance false --merge-size 0 "${extra[@]}"
endpoints="$(api 1),$(api 2),$(api 3)"
echo "cluster: 3 nodes up on $endpoints, --max-splits 0 --balance false --merge-size 0 ${extra[*]}"

if [[ "$perf" == 1 ]]; then
    need_tools bench-split perf
    # Profiles from the moment the split's operation appears.
    (
        until curl -fsS --max-time 2 "http://$(api 1)/admin/operations" 2>/dev/null | grep -q '"kind"'; do
            kill -0 "${pids[0]}" 2>/dev/null || exit 0
            sleep 0.1
        done
        for i in $(seq 1 "$nodes"); do
            perf record -F 499 -g -p "${pids[$((i - 1))]}" -o "$data/perf-node$i.data" -- sleep "${SPLIT_PERF_SECS:-3}" >/dev/null 2>&1 &
        done
        wait
    ) &
    perf_pids+=($!)
fi

read -r -a bench_extra <<<"${SPLIT_BENCH_ARGS:-}"
"$bench_bin" "${SPLIT_SCENARIO:-split}" --endpoints "$endpoints" --fill-mb "$fill_mb" --value-size 1024 \
    --before 10s --after 10s -c 16 "${bench_extra[@]}"
