#!/usr/bin/env bash
# Splits the key space of a running cluster into many ranges, each its own
# shard (Raft group), to measure what idle groups cost. The split keys are
# "$GROUPS_PREFIX0001", "$GROUPS_PREFIX0002", ... (all below "user", so the
# benchmark keys user%08d stay in one range). They are issued in bisection
# order, up to $GROUPS_PARALLEL at once, each on a different range (one
# operation per range: a split refused as busy is retried later), and
# followed with GET /admin/operations until each is done.
#
#   scripts/bench-idle-groups.sh HOST:PORT        # the API of any node
#
# Prints a progress line every $GROUPS_REPORT splits (splits/s overall and over
# the last batch, CPU of the local cleave-node processes listening on the
# cluster's API ports when they can be found) and a final `GROUPS:` line.
#
# Env (defaults):
#   GROUPS_SHARDS=1000    shards wanted in the end (GROUPS_SHARDS-1 splits from one range)
#   GROUPS_PARALLEL=8     splits in flight at once (with quiet groups the cluster keeps up: 16/s at first, 11/s by 3,000 shards)
#   GROUPS_PREFIX=idle/   split-key prefix
#   GROUPS_TIMEOUT=1800   stop starting splits after this many seconds (the
#                         ones in flight are still awaited); the figures say how far it got
#   GROUPS_REPORT=50      progress line every this many splits
set -euo pipefail

ep="${1:?usage: bench-idle-groups.sh HOST:PORT}"
command -v python3 >/dev/null || { echo "bench-idle-groups: python3 is needed" >&2; exit 2; }

GROUPS_EP="$ep" exec python3 - <<'PY'
import collections, json, os, sys, time, urllib.error, urllib.request

ep = os.environ["GROUPS_EP"]
shards = int(os.environ.get("GROUPS_SHARDS", "1000"))
par = int(os.environ.get("GROUPS_PARALLEL", "8"))
prefix = os.environ.get("GROUPS_PREFIX", "idle/")
timeout = float(os.environ.get("GROUPS_TIMEOUT", "1800"))
report = int(os.environ.get("GROUPS_REPORT", "50"))
base = f"http://{ep}"


def call(method, path, body=None, t=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=t) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        return 0, {"error": {"code": "unreachable", "message": str(e)}}


# Bisection order: each level splits ranges the previous level created.
n = shards - 1
order, q = [], collections.deque([(1, n)])
while q:
    lo, hi = q.popleft()
    if lo > hi:
        continue
    mid = (lo + hi) // 2
    order.append(f"{prefix}{mid:04d}")
    q.append((lo, mid - 1))
    q.append((mid + 1, hi))

# Local cleave-node processes (for the CPU column), by API port.
clk = os.sysconf("SC_CLK_TCK")


def local_nodes():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if not cmd or not cmd[0].endswith(b"cleave-node"):
            continue
        args = [c.decode(errors="replace") for c in cmd]
        if "--listen-api" in args:
            api = args[args.index("--listen-api") + 1]
            port = api.rsplit(":", 1)[-1]
            # same cluster: ports next to the one we were given
            if abs(int(port) - int(ep.rsplit(":", 1)[-1])) < 10:
                out[api] = int(pid)
    return out


def ticks(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except OSError:
        return 0


def rss_mib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


nodes = local_nodes()
t0 = time.time()
last_t, last_done, last_ticks = t0, 0, {a: ticks(p) for a, p in nodes.items()}
pending = collections.deque(order)
inflight = {}  # op_id -> key
done = aborted = refused = already = 0
errors = collections.Counter()
stopped = False
print(f"groups: {len(order)} splits to make ({shards} shards), {par} in flight, via {ep}; local nodes {sorted(nodes)}",
      flush=True)

last_note = t0
while inflight or (pending and not stopped):
    if time.time() - last_note > 30:
        last_note = time.time()
        print(f"groups: {done} done, {len(inflight)} in flight, {len(pending)} to start, refusals {dict(errors)}",
              flush=True)
    if time.time() - t0 > timeout and not stopped:
        stopped = True
        print(f"groups: timeout {timeout:.0f}s reached, waiting for the {len(inflight)} in flight", flush=True)
    skipped = []
    tries = 0
    while not stopped and pending and len(inflight) < par and tries < 3 * par:
        key = pending.popleft()
        tries += 1
        st, body = call("POST", "/admin/split", {"key": key})
        if st == 200 and body and "operation_id" in body:
            inflight[body["operation_id"]] = key
        elif st == 400 and "not strictly inside" in json.dumps(body):
            already += 1  # a boundary already (an earlier attempt went through after all)
        else:
            code = (body or {}).get("error", {}).get("code", str(st)) if isinstance(body, dict) else str(st)
            errors[code] += 1
            refused += 1
            skipped.append(key)
    pending.extendleft(reversed(skipped))
    time.sleep(0.25)
    if not inflight:
        continue
    st, ops = call("GET", "/admin/operations")
    if st != 200 or not isinstance(ops, list):
        errors[f"operations {st}"] += 1
        continue
    listed = {op.get("op_id") for op in ops}
    # finished operations beyond the directory's keep limit are pruned: gone means done
    ops += [{"op_id": oid, "phase": "done"} for oid in list(inflight) if oid not in listed]
    for op in ops:
        oid = op.get("op_id")
        if oid not in inflight:
            continue
        if op.get("phase") == "done":
            del inflight[oid]
            done += 1
            if done % report == 0:
                now = time.time()
                cpu = ""
                if nodes:
                    cur = {a: ticks(p) for a, p in nodes.items()}
                    cpu = "  node CPU % of a core: " + " ".join(
                        f"{a.rsplit(':', 1)[-1]}={100 * (cur[a] - last_ticks[a]) / clk / (now - last_t):.0f}"
                        for a in sorted(nodes)) + "  RSS MiB: " + " ".join(
                        f"{rss_mib(nodes[a]):.0f}" for a in sorted(nodes))
                    last_ticks = cur
                print(f"groups: {done:5d} splits done at {now - t0:7.1f}s  "
                      f"{done / (now - t0):5.2f}/s overall, {(done - last_done) / (now - last_t):5.2f}/s "
                      f"last {done - last_done}{cpu}", flush=True)
                last_t, last_done = now, done
        elif op.get("phase") == "aborted":
            key = inflight.pop(oid)
            aborted += 1
            pending.append(key)
            print(f"groups: operation {oid} aborted: {op.get('error')}", flush=True)

el = time.time() - t0
st, shards_now = call("GET", "/admin/shards")
count = len(shards_now) if isinstance(shards_now, list) else -1
print(f"GROUPS: {done} splits done in {el:.1f}s ({done / el:.2f}/s), {aborted} aborted, "
      f"{refused} refused and retried {dict(errors)}, {already} found split already, shards now {count}"
      f"{'' if not pending else f', {len(pending)} not started (timeout)'}", flush=True)
PY
