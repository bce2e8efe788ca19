#!/usr/bin/env bash
# Runs a local 3-node CleaveDB cluster on 127.0.0.1 in the foreground.
# Ctrl-C (or any exit) stops every node; running it again restarts the same
# cluster from its data.
#
# Env (defaults):
#   CLEAVE_DATA=./cluster-data   data dirs nodeN/ and logs nodeN.log
#   CLEAVE_NODES=3               number of nodes
#   CLEAVE_API_BASE=7000         node N serves its API on CLEAVE_API_BASE+N (7001..)
#   CLEAVE_RAFT_BASE=7100        node N's Raft/RPC port is CLEAVE_RAFT_BASE+N (7101..)
#   CLEAVE_HOST=127.0.0.1        address to bind (loopback by default)
#   CLEAVE_SECURE=0              1: tokens and a cluster secret (generated into the data dir on
#                                first start: tokens.toml, secret), see README "Security"
#   RUST_LOG                     node log filter (default: the node's own, quiet)
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target
# Extra arguments are passed to every node (e.g. --snapshot-logs 500).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/stop-pids.sh"
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cleavedb/target}"
cargo build --release --bins
bin="$CARGO_TARGET_DIR/release/cleave-node"

data="${CLEAVE_DATA:-./cluster-data}"
nodes="${CLEAVE_NODES:-3}"
api_base="${CLEAVE_API_BASE:-7000}"
raft_base="${CLEAVE_RAFT_BASE:-7100}"
host="${CLEAVE_HOST:-127.0.0.1}"
export NO_COLOR=1 # plain log files
mkdir -p "$data"
data="$(cd "$data" && pwd)"

secure_args=()
auth=()
if [[ "${CLEAVE_SECURE:-0}" == 1 ]]; then
    if [[ ! -f "$data/secret" ]]; then
        (umask 077 && head -c 32 /dev/urandom | base64 >"$data/secret")
    fi
    if [[ ! -f "$data/tokens.toml" ]]; then
        (
            umask 077
            for t in admin:admin app:write reader:read; do
                echo "[[token]]"
                echo "name = \"${t%%:*}\""
                echo "secret = \"$(head -c 24 /dev/urandom | base64 | tr -d '/+=')\""
                echo "role = \"${t##*:}\""
                echo
            done
        ) >"$data/tokens.toml"
    fi
    secure_args=(--tokens-file "$data/tokens.toml" --cluster-secret-file "$data/secret")
    admin_token=$(awk '/^secret/ { gsub(/"/, "", $3); print $3; exit }' "$data/tokens.toml")
    auth=(-H "Authorization: Bearer $admin_token")
fi

initial=""
for i in $(seq 1 "$nodes"); do
    initial+="${initial:+,}$i=$host:$((raft_base + i))"
done

pids=()
stop() {
    trap - EXIT INT TERM
    if ((${#pids[@]})); then
        echo "stopping nodes (pids ${pids[*]})"
        stop_pids "${pids[@]}"
    fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for i in $(seq 1 "$nodes"); do
    mkdir -p "$data/node$i"
    echo "===== $(date -Is) starting node $i" >>"$data/node$i.log"
    "$bin" --id "$i" --data-dir "$data/node$i" \
        --listen-api "$host:$((api_base + i))" --listen-raft "$host:$((raft_base + i))" \
        --initial-cluster "$initial" "${secure_args[@]}" "$@" </dev/null >>"$data/node$i.log" 2>&1 &
    pids+=($!)
done

deadline=$((SECONDS + 60))
for i in $(seq 1 "$nodes"); do
    url="http://$host:$((api_base + i))"
    until curl -fsS -o /dev/null --max-time 2 "$url/health" 2>/dev/null; do
        if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
            echo "node $i exited; last lines of $data/node$i.log:" >&2
            tail -n 30 "$data/node$i.log" >&2
            exit 1
        fi
        if ((SECONDS > deadline)); then
            echo "node $i did not become healthy within 60 s; see $data/node$i.log" >&2
            exit 1
        fi
        sleep 0.2
    done
done

echo "CleaveDB cluster of $nodes nodes is up (data and logs in $data):"
for i in $(seq 1 "$nodes"); do
    echo "  node $i: API http://$host:$((api_base + i))  raft $host:$((raft_base + i))  pid ${pids[$((i - 1))]}"
done
h=""
if ((${#auth[@]})); then
    echo "Secured: tokens in $data/tokens.toml (the first is admin), cluster secret in $data/secret"
    h=" -H '${auth[1]}'"
fi
cat <<EXAMPLE

Try:
  curl$h -X PUT http://$host:$((api_base + 1))/v1/kv/hello -H 'content-type: application/json' -d '{"value": {"greeting": "hi"}}'
  curl$h http://$host:$((api_base + 2))/v1/kv/hello
  curl$h 'http://$host:$((api_base + 3))/v1/kv?start=&limit=10'
  curl$h http://$host:$((api_base + 1))/admin/shards
Press Ctrl-C to stop the cluster.
EXAMPLE

# Stay in the foreground; report nodes that exit; stop when none is left.
alive=("${pids[@]}")
while ((${#alive[@]})); do
    if wait -n "${alive[@]}"; then rc=0; else rc=$?; fi
    still=()
    for i in $(seq 1 "$nodes"); do
        pid="${pids[$((i - 1))]}"
        if kill -0 "$pid" 2>/dev/null; then
            still+=("$pid")
        elif [[ " ${alive[*]} " == *" $pid "* ]]; then
            echo "node $i (pid $pid) exited (status $rc); see $data/node$i.log" >&2
        fi
    done
    alive=("${still[@]}")
done
echo "all nodes have exited" >&2
