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
# Every test's temp dirs (mount points, caches, served folders) go under one folder of this
# run, so the check at the end looks at this run's mounts only: a mount someone else left on
# the machine (or a run killed before its guards could unmount) is not ours to judge.
run_tmp=$(mktemp -d "${TMPDIR:-/tmp}/artifactfs-test.XXXXXX")
# Web servers the tests start drop to their own user, which must be able to pass through it.
chmod 755 "$run_tmp"
export TMPDIR=$run_tmp
# Tests a remote cannot run are skipped by name, with the capability it lacks: listed below.
export AFS_SKIPPED
AFS_SKIPPED=$(mktemp "${run_tmp}.skipped.XXXXXX")
ours() { awk -v dir="$run_tmp/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo; }
cleanup() {
    rm -f "$AFS_SKIPPED"
    # Never remove a folder with a mount in it: detach what is left first.
    for m in $(ours); do umount -l "$m" 2>/dev/null || true; done
    [ -z "$(ours)" ] && rm -rf "$run_tmp"
}
trap cleanup EXIT
others=$(grep -c "fuse.artifactfs" /proc/self/mountinfo || true)
[ "$others" = 0 ] || echo "note: $others artifactfs mount(s) not of this run are on the machine; they are left alone" >&2
# One build on a clean clone: incremental state would only take disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
cargo test --locked --all-targets
if [ -s "$AFS_SKIPPED" ]; then
    echo "skipped: $(wc -l < "$AFS_SKIPPED") remote-specific tests (the remote lacks what they need):"
    sort "$AFS_SKIPPED" | sed 's/^/  /'
fi
# Nothing of this run may stay mounted.
left=$(ours)
if [ -n "$left" ]; then
    echo "a test left a mount behind:" >&2
    echo "$left" | sed 's/^/  /' >&2
    exit 1
fi
