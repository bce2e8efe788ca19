#!/usr/bin/env bash
# Builds the `cleavedb:local` image FROM scratch, without pulling anything:
# the release `cleave-node` and `cleave` binaries (debug info stripped), exactly
# the shared libraries `ldd` says they link plus the dynamic loader, and a few
# /etc files. No base image, no registry, no package manager.
#
# Env (defaults):
#   CARGO_TARGET_DIR=~/.cache/cleavedb/target   where `cargo build --release --bins` puts them
#   CLEAVE_IMAGE=cleavedb:local                  tag of the image
#   CLEAVE_NO_BUILD=1                            skip cargo; use the binaries already built
#   CLEAVE_IMAGE_BINS="cleave-node cleave"       binaries to put in /usr/local/bin
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cleavedb/target}"
tag="${CLEAVE_IMAGE:-cleavedb:local}"
bins="${CLEAVE_IMAGE_BINS:-cleave-node cleave}"
uid=65532 # the node runs as this user; it owns the data directory

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "cannot talk to the docker daemon (docker info fails)"
for tool in ldd strip; do command -v "$tool" >/dev/null || die "$tool is needed"; done

if [[ "${CLEAVE_NO_BUILD:-}" != 1 ]]; then
    cargo build --release --bins
fi
release="$CARGO_TARGET_DIR/release"

stage="$(mktemp -d "${TMPDIR:-/tmp}/cleave-image.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$stage/data"
chmod 1777 "$root/tmp"

# Copies $1 (following symlinks) to the same path under the rootfs.
put() {
    [[ -e "$root$1" ]] && return 0
    mkdir -p "$root$(dirname "$1")"
    cp -L "$1" "$root$1"
}

for bin in $bins; do
    src="$release/$bin"
    [[ -x "$src" ]] || die "$src is missing (build failed, or CLEAVE_NO_BUILD=1 without a build)"
    strip --strip-debug -o "$root/usr/local/bin/$bin" "$src"
    # `ldd` lines: "libx.so.6 => /lib/.../libx.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
    # "linux-vdso.so.1 (0x...)" (in the kernel, nothing to copy) or "libx.so => not found".
    deps="$(ldd "$src")" || die "ldd $src failed"
    if grep -q "not found" <<<"$deps"; then
        die "$bin links libraries this machine does not have:"$'\n'"$deps"
    fi
    while read -r lib; do
        put "$lib"
    done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps")
done

# The loader finds the libraries in its default directories (/lib/x86_64-linux-gnu
# is one on Debian); a cache makes that explicit for any loader.
ldconfig -r "$root" 2>/dev/null || true

# Name lookup: the peers' service names (Docker's /etc/hosts and DNS, which
# the engine mounts into every container); glibc >= 2.34 has files and dns
# built into libc, so no libnss_* is needed.
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/nonexistent\ncleave:x:%d:%d:cleave:/data:/nonexistent\n' "$uid" "$uid" >"$root/etc/passwd"
printf 'root:x:0:\ncleave:x:%d:\n' "$uid" >"$root/etc/group"

revision="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! git diff --quiet HEAD 2>/dev/null; then revision+="-dirty"; fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"

cat >"$stage/Dockerfile" <<EOF
FROM scratch
COPY rootfs/ /
COPY --chown=$uid:$uid data /data
LABEL org.opencontainers.image.title="CleaveDB" \\
      org.opencontainers.image.version="$version" \\
      org.opencontainers.image.revision="$revision"
ENV CLEAVE_DATA_DIR=/data \\
    CLEAVE_LISTEN_API=0.0.0.0:7001 \\
    CLEAVE_LISTEN_RAFT=0.0.0.0:7101 \\
    NO_COLOR=1
USER $uid:$uid
WORKDIR /data
VOLUME /data
EXPOSE 7001 7101
ENTRYPOINT ["/usr/local/bin/cleave-node"]
EOF

# The legacy builder needs nothing but the daemon; BuildKit needs the buildx plugin.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
docker build --quiet -t "$tag" "$stage" >/dev/null || die "docker build failed"

echo "built $tag ($revision): $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1 / 1e6 }')"
(cd "$root" && find . -type f -o -type l | sed 's|^\.||' | sort | while read -r f; do
    printf '  %-50s %s\n' "$f" "$(du -h "$root$f" | cut -f1)"
done)
