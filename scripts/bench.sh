#!/usr/bin/env bash
# Benchmark artifactfs side by side with curl and local disk (see scripts/bench.py).
# Needs root (to drop the page cache) and FUSE. Environment: BENCH_SIZE_MIB (1024),
# BENCH_FILES (10000), BENCH_ROUNDS (5), BENCH_DIR (/tmp/artifactfs-bench).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || apt-get install -y curl
command -v fusermount3 >/dev/null || apt-get install -y fuse3
cargo build --release --quiet
exec python3 scripts/bench.py "$@"
