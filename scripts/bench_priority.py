#!/usr/bin/env python3
"""Foreground reads against a running warm-up: the time to read the first MiB of an uncached
artifact, 20 tries without a warm-up and 20 while `artifactfs warm` fetches a large artifact
(4 GiB by default) on the same mount. Reports p50 and p99 of both and their ratio (the
target: within 3x). Run through scripts/bench_priority.sh (root).

The server's files are read into the page cache first (BENCH_SERVER_WARM=0 skips it): the
server stands for a remote machine, whose disk reads do not compete with the mount's cache
writes for this machine's disk. The mount's cache starts empty.
"""

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import bench_remotes  # noqa: E402
from bench_remotes import Mount  # noqa: E402

BIN = bench.BIN
WORK = os.environ.get("BENCH_DIR", "/tmp/artifactfs-bench-priority")
WARM_MIB = int(os.environ.get("BENCH_WARM_MIB", "4096"))
TRIES = int(os.environ.get("BENCH_TRIES", "20"))
OUT = os.environ.get("BENCH_OUT", "target/bench/priority.md")


def first_mib(path):
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        f.read(1 << 20)
    return time.perf_counter() - t


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root (dropping the page cache needs it)")
    bench.WORK = WORK
    bench_remotes.WORK = WORK
    store = os.path.join(WORK, "store")
    os.makedirs(store, exist_ok=True)
    big = os.path.join(store, "warm.bin")
    if not os.path.exists(big) or os.path.getsize(big) != WARM_MIB << 20:
        with open(big, "wb") as f:
            for _ in range(WARM_MIB):
                f.write(os.urandom(1 << 20))
    for i in range(2 * TRIES):
        p = os.path.join(store, f"a{i:02}.bin")
        if not os.path.exists(p):
            with open(p, "wb") as f:
                f.write(os.urandom(8 << 20))
    # The server stands for a remote machine with its own disks: its files are in its page
    # cache, so the two sides do not compete for this machine's one disk. Our cache starts
    # empty (a new directory).
    if os.environ.get("BENCH_SERVER_WARM", "1") == "1":
        for name in [n for n in os.listdir(store) if n.endswith(".bin")]:
            bench.cat(os.path.join(store, name))
    else:
        bench.drop_caches()
    server = subprocess.Popen([BIN, "serve", store, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().split()[-1]
    subprocess.run(["curl", "-sfI", f"{url}/warm.bin"], check=True, stdout=subprocess.DEVNULL)
    mnt = os.path.join(WORK, "mnt")
    cache = os.path.join(WORK, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    try:
        m = Mount(url, mnt, cache)
    except BaseException:
        server.terminate()
        raise
    try:
        os.listdir(mnt)
        alone = [first_mib(os.path.join(mnt, f"a{i:02}.bin")) for i in range(TRIES)]
        warm = subprocess.Popen([BIN, "warm", os.path.join(mnt, "warm.bin"), "--no-progress"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        during = []
        for i in range(TRIES, 2 * TRIES):
            during.append(first_mib(os.path.join(mnt, f"a{i:02}.bin")))
            time.sleep(0.1)
        still = warm.poll() is None
        warm.wait()
    finally:
        m.close()
        server.terminate()
        server.wait()
        shutil.rmtree(cache, ignore_errors=True)
    rows = [
        f"Time to read the first MiB of an uncached 8 MiB artifact, {TRIES} tries each (ms).",
        "",
        "| | p50 | p99 |",
        "|---|---|---|",
        f"| alone | {pct(alone, 50) * 1000:.1f} | {pct(alone, 99) * 1000:.1f} |",
        f"| during a warm-up of {WARM_MIB} MiB | {pct(during, 50) * 1000:.1f} | {pct(during, 99) * 1000:.1f} |",
        f"| ratio | {pct(during, 50) / pct(alone, 50):.2f}x | {pct(during, 99) / pct(alone, 99):.2f}x |",
        "",
        f"The warm-up was {'still running' if still else 'finished'} after the last try.",
    ]
    text = "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
