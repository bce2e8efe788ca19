#!/usr/bin/env bash
# CleaveDB side by side with etcd, with CPU and memory figures.
#
# Starts a 3-node CleaveDB on 127.0.0.1 (API 29001-29003, RPC 29101-29103,
# `--max-splits 0`, data in a temp dir), optionally splits it into
# $BENCH_SHARDS shards (scripts/bench-idle-groups.sh; every node then hosts
# that many idle Raft groups), measures each node's idle CPU over
# $BENCH_IDLE_SECS seconds and its RSS, then runs ../shared/bench/vs-etcd.sh
# $BENCH_RUNS times (a fresh 3-node etcd each time) with CLEAVE_URL = the
# leader of the shard holding the benchmark keys.
#
# A `wrk` shim put first on PATH wraps every wrk call of vs-etcd.sh: it reads
# utime+stime (/proc/PID/stat) of the three cleave-node processes and of the
# three etcd processes (children of vs-etcd.sh) right before and after the
# load, VmHWM/VmRSS (/proc/PID/status) right after, and keeps wrk's whole
# output. From those this script prints, per phase,
#   CPU ms per acknowledged request = CPU of all three server processes
#                                     / (wrk's requests - non-2xx responses)
# and the peak RSS (VmHWM) of each server process.
#
# Env (defaults):
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target   binaries from `cargo build --release --bins`
#   CLEAVE_NODE_BIN       override the binary
#   BENCH_SHARDS=1        shards to create before measuring (1000: 999 splits)
#   BENCH_RUNS=1          vs-etcd.sh runs on the same cluster
#   BENCH_IDLE_SECS=30    idle-CPU window (no load), before the runs
#   BENCH_PERF=           a directory: also record `perf` profiles there (idle:
#                         every node for 10 s, after the idle window; put: the
#                         shard leader, the first 10 s of cleave put in run
#                         $BENCH_PERF_RUN, which carries perf's overhead).
#   BENCH_PERF_CG=dwarf,16384  perf's --call-graph (the binary has no frame pointers)
#   BENCH_PERF_RUN=$BENCH_RUNS  the run whose cleave put is profiled
#   BENCH_VS_ETCD=../shared/bench/vs-etcd.sh (from the repository root)
#   BENCH_DATA            data dir [a new /tmp/cleave-vs-etcd.XXXXXX], removed at the end unless BENCH_KEEP=1
#   BENCH_NODE_ARGS       further arguments for every node (e.g. --heartbeat-ms 500)
#   BENCH_SECONDS, BENCH_CONNS, BENCH_THREADS, BENCH_KEYS, GROUPS_*: passed on
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/stop-pids.sh"
source "$(dirname "${BASH_SOURCE[0]}")/lib/bins.sh"
cd "$(dirname "$0")/.."
repo=$(pwd)

shards="${BENCH_SHARDS:-1}"
runs="${BENCH_RUNS:-1}"
idle_secs="${BENCH_IDLE_SECS:-30}"
perf_dir="${BENCH_PERF:-}"
vs_etcd="${BENCH_VS_ETCD:-$repo/../shared/bench/vs-etcd.sh}"
keep="${BENCH_KEEP:-0}"
host=127.0.0.1
api_base=29000
raft_base=29100

need_tools bench-vs-etcd curl python3
need_bins bench-vs-etcd "$node_bin"
[[ -f "$vs_etcd" ]] || { echo "bench-vs-etcd: no $vs_etcd" >&2; exit 2; }
if ! command -v wrk >/dev/null || ! command -v etcd >/dev/null; then
    apt-get update -qq && apt-get install -y -qq etcd-server wrk >/dev/null
fi
real_wrk=$(command -v wrk)
[[ -z $perf_dir ]] || { command -v perf >/dev/null || { echo "bench-vs-etcd: BENCH_PERF needs perf" >&2; exit 2; }; }

data="${BENCH_DATA:-$(mktemp -d /tmp/cleave-vs-etcd.XXXXXX)}"
mkdir -p "$data"
data="$(cd "$data" && pwd)"
[[ -z $perf_dir ]] || { mkdir -p "$perf_dir"; perf_dir="$(cd "$perf_dir" && pwd)"; }

