#!/usr/bin/env bash
# A whole-file PUT against an upload session of the same bytes, on the built-in server.
#
#   scripts/bench_upload.sh [ROUNDS] [SIZE] [OFFSETS]
#
# Starts `artifactfs serve` on 127.0.0.1:0 over a fresh folder (BENCH_ROOT, default
# /tmp/afs-bench-upload), then, ROUNDS times (5), interleaved, with a fresh random file of SIZE
# (1G) each time, in /dev/shm so reading it costs no disk:
#   (a) curl -T file URL/a.bin
#   (b) POST URL/b.bin?afs=upload, the file's 8 MiB parts sent with curl -T, 4 at once, each
#       with offset=O when OFFSETS is 1 (the default; 0 sends them without), then the commit.
# Between two measurements it waits for the server's background work on the last file (a
# GET ?afs=chunks joins it), deletes it and runs sync, so neither case pays for the other.
# Prints each time (the session's split into sending the parts and the commit) and the
# medians. Needs curl, jq and bc; runs BENCH_BIN, default the release binary under
# CARGO_TARGET_DIR (cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SIZE=${2:-1G}
OFFSETS=${3:-1}
PART=$((8 << 20))
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-target}/release/artifactfs}
ROOT=${BENCH_ROOT:-/tmp/afs-bench-upload}
WORK=$(mktemp -d /dev/shm/afs-bench-XXXXXX)
rm -rf "$ROOT" && mkdir -p "$ROOT"
"$BIN" serve "$ROOT" --listen 127.0.0.1:0 --log-level warn >"$WORK/serve.out" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do
    grep -q listening "$WORK/serve.out" && break
    sleep 0.05
done
URL=$(sed -n 's/^listening on //p' "$WORK/serve.out")

now() { date +%s.%N; }

put_whole() {
    curl -sS -f -o /dev/null -T "$WORK/file" "$URL/a.bin"
}

session() {
    local id n
    id=$(curl -sS -f -X POST "$URL/b.bin?afs=upload" | jq -r .upload)
    n=0
    for p in "$WORK"/part.*; do
        n=$((n + 1))
        local extra="&nooffset=1" # an unknown parameter: ignored (xargs -L joins lines ending in a blank)
        [ "$OFFSETS" = 1 ] && extra="&offset=$(((n - 1) * PART))"
        echo "$n $p $extra"
    done | xargs -P 4 -L 1 sh -c \
        'curl -sS -f -o "'"$WORK"'/stored.$0" -T "$1" "'"$URL"'/b.bin?afs=part&upload='"$id"'&part=$0$2"'
    tp=$(now)
    jq -s '{parts: [sort_by(.part)[] | {part, tag}]}' "$WORK"/stored.* >"$WORK/commit.json"
    curl -sS -f -o /dev/null -X POST --data-binary @"$WORK/commit.json" "$URL/b.bin?afs=commit&upload=$id"
    rm -f "$WORK"/stored.*
}

# Waits for the server's work on the file just written (a GET ?afs=chunks joins a background
# job), removes it (so no measured rename frees its blocks), flushes the disk.
settle() {
    curl -sS -f -o /dev/null "$URL/$1?afs=chunks"
    curl -sS -f -o /dev/null -X DELETE "$URL/$1"
    sync
    sleep 1
}

A=()
B=()
for r in $(seq "$ROUNDS"); do
    head -c "$SIZE" /dev/urandom >"$WORK/file"
    t0=$(now)
    put_whole
    t1=$(now)
    A+=("$(echo "$t1 - $t0" | bc)")
    settle a.bin

    head -c "$SIZE" /dev/urandom >"$WORK/file"
    rm -f "$WORK"/part.*
    split -b "$PART" -d -a 5 "$WORK/file" "$WORK/part."
    t0=$(now)
    session
    t1=$(now)
    B+=("$(echo "$t1 - $t0" | bc)")
    cmp "$WORK/file" "$ROOT/b.bin"
    settle b.bin
    echo "round $r: put ${A[-1]} s, session ${B[-1]} s (parts $(echo "$tp - $t0" | bc) s, commit $(echo "$t1 - $tp" | bc) s)"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ma=$(median "${A[@]}")
mb=$(median "${B[@]}")
echo "median: put $ma s, session $mb s, ratio $(echo "scale=3; $mb / $ma" | bc)"
