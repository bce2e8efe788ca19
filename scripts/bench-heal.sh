#!/usr/bin/env bash
# Measures how long a cluster takes to heal after losing a node for good.
#
# Starts 4 nodes on 127.0.0.1 with --node-dead-after $HEAL_DEAD_AFTER and
# --max-splits 0 (the rebalancer on), splits the key space into
# $HEAL_SHARDS ranges, loads $HEAL_FILL_MB MiB with cleave-bench, waits until
# no operation has run for $HEAL_QUIET seconds (the rebalancer has spread the
# replicas onto node 4), then kill -9s the node holding the most replicas
# (ties: the most leaders) and measures the time until
#   - every group (GET /admin/shards `replicas` and `raft_voters`, and the
#     metadata group: GET /admin/directory `meta.replicas`) has 3 replicas,
#     none on the dead node, a single voter set and a live leader, and
#   - every key loaded is readable again (a scan of the whole key space).
# The time includes the --node-dead-after wait. Prints a timeline and a
# `HEAL:` line with the figures.
#
# Env (defaults):
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target   binaries from `cargo build --release --bins`
#   CLEAVE_NODE_BIN, CLEAVE_BENCH_BIN            override the binaries
#   HEAL_PORT_BASE=28200  node N: API on BASE+N, RPC on BASE+50+N
#   HEAL_DEAD_AFTER=10    --node-dead-after (seconds)
#   HEAL_FILL_MB=50       data loaded, in MiB (keys user00000000... of HEAL_VALUE_SIZE bytes)
#   HEAL_VALUE_SIZE=1024
#   HEAL_SHARDS=4         ranges (the metadata group comes on top)
#   HEAL_QUIET=10         seconds without any operation before the kill
#   HEAL_TIMEOUT=600      give up after this many seconds of waiting (each wait)
#   HEAL_DATA             data dir [a new /tmp/cleave-heal.XXXXXX]; logs nodeN.log stay there
#   HEAL_KEEP=0           1: keep the nodes' data too
#   HEAL_NODE_ARGS        further arguments for every node
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/stop-pids.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bins.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/start-nodes.sh"

base="${HEAL_PORT_BASE:-28200}"
dead_after="${HEAL_DEAD_AFTER:-10}"
fill_mb="${HEAL_FILL_MB:-50}"
value_size="${HEAL_VALUE_SIZE:-1024}"
nshards="${HEAL_SHARDS:-4}"
quiet="${HEAL_QUIET:-10}"
timeout="${HEAL_TIMEOUT:-600}"
keep="${HEAL_KEEP:-0}"
host=127.0.0.1
nodes=4

need_tools bench-heal curl python3
need_bins bench-heal "$node_bin" "$bench_bin"
data="${HEAL_DATA:-$(mktemp -d /tmp/cleave-heal.XXXXXX)}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"

api() { echo "$host:$((base + $1))"; }

pids=()
stop() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pids "${pids[@]}"
    if [[ "$keep" != 1 ]]; then
        for i in $(seq 1 "$nodes"); do rm -rf "$data/node$i"; done
    fi
    echo "bench-heal: logs in $data/node{1..$nodes}.log" >&2
    exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The JSON side, in Python: `check.py MODE ENDPOINT ARGS...`.
cat >"$data/check.py" <<'PY'
import json, sys, urllib.parse, urllib.request

mode, ep = sys.argv[1], sys.argv[2]
args = sys.argv[3:]

def get(path):
    with urllib.request.urlopen(f"http://{ep}{path}", timeout=5) as r:
        return json.load(r)