pids=()
stop() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n ${splitter:-} ]] && kill "$splitter" 2>/dev/null || true
    # our nodes only
    stop_pids "${pids[@]}"
    if [[ $keep == 1 ]]; then
        echo "bench-vs-etcd: data and logs kept in $data" >&2
    elif ((rc != 0)); then
        rm -rf "$data"/node?/ 2>/dev/null || true
        echo "bench-vs-etcd: failed ($rc); logs in $data" >&2
    else
        rm -rf "$data"
    fi
    exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

initial="1=$host:$((raft_base + 1)),2=$host:$((raft_base + 2)),3=$host:$((raft_base + 3))"
export NO_COLOR=1
# shellcheck disable=SC2086
for i in 1 2 3; do
    mkdir -p "$data/node$i"
    "$node_bin" --id "$i" --data-dir "$data/node$i" \
        --listen-api "$host:$((api_base + i))" --listen-raft "$host:$((raft_base + i))" \
        --initial-cluster "$initial" --max-splits 0 --merge-size 0 ${BENCH_NODE_ARGS:-} </dev/null >"$data/node$i.log" 2>&1 &
    pids+=($!)
done
for i in 1 2 3; do
    deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null --max-time 2 "http://$host:$((api_base + i))/health" 2>/dev/null; do
        kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { tail -n 30 "$data/node$i.log" >&2; exit 1; }
        ((SECONDS < deadline)) || { echo "node $i not healthy in 60 s" >&2; exit 1; }
        sleep 0.2
    done
done
echo "bench-vs-etcd: cluster up, pids ${pids[*]}, data $data; $(uptime)"

# The API address of the leader of the shard holding the key $1 (empty if none yet).
leader_of() {
    local a="http://$host:$((api_base + 1))"
    curl -fsS --max-time 10 -o "$data/directory.json" "$a/admin/directory" 2>/dev/null || return 0
    curl -fsS --max-time 10 -o "$data/shards.json" "$a/admin/shards" 2>/dev/null || return 0
    KEY="$1" D="$data" python3 -c '
import json, os
d = json.load(open(os.environ["D"] + "/directory.json")); k = os.environ["KEY"]
rs = [r for r in d["ranges"].values() if r["start"] <= k and (r["end"] is None or k < r["end"])]
sh = json.load(open(os.environ["D"] + "/shards.json"))
ld = [s["leader"] for s in sh if rs and s["shard_id"] == rs[0]["shard_id"]]
print(d["nodes"][str(ld[0])]["api_addr"] if ld and ld[0] is not None else "")' || true
}

if ((shards > 1)); then
    # In the background, so a TERM stops it with the nodes (bash runs its
    # trap only once a foreground child ends: a killed run left the
    # splitter splitting the next run's cluster).
    GROUPS_SHARDS=$shards bash scripts/bench-idle-groups.sh "$host:$((api_base + 1))" &
    splitter=$!
    wait "$splitter"
    splitter=
    echo "bench-vs-etcd: letting the cluster settle 10 s"
    sleep 10
fi

# perf.data -> FILE.self.txt (self time by function), FILE.incl.txt (inclusive), FILE.threads.txt
perf_reports() {
    local f=$1 r=${1%.data}
    perf report --no-inline -i "$f" --stdio --no-children -g none --sort symbol --percent-limit 0.3 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' >"$r.self.txt" || true
    perf report --no-inline -i "$f" --stdio --children -g none --sort symbol --percent-limit 2 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' >"$r.incl.txt" || true
    perf report --no-inline -i "$f" --stdio --no-children -g none --sort comm 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//' >"$r.threads.txt" || true
}

