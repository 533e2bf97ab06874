#!/usr/bin/env bash
# Foreground reads while a warm-up runs (see scripts/bench_priority.py). Needs root and FUSE.
# Environment: BENCH_WARM_MIB (4096), BENCH_TRIES (20), BENCH_DIR (/tmp/artifactfs-bench-priority).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || apt-get install -y curl
command -v fusermount3 >/dev/null || apt-get install -y fuse3
cargo build --release --quiet --bin artifactfs
exec python3 scripts/bench_priority.py "$@"
