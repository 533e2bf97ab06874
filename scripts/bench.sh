#!/usr/bin/env bash
# Benchmark artifactfs side by side with curl and local disk (see scripts/bench.py), then the
# cold reads on each kind of remote: built-in server, nginx WebDAV, S3 (scripts/bench_remotes.py).
# Needs root (to drop the page cache) and FUSE. Environment: BENCH_SIZE_MIB (1024),
# BENCH_FILES (10000), BENCH_ROUNDS (5), BENCH_DIR (/tmp/artifactfs-bench), BENCH_REMOTES
# (1; 0 skips the remotes part), BENCH_READERS (0; N > 1 adds N readers of N files at once), BENCH_MOUNT_ARGS (more
# `mount` arguments, e.g. "--config FILE"), BENCH_SETTLE_S (4: seconds between a page-cache drop
# and a "page cache dropped" read), BENCH_DROPPED_PAIRS (3: such pairs of reads per round).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || apt-get install -y curl
command -v fusermount3 >/dev/null || apt-get install -y fuse3
cargo build --release --quiet
python3 scripts/bench.py "$@"
if [ "${BENCH_REMOTES:-1}" = 1 ]; then
    scripts/bench_remotes.sh
fi