ticks() { # pid -> utime+stime in clock ticks
    local f
    f=$(<"/proc/$1/stat") && f=${f##*) } && read -r -a a <<<"$f" && echo $((a[11] + a[12]))
}
status_kb() { awk -v k="$2:" '$1==k{print $2}' "/proc/$1/status"; }
hz=$(getconf CLK_TCK)

echo "== idle: ${idle_secs}s, no load, $(uptime)"
declare -A t0
for i in 1 2 3; do t0[$i]=$(ticks "${pids[$((i - 1))]}"); done
sleep "$idle_secs"
for i in 1 2 3; do
    p=${pids[$((i - 1))]}
    t1=$(ticks "$p")
    awk -v n="$i" -v d=$((t1 - t0[$i])) -v hz="$hz" -v s="$idle_secs" -v rss="$(status_kb "$p" VmRSS)" \
        -v hwm="$(status_kb "$p" VmHWM)" -v thr="$(status_kb "$p" Threads)" \
        'BEGIN{printf "IDLE node %s: CPU %.1f%% of a core  RSS %.0f MiB  peak RSS %.0f MiB  threads %s\n", n, 100*d/hz/s, rss/1024, hwm/1024, thr}'
done
echo "groups per node: $(curl -fsS "http://$host:$((api_base + 1))/admin/shards" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') shards + the metadata group"

if [[ -n $perf_dir ]]; then
    perfs=()
    for i in 1 2 3; do
        perf record -e cpu-clock -F 199 --call-graph "${BENCH_PERF_CG:-dwarf,16384}" -p "${pids[$((i - 1))]}" -o "$perf_dir/idle-node$i.data" -- sleep 10 \
            >/dev/null 2>&1 &
        perfs+=($!)
    done
    wait "${perfs[@]}" 2>/dev/null || true
    for i in 1 2 3; do perf_reports "$perf_dir/idle-node$i.data"; done
    echo "perf: idle profiles in $perf_dir/idle-node*.{data,self.txt,incl.txt,threads.txt}"
fi

# The wrk shim: samples the server processes around each wrk call.
shim="$data/shim"
mkdir -p "$shim/bin"
cat >"$shim/bin/wrk" <<'SHIM'
#!/usr/bin/env bash
set -u
d=$BENCH_SHIM_DIR
script="" prev=""
for a in "$@"; do [[ $prev == -s ]] && script=$a; prev=$a; done
phase=$(basename "$script" .lua)
n=$(($(cat "$d/seq" 2>/dev/null || echo 0) + 1)); echo "$n" >"$d/seq"
tag=$(printf 'r%s-%02d-%s' "$BENCH_RUN" "$n" "$phase")
# targets: "label pid"; etcd = etcd processes whose parent is one of our ancestors
targets=$BENCH_CLEAVE_TARGETS
anc=" " p=$$
while [[ $p -gt 1 ]]; do anc+="$p "; p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null || echo 1); done
for s in /proc/[0-9]*/stat; do
    read -r pid comm _ ppid _ <"$s" 2>/dev/null || continue
    [[ $comm == "(etcd)" && $anc == *" $ppid "* ]] || continue
    name=$(tr '\0' '\n' <"/proc/$pid/cmdline" | awk 'f{print; exit} $0=="--name"{f=1}')
    targets+=$'\n'"etcd-$name $pid"
