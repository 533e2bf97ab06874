#!/usr/bin/env python3
"""Cold reads through the mount on each kind of remote, side by side with curl.

Run through scripts/bench_remotes.sh. One run, cases interleaved, the median of ROUNDS:
for the built-in server, nginx WebDAV (sendfile on) and an S3 server (s3s-fs), each serving
the same SIZE file on 127.0.0.1:
  mount: cold sequential read through a new mount with a new cache dir, page cache dropped
  curl -o FILE: the download a user would do instead, into the cache's filesystem
  curl -o /dev/null: the wire alone
and the built-in server sending each answer at most BENCH_RATE bytes per second
(`serve --limit-rate`, 64M), as a server far away or one that limits each client connection:
the mount with its number of parallel GETs adapting (the default) and fixed at the built-in
server's 16 (`--concurrency 16`, as before it adapted), against one `curl -o FILE` and 8
parallel ranged `curl`s. (nginx's `limit_rate` is no such server: it lets the first second's
worth of an answer go at full speed, which is all of an 8 MiB ranged GET.)
S3 requests by curl are signed with --aws-sigv4. Bytes on the wire for small changes on
each remote are measured by the test suite (see docs/BENCHMARKS.md).
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (helpers: drop_caches, timed, cat, is_mounted)

BIN = bench.BIN
WORK = bench.WORK
SIZE_MIB = bench.SIZE_MIB
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
OUT = os.environ.get("BENCH_OUT", "target/bench/remotes.md")
EXAMPLE = "target/release/examples/bench_servers"


class Mount:
    def __init__(self, url, mnt, cache, args=(), env=None):
        self.mnt = mnt
        os.makedirs(mnt, exist_ok=True)
        self.log = open(os.path.join(WORK, "mount-remotes.log"), "ab")
        self.proc = subprocess.Popen(
            [BIN, "mount", url, mnt, "--foreground", "--cache-dir", cache, "--max-cache-size", "8G", *args],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env={**os.environ, **(env or {})},
        )
        end = time.time() + 30
        while not bench.is_mounted(mnt):
            if self.proc.poll() is not None or time.time() > end:
                raise SystemExit(f"mount of {url} failed, see {WORK}/mount-remotes.log")
            time.sleep(0.01)

    def close(self):
        subprocess.run([BIN, "unmount", self.mnt], check=True, stdout=subprocess.DEVNULL)
        self.proc.wait(timeout=30)
        self.log.close()


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root (dropping the page cache needs it)")
    os.makedirs(WORK, exist_ok=True)
    store, big, _ = bench.prepare()
    name = os.path.basename(big)
    builtin = subprocess.Popen([BIN, "serve", store, "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, text=True)
    builtin_url = builtin.stdout.readline().split()[-1]
    servers = subprocess.Popen([EXAMPLE, big], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = {}
    for line in servers.stdout:
        if line.strip() == "ready":
            break
        kind, rest = line.split(" ", 1)
        lines[kind] = rest.split()
    nginx_url = lines["nginx"][0]
    rate = os.environ.get("BENCH_RATE", "64M")
    limited = subprocess.Popen([BIN, "serve", store, "--listen", "127.0.0.1:0", "--limit-rate", rate,
                                "--state-dir", os.path.join(WORK, "limited-state")],
                               stdout=subprocess.PIPE, text=True)
    limited_url = limited.stdout.readline().split()[-1]
    endpoint, bucket, key, secret = lines["s3"]
    s3_env = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }
    sigv4 = [
        "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{key}:{secret}",
        "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
    ]
    remotes = {
        "built-in server": dict(url=builtin_url, args=(), env=None, get=f"{builtin_url}/{name}", curl=[]),
        "nginx WebDAV": dict(url=nginx_url, args=(), env=None, get=f"{nginx_url}/{name}", curl=[]),
        f"built-in server, {rate}/s per answer": dict(
            url=limited_url, args=(), env=None, get=f"{limited_url}/{name}", curl=[], ranged=True
        ),
        f"built-in server, {rate}/s per answer, `--concurrency 16`": dict(
            url=limited_url, args=("--concurrency", "16"), env=None, get=f"{limited_url}/{name}", curl=[],
            mount_only=True,
        ),
        "S3 (s3s-fs)": dict(
            url=f"s3://{bucket}/",
            args=("--endpoint-url", endpoint, "--region", "us-east-1"),
            env=s3_env,
            get=f"{endpoint}/{bucket}/{name}",
            curl=sigv4,
        ),
    }
    r = {k: {"mount": [], "curl_file": [], "curl_null": []} for k in remotes}
    mnt = os.path.join(WORK, "mnt-remotes")
    target = os.path.join(WORK, "curl-download.bin")
    try:
        # The built-in server hashes the file once; not part of any run.
        subprocess.run(["curl", "-sfI", f"{builtin_url}/{name}"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["curl", "-sfI", f"{limited_url}/{name}"], check=True, stdout=subprocess.DEVNULL)
        for rnd in range(ROUNDS):
            for kind, rm in remotes.items():
                cache = os.path.join(WORK, "cache-remotes")
                shutil.rmtree(cache, ignore_errors=True)
                m = Mount(rm["url"], mnt, cache, rm["args"], rm["env"])
                bench.drop_caches()
                r[kind]["mount"].append(bench.timed(lambda: bench.cat(os.path.join(mnt, name))))
                m.close()
                shutil.rmtree(cache, ignore_errors=True)
                if rm.get("mount_only"):
                    print(f"round {rnd + 1}/{ROUNDS} {kind}: mount {r[kind]['mount'][-1]:.3f}", file=sys.stderr)
                    continue
                if os.path.exists(target):
                    os.unlink(target)
                bench.drop_caches()
                r[kind]["curl_file"].append(
                    bench.timed(lambda: subprocess.run(["curl", "-sf", *rm["curl"], "-o", target, rm["get"]], check=True))
                )
                os.unlink(target)
                bench.drop_caches()
                if rm.get("ranged"):
                    # 8 parallel ranged curls, each into its own part of one file.
                    r[kind].setdefault("curl_ranged", []).append(
                        bench.timed(lambda: ranged_curls(rm["get"], target, SIZE_MIB << 20, 8))
                    )
                    os.unlink(target)
                else:
                    r[kind]["curl_null"].append(
                        bench.timed(
                            lambda: subprocess.run(["curl", "-sf", *rm["curl"], "-o", "/dev/null", rm["get"]], check=True)
                        )
                    )
                print(
                    f"round {rnd + 1}/{ROUNDS} {kind}: "
                    + ", ".join(f"{c} {v[-1]:.3f}" for c, v in r[kind].items() if v),
                    file=sys.stderr,
                )
    finally:
        servers.stdin.close()
        servers.wait(timeout=30)
        builtin.terminate()
        builtin.wait()
        limited.terminate()
        limited.wait()
    report(r)


def ranged_curls(url, target, size, n):
    """`n` curls at once, each fetching one `n`th of `url` into its place in `target`."""
    with open(target, "wb") as f:
        f.truncate(size)
    step = -(-size // n)
    procs = []
    for i in range(n):
        start, end = i * step, min(size, (i + 1) * step) - 1
        dd = f"dd of={target} bs=1M seek={start} oflag=seek_bytes conv=notrunc status=none"
        procs.append(subprocess.Popen(
            ["bash", "-o", "pipefail", "-c", f"curl -sf -r {start}-{end} {url} | {dd}"]
        ))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"ranged curl of {url} failed")


def report(r):
    med = statistics.median
    rows = [
        f"Cold sequential read of a {SIZE_MIB} MiB file, median of {ROUNDS} interleaved rounds (seconds; GB/s).",
        "",
        "| remote | mount | curl -o FILE | curl -o /dev/null | mount / curl -o FILE | mount / curl -o /dev/null |",
        "|---|---|---|---|---|---|",
    ]
    gbs = lambda t: (SIZE_MIB << 20) / t / 1e9  # noqa: E731
    limited = {}
    for kind, c in r.items():
        if "/s per answer" in kind:
            limited[kind] = c
            continue
        m, f, n = med(c["mount"]), med(c["curl_file"]), med(c["curl_null"])
        rows.append(
            f"| {kind} | {m:.3f} ({gbs(m):.2f}) | {f:.3f} ({gbs(f):.2f}) | {n:.3f} ({gbs(n):.2f}) "
            f"| {f / m:.2f}x | {n / m:.2f}x |"
        )
    if limited:
        (kind, c), (fixed_kind, fixed) = limited.items()
        m, fx, f, g = med(c["mount"]), med(fixed["mount"]), med(c["curl_file"]), med(c["curl_ranged"])
        rows += [
            "",
            f"{kind} (`serve --limit-rate`), seconds (GB/s):",
            "",
            "| mount, adapting | mount, `--concurrency 16` | curl -o FILE | 8 ranged curls at once "
            "| adapting / fixed 16 | adapting / curl -o FILE | adapting / 8 ranged curls |",
            "|---|---|---|---|---|---|---|",
            f"| {m:.3f} ({gbs(m):.2f}) | {fx:.3f} ({gbs(fx):.2f}) | {f:.3f} ({gbs(f):.2f}) | {g:.3f} ({gbs(g):.2f}) "
            f"| {fx / m:.2f}x | {f / m:.2f}x | {g / m:.2f}x |",
        ]
    rows.append("")
    rows.append("Ratios are speed ratios (curl's time / the mount's time): above 1 the mount is faster.")
    text = "\n".join(rows) + "\n"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
