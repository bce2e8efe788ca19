#!/usr/bin/env bash
# Builds the server and runs every test of the workspace, the multi-node
# integration tests (tests/) included.
#
#   scripts/test.sh                          # everything
#   scripts/test.sh -p cleave-tests --test replication   # args replace `--workspace`
#
# Env: CARGO_TARGET_DIR (default ~/.cache/cleavedb/target, shared with the
# other scripts so RocksDB compiles once), CLEAVE_TEST_THREADS (default 2),
# CLEAVE_KEEP_DATA=1 keeps the test clusters' data dirs and logs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cleavedb/target}"
export CLEAVE_NODE_BIN="${CLEAVE_NODE_BIN:-$CARGO_TARGET_DIR/release/cleave-node}"

cargo build --release --bins
if (($# == 0)); then
    set -- --workspace
fi
cargo test --release --no-fail-fast "$@" -- --test-threads="${CLEAVE_TEST_THREADS:-2}"
