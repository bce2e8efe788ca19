# Sourced by the scripts that start nodes: stops them at the end.
#
#   stop_pids PID...   TERM, up to 5 s for every one to exit, then KILL the
#                      rest, then reap them (`wait`).
stop_pids() {
    (($#)) || return 0
    kill "$@" 2>/dev/null || true
    local deadline=$((SECONDS + 5)) alive pid
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    kill -9 "$@" 2>/dev/null || true
    wait 2>/dev/null || true
}