def post(path, body):
    req = urllib.request.Request(f"http://{ep}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)

def problems(dead):
    """What still keeps the cluster from being healed (empty: healed)."""
    out = []
    for s in get("/admin/shards"):
        sid, on = s["shard_id"], sorted(r["node_id"] for r in s["replicas"])
        ids = sorted(r["replica_id"] for r in s["replicas"])
        if len(on) != 3 or dead in on:
            out.append(f"shard {sid} on nodes {on}")
        voters = s.get("raft_voters")
        if not voters or len(voters) != 1 or sorted(voters[0]) != ids:
            out.append(f"shard {sid} voters {voters} (replicas {ids})")
        if s.get("leader") in (None, dead):
            out.append(f"shard {sid} leader {s.get('leader')}")
    meta = sorted(r["node_id"] for r in get("/admin/directory")["meta"]["replicas"])
    if len(meta) != 3 or dead in meta:
        out.append(f"meta on nodes {meta}")
    return out

try:
    if mode == "split":  # KEY -> operation id
        print(post("/admin/split", {"key": args[0]})["operation_id"])
    elif mode == "phase":  # OP -> its phase
        print(get(f"/admin/operations/{args[0]}")["phase"])
    elif mode == "busy":  # running operations, then problems of the replica layout
        ops = [o for o in get("/admin/operations") if o["phase"] not in ("done", "aborted")]
        print(" ".join(f"op{o['op_id']}:{o['phase']}" for o in ops) or "-", "|", "; ".join(problems(0)) or "-")
    elif mode == "victim":  # the node with the most replicas (ties: most leaders), its row
        rows = [n for n in get("/admin/nodes") if n["status"] == "up"]
        v = max(rows, key=lambda n: (n["replicas"], n["leaders"], -n["id"]))
        meta = [r["node_id"] for r in get("/admin/directory")["meta"]["replicas"]]
        print(v["id"], v["replicas"], v["leaders"], "yes" if v["id"] in meta else "no")
    elif mode == "layout":  # nodes' replica and leader counts
        print(" ".join(f"n{n['id']}:{n['status']}/{n['replicas']}r/{n['leaders']}l" for n in get("/admin/nodes")))
    elif mode == "status":  # DEAD -> the dead node's status
        print(next(n["status"] for n in get("/admin/nodes") if n["id"] == int(args[0])))
    elif mode == "healed":  # DEAD -> "ok" or what is missing
        p = problems(int(args[0]))
        print("ok" if not p else "; ".join(p))
    elif mode == "last-op":  # the highest operation id so far (0: none)
        print(max([o["op_id"] for o in get("/admin/operations")], default=0))
    elif mode == "heal-ops":  # DEAD AFTER -> the moves away from it after operation AFTER
        for o in get("/admin/operations"):
            k = o["kind"].get("move")
            if k and k["from"]["node_id"] == int(args[0]) and o["op_id"] > int(args[1]):
                total = sum(ms for _, ms in o["phase_durations_ms"])
                phases = ", ".join(f"{p} {ms}ms" for p, ms in o["phase_durations_ms"])
                print(f"  move op {o['op_id']} ({k['reason']}) of shard {k['shard_id']} to node {k['to']['node_id']}:"
                      f" {o['phase']} in {total}ms ({phases})")
    elif mode == "count":  # N -> keys user00000000..N-1 found by a scan
        want, start, found = int(args[0]), "", 0
        end = f"user{want:08d}"
        while True:
            q = urllib.parse.urlencode({"start": start, "end": end, "limit": 1000})
            page = get(f"/v1/kv?{q}")
            found += sum(1 for i in page["items"] if i["key"] < end)
            if not page.get("next"):
                break
            start = page["next"]
        print(found)
    else:
        sys.exit(f"unknown mode {mode}")
except Exception as e:  # an unanswered poll is retried by the caller
    print(f"error: {e}")
    sys.exit(1)
PY
check() { python3 "$data/check.py" "$@"; }

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# 1. The cluster.
read -r -a extra <<<"${HEAL_NODE_ARGS:-}"
for i in $(seq 1 "$nodes"); do mkdir -p "$data/node$i"; done
start_nodes "$node_bin" "$nodes" "$host" "$base" "$data/node" --node-dead-after "$dead_after" --max-splits 0 --merge-size 0 "${extra[@]}"
endpoints="$(api 1),$(api 2),$(api 3),$(api 4)"
echo "cluster: 4 nodes up on $endpoints (pids ${pids[*]}), --node-dead-after $dead_after --max-splits 0, data $data"

# 2. Ranges and data.
keys=$(((fill_mb * 1048576 + 12 + value_size - 1) / (12 + value_size)))
wait_op() { # OP: until it ends
    local phase=""
    for _ in $(seq 1 $((timeout * 2))); do
        phase=$(check phase "$(api 1)" "$1" || true)
        [[ "$phase" == done || "$phase" == aborted ]] && break
        sleep 0.5
    done
    [[ "$phase" == done ]] || { echo "operation $1 ended $phase" >&2; exit 1; }
}
for s in $(seq 1 $((nshards - 1))); do
    key=$(printf 'user%08d' $((keys * s / nshards)))
    op=""
    for _ in $(seq 1 60); do op=$(check split "$(api 1)" "$key") && break; sleep 1; done
    [[ "$op" =~ ^[0-9]+$ ]] || { echo "cannot split at $key: $op" >&2; exit 1; }
    wait_op "$op"
    echo "split at $key (op $op)"
done
echo "loading $keys keys of $value_size bytes ($fill_mb MiB)"
"$bench_bin" run --endpoints "$endpoints" --workload c --keys "$keys" --value-size "$value_size" --preload \
    --warmup 0s --duration 1s -c 32 >"$data/preload.out" 2>&1 || { cat "$data/preload.out" >&2; exit 1; }
grep -h preloaded "$data/preload.out" || true

# 3. Quiet: nothing running for $quiet seconds and every group in shape.
echo "waiting until no operation has run for ${quiet}s"
calm=$SECONDS
deadline=$((SECONDS + timeout))
while :; do
    state=$(check busy "$(api 1)" || echo error)
    [[ "$state" == "- | -" ]] || calm=$SECONDS
    ((SECONDS - calm >= quiet)) && break
    ((SECONDS < deadline)) || { echo "still busy after ${timeout}s: $state" >&2; exit 1; }
    sleep 1
done
echo "layout: $(check layout "$(api 1)")"

# 4. Kill the fullest node for good and time the healing.
read -r victim vreplicas vleaders vmeta <<<"$(check victim "$(api 1)")"
[[ "$victim" =~ ^[0-9]+$ ]] || { echo "cannot pick the node to kill: $victim" >&2; exit 1; }
survivor=$((victim % nodes + 1))
ep="$(api "$survivor")"
last_op=$(check last-op "$ep")
[[ "$last_op" =~ ^[0-9]+$ ]] || { echo "cannot list the operations: $last_op" >&2; exit 1; }
kill -9 "${pids[$((victim - 1))]}"
t0=$(now)
wait "${pids[$((victim - 1))]}" 2>/dev/null || true
echo "+0.0s  kill -9 node $victim ($vreplicas replicas, $vleaders leaders, metadata replica: $vmeta); polling node $survivor"
down="" healed="" readable="" last=""
deadline=$((SECONDS + timeout))
while [[ -z "$readable" ]]; do
    ((SECONDS < deadline)) || { echo "not healed after ${timeout}s: $last" >&2; exit 1; }
    if [[ -z "$down" && "$(check status "$ep" "$victim" 2>/dev/null)" == down ]]; then
        down=$(since "$t0")
        echo "+${down}s  node $victim is down for the rebalancer"
    fi
    if [[ -z "$healed" ]]; then
        last=$(check healed "$ep" "$victim" || true)
        if [[ "$last" == ok ]]; then
            healed=$(since "$t0")
            echo "+${healed}s  every group has 3 replicas off node $victim, one voter set, a live leader"
        fi
    fi
    if [[ -n "$healed" ]]; then
        found=$(check count "$ep" "$keys" || true)
        if [[ "$found" == "$keys" ]]; then
            readable=$(since "$t0")
            echo "+${readable}s  all $keys keys readable"
        else
            last="scan found $found of $keys keys"
        fi
    fi
    [[ -n "$readable" ]] || sleep 0.5
done
check heal-ops "$ep" "$victim" "$last_op" || true
echo "layout: $(check layout "$ep")"
echo "HEAL: node $victim ($vreplicas replicas, $vleaders leaders, metadata: $vmeta) killed; --node-dead-after ${dead_after}s;" \
    "down after ${down:-?}s; groups healed after ${healed}s; data readable after ${readable}s"
