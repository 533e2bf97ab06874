#!/usr/bin/env bash
# Runs every test: unit tests, and end-to-end tests that mount for real (root and /dev/fuse
# needed for those). Installs what a fresh Debian machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/apt-install.sh
missing=()
for tool in fusermount3:fuse3 python3:python3 tar:tar curl:curl sha256sum:coreutils rsync:rsync; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
# Real web servers the tests start on 127.0.0.1: nginx with WebDAV listings (dav_ext) and
# Apache mod_dav (partial PUT).
[ -e /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ] || missing+=(nginx-extras)
[ -e /usr/lib/apache2/modules/mod_dav_fs.so ] || missing+=(apache2)
apt_install "${missing[@]}"
[ -e /dev/fuse ] || { echo "no /dev/fuse: the end-to-end tests need FUSE" >&2; exit 1; }
# Tests a remote cannot run are skipped by name, with the capability it lacks: listed below.
export AFS_SKIPPED
AFS_SKIPPED=$(mktemp)
trap 'rm -f "$AFS_SKIPPED"' EXIT
# One build on a clean clone: incremental state would only take disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo test --locked --all-targets
if [ -s "$AFS_SKIPPED" ]; then
    echo "skipped: $(wc -l < "$AFS_SKIPPED") remote-specific tests (the remote lacks what they need):"
    sort "$AFS_SKIPPED" | sed 's/^/  /'
fi
# Nothing of ours may stay mounted.
if grep -q "fuse.artifactfs\|artifactfs:" /proc/self/mountinfo; then
    echo "a test left an artifactfs mount behind:" >&2
    grep "artifactfs" /proc/self/mountinfo >&2
    exit 1
fi
