#!/usr/bin/env bash
# Writes docker/secure/secret (the cluster secret) and docker/secure/tokens.toml
# (tokens admin, app (write) and reader (read)) for compose.secure.yml, readable
# by this user only; keeps files that are already there.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secure"
umask 077
mkdir -p "$dir"
[[ -f "$dir/secret" ]] || head -c 32 /dev/urandom | base64 >"$dir/secret"
if [[ ! -f "$dir/tokens.toml" ]]; then
    for t in admin:admin app:write reader:read; do
        printf '[[token]]\nname = "%s"\nsecret = "%s"\nrole = "%s"\n\n' \
            "${t%%:*}" "$(head -c 24 /dev/urandom | base64 | tr -d '/+=')" "${t##*:}"
    done >"$dir/tokens.toml"
fi
echo "secrets in $dir (tokens.toml: admin first)"
