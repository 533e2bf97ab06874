#!/usr/bin/env bash
# artifactfs beside the machine's limits and the peers users would pick (rclone, httpdirfs,
# s3fs), one run, cases interleaved: see scripts/bench/peers.py. Needs root and /dev/fuse.
# Builds target/release/artifactfs and target/release/examples/bench_servers (the S3 test
# server; without it s3fs is reported as failing) when cargo is on the PATH and ARTIFACTFS_BIN
# is not set; otherwise they must be built already.
#
# Environment: BENCH_SIZE_MIB (1024), BENCH_FOUR_MIB (= SIZE), BENCH_FILES (10000),
# BENCH_ROUNDS (5), BENCH_DIR (/tmp/afs-bench-peers), BENCH_KEEP (0), BENCH_CASE_TIMEOUT (600),
# BENCH_FIO_RUNTIME (10), BENCH_OUT_DIR (target/bench), BENCH_CHART (docs/bench-peers.png),
# BENCH_SETTLE_S (4: seconds between a page-cache drop and a "page cache dropped" read),
# BENCH_DROPPED_PAIRS (3: such pairs of reads, tool and local file, per tool and round).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/apt-install.sh
[ "$(id -u)" = 0 ] || { echo "run as root (page cache drops and mounts need it)" >&2; exit 1; }

missing=()
for tool in curl:curl fusermount3:fuse3 nginx:nginx-extras rclone:rclone httpdirfs:httpdirfs s3fs:s3fs fio:fio; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
# WebDAV listings (PROPFIND) for rclone come from nginx-extras' dav_ext module.
[ -e /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ] || missing+=(nginx-extras)
# The chart: the system Python's matplotlib if the python3 on PATH has none.
PY=python3
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
        PY=/usr/bin/python3
    else
        missing+=(python3-matplotlib)
        PY=/usr/bin/python3
    fi
fi
apt_install "${missing[@]}"
if ! "$PY" -c 'import matplotlib' 2>/dev/null; then
    "$PY" -m pip install --quiet matplotlib || echo "matplotlib missing: the chart will be skipped" >&2
fi
if [ -z "${ARTIFACTFS_BIN:-}" ] && command -v cargo >/dev/null 2>&1; then
    cargo build --release --quiet --bin artifactfs --example bench_servers
fi
[ -x target/release/artifactfs ] || [ -n "${ARTIFACTFS_BIN:-}" ] || {
    echo "target/release/artifactfs is not built (cargo build --release)" >&2; exit 1; }
[ -x target/release/examples/bench_servers ] || \
    echo "note: target/release/examples/bench_servers is not built: s3fs will be reported as failing" >&2
exec "$PY" scripts/bench/peers.py "$@"
