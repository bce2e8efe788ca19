# Sourced by the benchmark scripts: where the binaries are, and the checks
# that what a script needs is there before it starts anything.
#
#   node_bin, bench_bin      cleave-node and cleave-bench from `cargo build --release
#                            --bins` under $CARGO_TARGET_DIR (~/.cache/cleavedb/target),
#                            or $CLEAVE_NODE_BIN / $CLEAVE_BENCH_BIN
#   need_bins NAME BIN...    exits 2 unless every BIN is executable (NAME: the script's)
#   need_tools NAME TOOL...  exits 2 unless every TOOL is on the PATH
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cleavedb/target}"
node_bin="${CLEAVE_NODE_BIN:-$CARGO_TARGET_DIR/release/cleave-node}"
bench_bin="${CLEAVE_BENCH_BIN:-$CARGO_TARGET_DIR/release/cleave-bench}"

need_bins() {
    local name=$1 bin
    shift
    for bin in "$@"; do
        [[ -x "$bin" ]] || { echo "$name: no $bin; run cargo build --release --bins" >&2; exit 2; }
    done
}

need_tools() {
    local name=$1 tool
    shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$name: $tool is needed" >&2; exit 2; }
    done
}
