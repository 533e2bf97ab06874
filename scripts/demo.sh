#!/usr/bin/env bash
# The main job on the embedded default: generate a sample artifact store, serve it with the
# built-in server on 127.0.0.1, mount it, and use it with ordinary tools. The mount stays up
# for you to explore; `scripts/demo.sh stop` unmounts and stops the server.
#
# Environment: DEMO_DIR (default /tmp/artifactfs-demo), DEMO_PORT (default 8787).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DEMO_DIR:-/tmp/artifactfs-demo}
PORT=${DEMO_PORT:-8787}
BIN=target/release/artifactfs

stop() {
    if [ -x "$BIN" ] && grep -q " $DIR/mnt " /proc/self/mountinfo 2>/dev/null; then
        "$BIN" unmount "$DIR/mnt"
    fi
    if [ -f "$DIR/serve.pid" ]; then
        kill "$(cat "$DIR/serve.pid")" 2>/dev/null || true
        rm -f "$DIR/serve.pid"
    fi
}

if [ "${1:-}" = stop ]; then
    stop
    echo "stopped"
    exit 0
fi

if ! command -v fusermount3 >/dev/null || ! command -v curl >/dev/null; then
    apt-get install -y fuse3 curl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y fuse3 curl; }
fi
cargo build --release --quiet
stop

echo "== generating a sample store in $DIR/store"
mkdir -p "$DIR/store/models/resnet" "$DIR/store/datasets/mini" "$DIR/store/releases/v1.2.0" "$DIR/mnt"
[ -s "$DIR/store/models/resnet/weights.bin" ] || head -c 256M /dev/urandom > "$DIR/store/models/resnet/weights.bin"
echo '{"arch": "resnet50", "classes": 1000}' > "$DIR/store/models/resnet/config.json"
for i in $(seq 1 200); do head -c $((RANDOM * 4)) /dev/urandom > "$DIR/store/datasets/mini/sample-$i.bin"; done
tar -C "$DIR/store/datasets" -cf "$DIR/store/releases/v1.2.0/dataset.tar" mini
echo "hello from artifactfs" > "$DIR/store/README.txt"

echo "== serving it: artifactfs serve $DIR/store --listen 127.0.0.1:$PORT"
"$BIN" serve "$DIR/store" --listen "127.0.0.1:$PORT" > "$DIR/serve.out" 2> "$DIR/serve.log" &
echo $! > "$DIR/serve.pid"
for _ in $(seq 100); do grep -q listening "$DIR/serve.out" 2>/dev/null && break; sleep 0.05; done
URL=$(awk '/listening/ {print $3}' "$DIR/serve.out")

echo "== mounting: artifactfs mount $URL $DIR/mnt --cache-dir $DIR/cache"
"$BIN" mount "$URL" "$DIR/mnt" --cache-dir "$DIR/cache"

echo "== ls -lR (first levels)"
ls -lR "$DIR/mnt" | head -n 20 || true
echo "== sha256sum through the mount and of the source"
time sha256sum "$DIR/mnt/models/resnet/weights.bin"
sha256sum "$DIR/store/models/resnet/weights.bin"
echo "== again, now from the cache"
time sha256sum "$DIR/mnt/models/resnet/weights.bin"
echo "== tar -tf"
tar -tf "$DIR/mnt/releases/v1.2.0/dataset.tar" | head -n 3 || true
echo "== python"
python3 -c "import json,sys; print(json.load(open(sys.argv[1])))" "$DIR/mnt/models/resnet/config.json"
cmp "$DIR/mnt/releases/v1.2.0/dataset.tar" "$DIR/store/releases/v1.2.0/dataset.tar" && echo "dataset.tar: identical"
echo "== writing through the mount (an append sends only the appended bytes)"
echo "written through artifactfs at $(date)" > "$DIR/mnt/NOTES.txt"
echo "appended" >> "$DIR/mnt/NOTES.txt"
echo "on the server: $(tr '\n' ' ' < "$DIR/store/NOTES.txt")"
echo "== live figures of the mount"
"$BIN" status "$DIR/mnt"
echo "== cache stats (the mount saves its hit counters every 2 s)"
"$BIN" cache stats --cache-dir "$DIR/cache"
echo
echo "Mounted at $DIR/mnt (server pid $(cat "$DIR/serve.pid")). Stop with: scripts/demo.sh stop"