done
snap() {
    local label pid f a
    while read -r label pid; do
        [[ -n $label ]] || continue
        f=$(<"/proc/$pid/stat") || continue
        f=${f##*) }; read -r -a a <<<"$f"
        echo "$label $pid $((a[11] + a[12])) $(awk '$1=="VmHWM:"{h=$2} $1=="VmRSS:"{r=$2} END{print h, r}' "/proc/$pid/status")"
    done <<<"$targets"
    echo "box 0 $(awk '$1=="cpu"{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat)"
}
snap >"$d/$tag.before"
date +%s.%N >"$d/$tag.t0"
if [[ -n ${BENCH_PERF_DIR:-} && $phase == cleave-put && $BENCH_RUN == "$BENCH_PERF_RUN" ]]; then
    perf record -e cpu-clock -F 199 --call-graph "${BENCH_PERF_CG:-dwarf,16384}" -p "$BENCH_LEADER_PID" -o "$BENCH_PERF_DIR/put-r$BENCH_RUN.data" -- sleep 10 >/dev/null 2>&1 &
fi
"$BENCH_REAL_WRK" "$@" >"$d/$tag.wrk" 2>&1
rc=$?
date +%s.%N >"$d/$tag.t1"
snap >"$d/$tag.after"
wait
cat "$d/$tag.wrk"
exit $rc
SHIM
chmod +x "$shim/bin/wrk"

targets=""
for i in 1 2 3; do targets+="cleave-n$i ${pids[$((i - 1))]}"$'\n'; done

for run in $(seq 1 "$runs"); do
    url=""
    for _ in $(seq 1 100); do
        url=$(leader_of user00005000)
        [[ -n $url ]] && break
        sleep 0.2
    done
    [[ -n $url ]] || { echo "no leader for the benchmark keys" >&2; exit 1; }
    leader_pid=${pids[$((${url##*:} - api_base - 1))]}
    echo "== run $run/$runs: CLEAVE_URL=http://$url (node $((${url##*:} - api_base))), $(uptime)"
    BENCH_SHIM_DIR=$shim BENCH_RUN=$run BENCH_REAL_WRK=$real_wrk BENCH_CLEAVE_TARGETS=$targets \
        BENCH_PERF_DIR=$perf_dir BENCH_PERF_RUN=${BENCH_PERF_RUN:-$runs} BENCH_LEADER_PID=$leader_pid PATH="$shim/bin:$PATH" \
        CLEAVE_URL="http://$url" bash "$vs_etcd"
    echo "-- run $run figures ($(uptime)):"
    SHIM=$shim RUN=$run HZ=$hz python3 - <<'PY'
import glob, os, re
d, run, hz = os.environ["SHIM"], os.environ["RUN"], int(os.environ["HZ"])
def load(p):
    out = {}
    for line in open(p):
        f = line.split()
        out[f[0]] = f[1:]
    return out
for w in sorted(glob.glob(f"{d}/r{run}-*.wrk")):
    tag = os.path.basename(w)[:-4]
    phase = tag.split("-", 2)[2]
    text = open(w).read()
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    reqs = int(m.group(1)) if m else 0
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    bad = int(bad.group(1)) if bad else 0
    errs = re.search(r"Socket errors: (.*)", text)
    acked = reqs - bad
    b, a = load(f"{d}/{tag}.before"), load(f"{d}/{tag}.after")
    secs = float(open(f"{d}/{tag}.t1").read()) - float(open(f"{d}/{tag}.t0").read())
    side = "etcd" if phase.startswith("etcd") else "cleave"
    procs = sorted(k for k in a if k.startswith(side + "-") and k in b)
    cpu = {k: (int(a[k][1]) - int(b[k][1])) * 1000 / hz for k in procs}
    other = sorted(k for k in a if k != "box" and k not in procs and k in b)
    ocpu = sum((int(a[k][1]) - int(b[k][1])) * 1000 / hz for k in other)
    busy = int(a["box"][1]) - int(b["box"][1]); idle = int(a["box"][2]) - int(b["box"][2])
    tot = sum(cpu.values())
    print(f"{phase:11s} {acked} acked of {reqs} in {secs:.1f}s ({acked / secs:.0f}/s), non-2xx {bad}"
          + (f", socket errors {errs.group(1)}" if errs else ""))
    print(f"            CPU {tot:.0f} ms = {tot / max(acked, 1):.4f} ms per acked request"
          f" ({100 * tot / 1000 / secs:.0f}% of a core; " + " ".join(f"{k} {v:.0f}" for k, v in cpu.items()) + ")")
    print("            peak RSS (VmHWM) MiB: " + " ".join(f"{k} {int(a[k][2]) / 1024:.0f}" for k in procs)
          + "   RSS now: " + " ".join(f"{int(a[k][3]) / 1024:.0f}" for k in procs))
    print(f"            box busy {100 * busy / max(busy + idle, 1):.0f}% of 2 cores"
          + (f"; the other side's processes meanwhile: {ocpu:.0f} ms" if other else ""))
PY
done
if [[ -n $perf_dir ]]; then
    for f in "$perf_dir"/put-r*.data; do
        [[ -f $f ]] && perf_reports "$f"
    done
    echo "perf: put profiles in $perf_dir/put-r*.{data,self.txt,incl.txt,threads.txt}"
fi
echo "bench-vs-etcd: done, $(uptime)"
