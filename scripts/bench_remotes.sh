#!/usr/bin/env bash
# Cold reads through the mount on the built-in server, nginx WebDAV and S3 (s3s-fs), side by
# side with curl, and on the built-in server limiting each answer to BENCH_RATE per second
# (see scripts/bench_remotes.py). Needs root and FUSE, and nginx with the WebDAV module
# (scripts/test.sh installs it). Environment: BENCH_SIZE_MIB (1024), BENCH_ROUNDS (3),
# BENCH_DIR (/tmp/artifactfs-bench), BENCH_RATE (64M).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || apt-get install -y curl
command -v fusermount3 >/dev/null || apt-get install -y fuse3
[ -e /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ] || apt-get install -y nginx-extras
cargo build --release --quiet --bin artifactfs --example bench_servers
exec python3 scripts/bench_remotes.py "$@"
