#!/usr/bin/env bash
# Runs every test: unit tests, and end-to-end tests that mount for real (root and /dev/fuse
# needed for those). Installs what a fresh Debian machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in fusermount3:fuse3 python3:python3 tar:tar curl:curl sha256sum:coreutils rsync:rsync; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y "${missing[@]}" || { apt-get update -qq && apt-get install -y "${missing[@]}"; }
fi
[ -e /dev/fuse ] || { echo "no /dev/fuse: the end-to-end tests need FUSE" >&2; exit 1; }
cargo test --locked --all-targets
# Nothing of ours may stay mounted.
if grep -q "fuse.artifactfs\|artifactfs:" /proc/self/mountinfo; then
    echo "a test left an artifactfs mount behind:" >&2
    grep "artifactfs" /proc/self/mountinfo >&2
    exit 1
fi
