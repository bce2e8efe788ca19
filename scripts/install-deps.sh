#!/usr/bin/env bash
# Installs the system packages CleaveDB needs to build and test, only those
# that are missing: clang and libclang-dev (RocksDB's bindgen loads libclang
# at build time), a C++ compiler (RocksDB itself), and curl (scripts/cluster.sh).
# Safe to run repeatedly; uses sudo only when not root. Debian/Ubuntu (apt).
set -euo pipefail

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if command -v dpkg-query >/dev/null 2>&1; then
    dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "install ok installed" || missing+=(libclang-dev)
elif ! { ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; }; then
    missing+=(libclang-dev)
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: missing ${missing[*]} and no apt-get here; install them by hand" >&2
    exit 1
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
