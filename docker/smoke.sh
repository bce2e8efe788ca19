#!/usr/bin/env bash
# Smoke test of the Docker image and docker/compose.yml (run by .ci/run):
# builds the image, starts a 3-node cluster under a project name of its own
# (own network, volumes and ephemeral host ports, so it never touches another
# cluster), writes and reads through the HTTP API, kills the shard leader's
# container, writes and reads through the others, starts it again, checks it
# serves and has caught up, and always removes everything it created.
#
# Fails loudly when Docker is unusable, unless CLEAVE_SKIP_DOCKER=1.
# Env: CLEAVE_NO_BUILD=1 (reuse the binaries already built), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

failure=""
fail() {
    failure="$*"
    echo "docker/smoke.sh: FAILED: $*" >&2
    exit 1
}
note() { echo "== smoke: $* ($((SECONDS - started)) s)"; }

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    if [[ "${CLEAVE_SKIP_DOCKER:-}" == 1 ]]; then
        echo "docker/smoke.sh: SKIPPED (Docker is not usable and CLEAVE_SKIP_DOCKER=1)" >&2
        exit 0
    fi
    fail "Docker is not usable here (docker missing or 'docker info' fails); set CLEAVE_SKIP_DOCKER=1 to skip on purpose"
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
command -v curl >/dev/null || fail "curl is needed"

note "building the image"
bash docker/build-image.sh

project="cleave-smoke-$$"
export CLEAVE_PORT_1="" CLEAVE_PORT_2="" CLEAVE_PORT_3="" # any free host ports
compose() { "${compose_cmd[@]}" -p "$project" -f docker/compose.yml "$@"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((rc != 0)); then
        echo "---- last node logs ----" >&2
        compose logs --no-color --tail 40 >&2 2>&1 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || echo "docker/smoke.sh: 'down -v' of project $project failed" >&2
    if ((rc == 0)); then
        note "passed"
    else
        echo "docker/smoke.sh: FAILED after $((SECONDS - started)) s: ${failure:-exit status $rc}" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# url N: the base URL of node N's API on the host (its port changes on restart).
url() { echo "http://$(compose port "node$1" 7001 | tail -n 1)"; }

# eventually SECONDS WHAT CMD...: runs CMD until it succeeds, or fails after SECONDS.
eventually() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what: not done within $limit s (last try: $*)"
        sleep 0.3
    done
}
healthy() { curl -fsS --max-time 2 "$(url "$1")/health"; }
put() { curl -fsS --max-time 5 -X PUT "$(url "$1")/v1/kv/$2" -H 'content-type: application/json' -d "{\"value\": $3}"; }
# has N KEY VALUE [QUERY]: node N answers KEY with exactly VALUE.
has() {
    curl -fsS --max-time 5 "$(url "$1")/v1/kv/$2${4:-}" | grep -qF "\"value\":$3,"
}

note "starting a 3-node cluster (project $project)"
compose up -d node1 node2 node3
for n in 1 2 3; do eventually 60 "node $n healthy" healthy "$n"; done

note "write and read through the API"
eventually 30 "first write via node 1" put 1 smoke '{"n":1}'
for n in 1 2 3; do eventually 10 "read via node $n" has "$n" smoke '{"n":1}'; done

# The shard's leader, polled: right after start the rebalancer may be
# moving leaders, and mid-transfer /admin/shards names none.
shard_leader() { curl -fsS --max-time 2 "$(url 1)/admin/shards" | grep -o '"leader":[0-9]*' | head -n 1 | cut -d: -f2; }
leader="" deadline=$((SECONDS + 15))
until leader="$(shard_leader || true)"; [[ "$leader" =~ ^[123]$ ]]; do
    ((SECONDS < deadline)) || fail "no shard leader in /admin/shards within 15 s: $(curl -sS "$(url 1)/admin/shards")"
    sleep 0.3
done
others=()
for n in 1 2 3; do ((n == leader)) || others+=("$n"); done
container="$(compose ps -q "node$leader")"

note "killing node $leader (the shard leader, container ${container:0:12})"
docker kill "$container" >/dev/null
eventually 30 "write via node ${others[0]} with node $leader down" put "${others[0]}" smoke '{"n":2}'
eventually 10 "read via node ${others[1]} with node $leader down" has "${others[1]}" smoke '{"n":2}'
eventually 10 "second key via node ${others[1]}" put "${others[1]}" smoke2 '"while-down"'
eventually 10 "read it via node ${others[0]}" has "${others[0]}" smoke2 '"while-down"'

note "starting node $leader again"
docker start "$container" >/dev/null
eventually 60 "node $leader healthy again" healthy "$leader"
eventually 30 "node $leader's own replica caught up" has "$leader" smoke2 '"while-down"' '?consistency=stale'
eventually 30 "linearizable read via node $leader" has "$leader" smoke '{"n":2}'
eventually 30 "write via node $leader" put "$leader" smoke '{"n":3}'
for n in 1 2 3; do eventually 10 "final read via node $n" has "$n" smoke '{"n":3}'; done
